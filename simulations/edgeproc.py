"""The emulation's edge agent as a child process, seen from the parent.

The child is :mod:`splitinfer.simulations.launcher`; it writes marker lines (``MARKER
ready``, ``MARKER t0 <monotonic s>``) on its stderr, reads ``go`` on its stdin and prints
the agent's JSON summary on its stdout. :class:`EdgeProcess` collects the stdout, hands
the markers over in order and keeps the rest of stderr for error messages.
"""

from __future__ import annotations

import json
import logging
import queue
import subprocess
from typing import Any, Mapping, Sequence

from splitinfer.util.procs import LinePump, python_module, reap

__all__ = ["MARKER", "EdgeProcess", "edge_command"]

log = logging.getLogger(__name__)

MARKER = "splitinfer-emulate:"  # the launcher's lines on the edge's stderr


def edge_command(agent: Mapping[str, Any], requests: int, rate_per_s: float | None) -> list[str]:
    """The launcher's command line: the agent's AgentConfig fields (JSON-able values) and
    what its run() gets."""
    spec = {"agent": dict(agent), "requests": int(requests), "rate": rate_per_s}
    return python_module("splitinfer.simulations.launcher", json.dumps(spec))


class EdgeProcess:
    """The launcher child: stdout collected, stderr scanned for the markers."""

    def __init__(self, cmd: Sequence[str]) -> None:
        self.proc = subprocess.Popen(list(cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)  # fmt: skip
        self.markers: "queue.Queue[str]" = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._pumps = [LinePump(self.proc.stdout, self._on_out), LinePump(self.proc.stderr, self._on_err)]

    def _on_out(self, line: str | None) -> None:
        if line is not None:
            self.stdout.append(line)

    def _on_err(self, line: str | None) -> None:
        if line is None:
            self.markers.put("exit")
        elif line.startswith(MARKER):
            self.markers.put(line[len(MARKER):].strip())
        else:
            self.stderr.append(line)

    def wait_marker(self, word: str, timeout_s: float) -> str:
        """The rest of the next marker line, which must start with `word`."""
        try:
            got = self.markers.get(timeout=timeout_s)
        except queue.Empty:
            raise RuntimeError(f"the edge agent did not report {word!r} within {timeout_s:g} s") from None
        if not got.startswith(word):
            raise RuntimeError(f"the edge agent stopped before {word!r}: {self.error_tail()}")
        return got[len(word):].strip()

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def error_tail(self) -> str:
        lines = [ln.strip() for ln in self.stderr if ln.strip()]
        return " | ".join(lines[-3:]) or f"exit code {self.proc.poll()}"

    def kill(self) -> None:
        reap(self.proc, self._pumps)
