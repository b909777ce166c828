"""Shared fixtures: real cloud worker processes on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import pytest

import splitinfer
from splitinfer.cloud.process import CloudProcess
from splitinfer.models.signing import keygen


def pytest_report_header() -> str:
    # Which splitinfer the suite runs against: the installed one (editable or not).
    return f"splitinfer {splitinfer.__version__} from {splitinfer.__path__[0]}"


@pytest.fixture
def cloud_process() -> Iterator[Callable[..., CloudProcess]]:
    """Start workers with cloud_process(args...); every one is killed after the test."""
    started: list[CloudProcess] = []

    def start(*args: str, **kw: object) -> CloudProcess:
        cp = CloudProcess(*args, **kw)  # type: ignore[arg-type]
        started.append(cp)
        return cp

    yield start
    for cp in started:
        cp.kill()


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """Ed25519 signing keys: the fleet's (key, pub) and another's (key, pub) the fleet does not trust."""
    k, p = keygen(tmp_path / "fleet")
    ok, op = keygen(tmp_path / "other")
    return k, p, ok, op
