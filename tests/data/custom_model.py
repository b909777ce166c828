"""An example user model for `load_model("tests/data/custom_model.py:build")`.

A tiny CNN on 1x16x16 inputs: a conv block, a residual block and a linear head.
"""

import torch
from torch import nn


class CustomNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.relu(self.conv(x) + x)
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


def build() -> tuple[nn.Module, torch.Tensor]:
    """Return the model and an example input of batch size 1."""
    torch.manual_seed(0)
    return CustomNet(), torch.randn(1, 1, 16, 16)
