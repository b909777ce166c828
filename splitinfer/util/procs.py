"""Child processes: the command line that runs one of our modules, and the threads that
read a child's pipes (a pipe nobody reads fills up and stalls the child)."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from typing import IO

__all__ = ["python_module", "LinePump", "reap"]


def python_module(module: str, *args: str) -> list[str]:
    """`python -P -m module args...` with this interpreter. -P keeps the working directory
    off sys.path, so a checkout's splitinfer/ never shadows the installed package."""
    return [sys.executable, "-P", "-m", module, *args]


class LinePump:
    """A daemon thread per pipe that hands every line to `on_line`; None at EOF.

    `keep` lines of the stream are kept in `tail` too (for error messages)."""

    def __init__(self, stream: IO[str], on_line: Callable[[str | None], None] | None = None, keep: int = 50) -> None:
        self.tail: list[str] = []
        self._stream, self._on_line, self._keep = stream, on_line, keep
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @classmethod
    def to_queue(cls, stream: IO[str], keep: int = 50) -> tuple["LinePump", "queue.Queue[str | None]"]:
        """A pump that puts each line (then None at EOF) on a new queue."""
        lines: queue.Queue[str | None] = queue.Queue()
        return cls(stream, lines.put, keep), lines

    def _run(self) -> None:
        try:
            for line in self._stream:
                self.tail.append(line)
                del self.tail[: -self._keep]
                if self._on_line is not None:
                    self._on_line(line)
        except (OSError, ValueError):  # the pipe was closed under us
            pass
        if self._on_line is not None:
            self._on_line(None)

    def join(self, timeout_s: float = 2.0) -> None:
        self._thread.join(timeout=timeout_s)

    def last(self, n: int = 5) -> str:
        """The last n lines, joined: what a child said before it failed."""
        return "".join(self.tail[-n:]).strip()


def reap(proc: subprocess.Popen, pumps: Sequence[LinePump] = (), wait_s: float = 10.0) -> None:
    """SIGKILL ``proc`` if it still runs, wait for it, let its pumps reach EOF, close its pipes."""
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        pass
    for pump in pumps:
        pump.join(timeout_s=2)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        try:
            if pipe is not None:
                pipe.close()
        except OSError:
            pass
