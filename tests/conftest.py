"""Shared fixtures: real cloud worker processes on 127.0.0.1."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]


class CloudProcess:
    """`splitinfer cloud` in its own process; `url` once it prints that it serves."""

    def __init__(self, *args: str, timeout_s: float = 120.0):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "splitinfer.cli", "cloud", "--port", "0", "--no-advertise", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: "queue.Queue[str]" = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        deadline = time.monotonic() + timeout_s
        self.url = ""
        while not self.url:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"cloud worker did not start: {self.proc.stderr.read() if self.proc.stderr else ''}")
            try:
                line = self.lines.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                continue
            if "serving on " in line:
                self.url = line.split("serving on ", 1)[1].split()[0]

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        try:
            return self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            return None


@pytest.fixture
def cloud_process() -> Iterator[type[CloudProcess]]:
    """Start workers with cloud_process(args...); every one is killed after the test."""
    started: list[CloudProcess] = []

    def start(*args: str, **kw: float) -> CloudProcess:
        cp = CloudProcess(*args, **kw)
        started.append(cp)
        return cp

    yield start  # type: ignore[misc]
    for cp in started:
        if cp.proc.poll() is None:
            cp.signal(signal.SIGCONT)  # a stopped process ignores SIGKILL until continued
        cp.stop()
