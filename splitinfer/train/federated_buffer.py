"""The edge's learning buffer: inputs it saw, with the cloud's answer as a soft label.

Bounded three ways (count, bytes, age): the oldest entries go first. It lives on the
device only: :meth:`LearnBuffer.save` writes a local safetensors file (atomic rename) that
the Flower ClientApp on the same device reads (:meth:`LearnBuffer.load`); nothing of it is
ever put in a message. ``truth`` is the ground-truth label where the demo data has one
(-1 otherwise) and is used for evaluation only, never for training.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

from splitinfer.errors import UserError

__all__ = ["BUFFER_FILE", "BufferLimits", "LearnBuffer"]

BUFFER_FILE = "buffer.safetensors"


@dataclass(frozen=True)
class BufferLimits:
    """How much the buffer may hold; every bound applies at once."""

    max_items: int = 512
    max_bytes: int = 16 * 1024 * 1024  # inputs + soft labels
    max_age_s: float = 24 * 3600.0

    def __post_init__(self) -> None:
        if self.max_items < 1 or self.max_bytes < 1 or not self.max_age_s > 0:
            raise UserError("buffer limits must be positive (items, bytes, age)")


def _nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


class LearnBuffer:
    """Thread-safe FIFO of (input, soft label logits, truth, time added); see the module docstring."""

    def __init__(self, limits: BufferLimits = BufferLimits(), clock=time.time) -> None:
        self.limits = limits
        self._clock = clock
        self._items: deque[tuple[torch.Tensor, torch.Tensor, int, float]] = deque()
        self._bytes = 0
        self._lock = threading.Lock()
        self.added = 0
        self.evicted = 0

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._items)

    @property
    def nbytes(self) -> int:
        with self._lock:
            self._expire()
            return self._bytes

    def add(self, x: torch.Tensor, logits: torch.Tensor, truth: int = -1) -> None:
        """One sample per row of ``x`` (batch first) with its row of ``logits``."""
        x = x.detach().float().cpu()
        logits = logits.detach().float().cpu().reshape(x.shape[0], -1)
        now = self._clock()
        with self._lock:
            for i in range(x.shape[0]):
                xi, li = x[i].clone(), logits[i].clone()
                size = _nbytes(xi, li)
                if size > self.limits.max_bytes:
                    continue  # one sample over the whole budget: never kept
                self._items.append((xi, li, int(truth), now))
                self._bytes += size
                self.added += 1
            self._evict()

    def _drop_oldest(self) -> None:
        xi, li, _, _ = self._items.popleft()
        self._bytes -= _nbytes(xi, li)
        self.evicted += 1

    def _expire(self) -> None:
        horizon = self._clock() - self.limits.max_age_s
        while self._items and self._items[0][3] < horizon:
            self._drop_oldest()

    def _evict(self) -> None:
        self._expire()
        while self._items and (len(self._items) > self.limits.max_items or self._bytes > self.limits.max_bytes):
            self._drop_oldest()

    def tensors(self) -> dict[str, torch.Tensor]:
        """The live entries as stacked tensors: x, logits, truth, added (empty dict when empty)."""
        with self._lock:
            self._expire()
            items = list(self._items)
        if not items:
            return {}
        return {
            "x": torch.stack([i[0] for i in items]),
            "logits": torch.stack([i[1] for i in items]),
            "truth": torch.tensor([i[2] for i in items], dtype=torch.int64),
            "added": torch.tensor([i[3] for i in items], dtype=torch.float64),
        }

    def save(self, folder: str | Path) -> Path:
        """Write the live entries to ``folder/buffer.safetensors`` (atomically); local only."""
        from splitinfer.models.versions import save_tensors

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / BUFFER_FILE
        tmp = folder / (BUFFER_FILE + ".tmp")
        data = self.tensors()
        if not data:
            path.unlink(missing_ok=True)
            return path
        save_tensors(tmp, data)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, folder: str | Path, limits: BufferLimits = BufferLimits(), clock=time.time) -> "LearnBuffer":
        """A buffer holding what ``save`` wrote (limits and age applied again); empty if none."""
        from splitinfer.models.versions import load_tensors

        buf = cls(limits, clock)
        path = Path(folder) / BUFFER_FILE
        if not path.is_file():
            return buf
        data = load_tensors(path)
        with buf._lock:
            for xi, li, yi, ti in zip(data["x"], data["logits"], data["truth"].tolist(), data["added"].tolist()):
                buf._items.append((xi.clone(), li.clone(), int(yi), float(ti)))
                buf._bytes += _nbytes(xi, li)
            buf._evict()
        return buf
