"""A cloud worker in its own process, for benchmarks, the demo, emulation and tests."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import time
from typing import Sequence

from splitinfer.util.procs import LinePump, python_module


class CloudProcess:
    """`splitinfer cloud` as a child process; `url` is set once it prints that it serves.

    `prefix` runs it under another command (e.g. `ip netns exec NS`). The keyword options
    are the worker's security settings (same as `--token`, `--token-file`, `--tls-cert`,
    `--tls-key`, `--tls-client-ca`; they may as well be given in `args`)."""

    def __init__(
        self,
        *args: str,
        timeout_s: float = 120.0,
        prefix: Sequence[str] = (),
        port: int = 0,
        advertise: bool = False,
        env: dict[str, str] | None = None,
        token: str | None = None,
        token_file: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_client_ca: str | None = None,
    ):
        cmd = [*prefix, *python_module("splitinfer.cli", "cloud", "--port", str(port), *args)]
        options = {"--token": token, "--token-file": token_file, "--tls-cert": tls_cert,
                   "--tls-key": tls_key, "--tls-client-ca": tls_client_ca}  # fmt: skip
        for flag, value in options.items():
            if value is not None:
                cmd += [flag, str(value)]
        if not advertise:
            cmd.append("--no-advertise")
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        out_pump, self.lines = LinePump.to_queue(self.proc.stdout)
        err_pump = LinePump(self.proc.stderr, keep=200)
        self._pumps = [out_pump, err_pump]
        self.url = ""
        deadline = time.monotonic() + timeout_s
        while not self.url:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.proc.poll() is not None:
                self.kill()
                raise RuntimeError("cloud worker did not start: " + err_pump.last(5))
            try:
                line = self.lines.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
            if line is not None and "serving on " in line:
                self.url = line.split("serving on ", 1)[1].split()[0]

    @property
    def stderr_lines(self) -> list[str]:
        """The worker's last lines on stderr (its log)."""
        return list(self._pumps[1].tail)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def terminate(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (graceful drain) and wait; SIGKILL if it does not exit in time."""
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return self.kill()
        self._close_pipes()
        return code

    def kill(self) -> int | None:
        if self.proc.poll() is None:
            self.signal(signal.SIGCONT)  # a stopped process ignores SIGKILL until continued
            self.proc.send_signal(signal.SIGKILL)
        try:
            return self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            return None
        finally:
            self._close_pipes()

    def _close_pipes(self) -> None:
        if self.proc.poll() is None:
            return
        for pump in self._pumps:  # they reach EOF now that the process is gone
            pump.join(timeout_s=2)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass

    def __enter__(self) -> "CloudProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()
