"""Every process the demo starts (cloud workers, the edge driver), so that all of them go,
whatever happens: normal end, failure, Ctrl-C or SIGTERM."""

from __future__ import annotations

import json
import subprocess
import threading
from typing import Any, Sequence

from splitinfer.util.procs import LinePump, python_module

__all__ = ["CLOUD_START_TIMEOUT_S", "DemoProcesses", "EdgeDriver"]

CLOUD_START_TIMEOUT_S = 60.0
DRIVER_MODULE = "splitinfer.demo.driver"


class EdgeDriver:
    """The edge side (``python -m splitinfer.demo.driver CONFIG``) as a child process:
    its stdout lines on `lines` (None at EOF), the tail of its stderr for error messages."""

    def __init__(self, cfg: dict[str, Any], prefix: Sequence[str]) -> None:
        self.proc = subprocess.Popen(
            [*prefix, *python_module(DRIVER_MODULE, json.dumps(cfg))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
        )  # fmt: skip
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.out, self.lines = LinePump.to_queue(self.proc.stdout)
        self.err = LinePump(self.proc.stderr)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def stdin(self) -> Any:
        return self.proc.stdin

    def stderr_tail(self, n: int = 8) -> str:
        return self.err.last(n)

    def close(self) -> None:
        """Ask it to stop ("stop" on its stdin), then kill it if it does not go in 5 s."""
        proc = self.proc
        if proc.poll() is None:
            try:
                if proc.stdin is not None:
                    proc.stdin.write("stop\n")
                    proc.stdin.flush()
                proc.wait(timeout=5)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait(timeout=10)


class DemoProcesses:
    """Every process the demo starts, so that all of them go, whatever happens."""

    def __init__(self) -> None:
        self.clouds: list[Any] = []  # CloudProcess objects, registered before they finish starting
        self.edge: EdgeDriver | None = None
        self.threads: list[threading.Thread] = []  # workers being started in the background
        self.lock = threading.Lock()

    def start_edge(self, cfg: dict[str, Any], prefix: Sequence[str]) -> EdgeDriver:
        """The edge driver with `cfg` under `prefix` (it runs until it is done or told to stop)."""
        self.edge = EdgeDriver(cfg, prefix)
        return self.edge

    def start_cloud(self, args: Sequence[str], prefix: Sequence[str]) -> Any:
        """`splitinfer cloud ARGS` under `prefix`, advertised; returns once it serves."""
        from splitinfer.cloud.process import CloudProcess

        cp = CloudProcess.__new__(CloudProcess)  # registered first: a Ctrl-C while it starts still finds it
        with self.lock:
            self.clouds.append(cp)
        cp.__init__(*args, prefix=prefix, advertise=True, timeout_s=CLOUD_START_TIMEOUT_S)  # type: ignore[misc]
        return cp

    def start_cloud_in_background(self, args: Sequence[str], prefix: Sequence[str], result: dict[str, Any]) -> None:
        """As start_cloud, on a thread; `result` gets "cloud" or "error", then "done"."""

        def target() -> None:
            try:
                result["cloud"] = self.start_cloud(args, prefix)
            except BaseException as exc:  # reported by the caller
                result["error"] = exc
            result["done"] = True

        thread = threading.Thread(target=target, name="cloud-restart", daemon=True)
        self.threads.append(thread)
        thread.start()

    def _stop_clouds(self) -> None:
        with self.lock:
            clouds = list(self.clouds)
        for cp in clouds:
            proc = getattr(cp, "proc", None)
            if proc is None:
                continue
            if proc.poll() is None:
                cp.terminate(timeout_s=5)  # graceful: it says goodbye on mDNS; SIGKILL after 5 s
            else:
                cp.kill()  # already gone: reap it, close its pipes

    def close(self) -> None:
        if self.edge is not None:
            self.edge.close()
        self._stop_clouds()
        for thread in self.threads:  # a worker still starting fails fast once its process is gone
            thread.join(timeout=15)
        self._stop_clouds()
