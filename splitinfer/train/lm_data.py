"""Training text for the byte LMs: a fixed, seeded selection of the Python standard library's source.

Every machine with Python has it, so nothing is downloaded. The candidates are the
``.py`` files under ``sysconfig.get_paths()["stdlib"]`` (sorted relative paths; test
suites, site-packages and very large generated files left out); a seeded sample of them
is split *by file* into train and held-out, so held-out text is code the model never saw.
Bytes are the tokens. :attr:`LMCorpus.digest` names the exact selection (paths and
contents): it goes into the weights' metadata, since another Python version has other files.
"""

from __future__ import annotations

import hashlib
import random
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

__all__ = [
    "DATA_SEED",
    "N_FILES",
    "N_HELD_OUT",
    "LMCorpus",
    "stdlib_root",
    "candidate_files",
    "load_corpus",
    "random_windows",
    "eval_windows",
]

DATA_SEED = 0  # seeds the file sample and the train / held-out split
N_FILES = 360  # files sampled from the candidates
N_HELD_OUT = 30  # of them held out
MAX_FILE_BYTES = 200_000  # larger files are generated tables (pydoc topics, unicode data)
_EXCLUDED_PARTS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
_SEPARATOR = b"\n\n"  # between files


@dataclass(frozen=True)
class LMCorpus:
    """The selected files and their concatenated bytes, split by file."""

    root: Path
    train_files: tuple[str, ...]
    held_out_files: tuple[str, ...]
    train: torch.Tensor  # uint8 bytes of the train files
    held_out: torch.Tensor  # uint8 bytes of the held-out files
    digest: str  # sha256 over (path, contents) of every selected file, short hex

    def describe(self) -> dict[str, object]:
        """What the weights' metadata records about the data."""
        return {
            "source": "python stdlib .py files",
            "python_stdlib": str(self.root),
            "data_seed": DATA_SEED,
            "train_files": len(self.train_files),
            "held_out_files": len(self.held_out_files),
            "train_bytes": int(self.train.numel()),
            "held_out_bytes": int(self.held_out.numel()),
            "data_digest": self.digest,
        }


def stdlib_root() -> Path:
    """The standard library's directory of this interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def candidate_files(root: Path) -> list[str]:
    """Sorted relative paths of the stdlib's own ``.py`` files (no tests, no site-packages)."""
    out = []
    for f in root.rglob("*.py"):
        rel = f.relative_to(root)
        if _EXCLUDED_PARTS.intersection(rel.parts) or not f.is_file():
            continue
        if f.stat().st_size > MAX_FILE_BYTES:
            continue
        out.append(rel.as_posix())
    return sorted(out)


@lru_cache(maxsize=4)
def load_corpus(seed: int = DATA_SEED, n_files: int = N_FILES, n_held_out: int = N_HELD_OUT) -> LMCorpus:
    """The seeded file selection, split by file, as byte tensors (cached per process)."""
    root = stdlib_root()
    candidates = candidate_files(root)
    if len(candidates) < n_files:
        raise RuntimeError(f"only {len(candidates)} stdlib files under {root}; need {n_files}")
    chosen = random.Random(seed).sample(candidates, n_files)  # candidates sorted: the sample is fixed
    held, train = sorted(chosen[:n_held_out]), sorted(chosen[n_held_out:])
    h = hashlib.sha256()
    blobs: dict[str, bytes] = {}
    for rel in sorted(chosen):
        data = (root / rel).read_bytes()
        blobs[rel] = data
        h.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())

    def join(files: list[str]) -> torch.Tensor:
        raw = _SEPARATOR.join(blobs[f] for f in files)
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()

    return LMCorpus(root, tuple(train), tuple(held), join(train), join(held), h.hexdigest()[:16])


def random_windows(data: torch.Tensor, batch: int, ctx: int, gen: torch.Generator) -> torch.Tensor:
    """``batch`` windows of ``ctx + 1`` bytes at random offsets: (batch, ctx + 1) int64."""
    starts = torch.randint(0, data.numel() - ctx - 1, (batch,), generator=gen)
    return torch.stack([data[s : s + ctx + 1] for s in starts.tolist()]).long()


def eval_windows(data: torch.Tensor, ctx: int, n: int) -> torch.Tensor:
    """``n`` evenly spaced windows of ``ctx + 1`` bytes (the fixed held-out set): (n, ctx + 1)."""
    span = data.numel() - ctx - 1
    starts = [round(i * span / max(n - 1, 1)) for i in range(n)]
    return torch.stack([data[s : s + ctx + 1] for s in starts]).long()
