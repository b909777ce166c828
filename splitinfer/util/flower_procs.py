"""Child processes of Flower's deployment runtime (flower-superlink, flower-supernode, flwr run).

Flower's commands start their own children (SuperExec, then one ServerApp / ClientApp
process per run or round) by name, so they need this interpreter's ``bin`` folder on PATH;
each gets its own process group so that stopping one takes its children with it. The
Flower home (``FLWR_HOME``: its config.toml names the SuperLink connection, its apps folder
holds installed app bundles) is a folder per federation, never the user's ``~/.flwr``.
Telemetry is off: nothing here talks to anything but 127.0.0.1.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["flower_env", "flower_tool", "free_port", "start_group", "stop_group", "wait_port"]


def flower_tool(name: str) -> str:
    """The path of a Flower console script installed next to this interpreter."""
    return str(Path(sys.executable).parent / name)


def flower_env(home: str | Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["FLWR_HOME"] = str(home)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env.setdefault("OMP_NUM_THREADS", "1")  # each app process trains on one core
    env.update(extra or {})
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, timeout_s: float, proc: subprocess.Popen | None = None) -> bool:
    """True once ``host:port`` accepts connections; False on timeout or if ``proc`` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.2)
    return False


def start_group(cmd: list[str], env: dict[str, str], log_path: str | Path, cwd: str | Path | None = None) -> subprocess.Popen:
    """Start ``cmd`` in a new process group, stdout and stderr to ``log_path``."""
    log = open(log_path, "ab")  # noqa: SIM115 - the child owns it for its life
    try:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=cwd, start_new_session=True)  # fmt: skip
    finally:
        log.close()


def stop_group(proc: subprocess.Popen, grace_s: float = 5.0, kill: bool = False) -> None:
    """SIGTERM (or SIGKILL with ``kill``) the process group of ``proc``, then wait for it."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(grace_s)
