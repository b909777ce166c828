"""The experiment's field: the digits split over 4 edges, each with its own shift.

Edge i gets a disjoint slice of the training split (its camera's recent inputs) and the
whole held-out split, both through its shift (:data:`splitinfer.train.federated_shifts.SHIFTS`)
and its class mix. Its buffer is filled with the teacher's logits on its inputs: exactly what
the cloud answers an agent with ``--learn`` (the teacher is run here in-process instead of
through a worker, to keep the experiment within minutes on two cores). Ground truth is kept
for evaluation only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from splitinfer.models.data import digits_dataset
from splitinfer.models.loader import load_model
from splitinfer.train.federated_buffer import BufferLimits, LearnBuffer
from splitinfer.train.federated_shifts import SHIFTS, Shift, apply_shift, class_mix

__all__ = ["EdgeData", "build_field", "fill_buffers"]

TEACHER = "tinycnn-digits"
STUDENT = "student:tinycnn-digits"


@dataclass
class EdgeData:
    """One edge: its shift, its buffer's inputs and teacher logits, its own test set."""

    name: str
    shift: Shift
    x_train: torch.Tensor
    y_train: torch.Tensor  # evaluation only
    teacher_logits: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@torch.no_grad()
def build_field(per_edge: int = 300, shifts: dict[str, Shift] = SHIFTS) -> list[EdgeData]:
    """The edges of the experiment, deterministic."""
    torch.set_num_threads(1)
    teacher = load_model(TEACHER).module.eval()
    data = digits_dataset((3, 32, 32))
    edges = []
    for i, (name, shift) in enumerate(shifts.items()):
        lo = i * per_edge
        xs, ys = data.x_train[lo : lo + per_edge], data.y_train[lo : lo + per_edge]
        keep = class_mix(ys, shift, seed=i)
        xs, ys = apply_shift(xs[keep], shift, seed=100 + i), ys[keep]
        keep_t = class_mix(data.y_test, shift, seed=50 + i)
        xt, yt = apply_shift(data.x_test[keep_t], shift, seed=200 + i), data.y_test[keep_t]
        edges.append(EdgeData(name, shift, xs, ys, teacher(xs), xt, yt))
    return edges


def fill_buffers(edges: list[EdgeData], root: Path, limits: BufferLimits = BufferLimits()) -> list[Path]:
    """Each edge's buffer saved in its own folder (what BufferRecorder writes on a device)."""
    folders = []
    for e in edges:
        buf = LearnBuffer(limits)
        buf.add(e.x_train, e.teacher_logits)
        folders.append(buf.save(root / e.name).parent)
    return folders
