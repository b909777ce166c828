"""Start Flower's SuperLink and submit a run to it with ``flwr run``: real processes on 127.0.0.1.

    with SuperLinkProcess(work_dir, port) as link:
        result = link.run(run_config)      # flwr run <app> local --stream; blocks until done

The Flower app bundle is a generated folder holding only a ``pyproject.toml`` whose
components name the installed modules (``splitinfer.cloud.federate:app`` and
``splitinfer.edge.learn_client:app``) and whose ``[tool.flwr.app.config]`` is the run's
configuration (``advertise`` also announces the Fleet API over mDNS for ``--federate mdns``
edges); the SuperLink's SuperExec starts the ServerApp in its own process, each
SuperNode a ClientApp process per round. Transport: Flower 1.42's Fleet / Control APIs on
one HTTP port (insecure, loopback only); the ServerApp writes ``out-dir/result.json``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import socket
import subprocess
from pathlib import Path
from typing import Any

import tomli_w

from splitinfer.cloud.federate import RESULT_FILE
from splitinfer.discovery.federation import advertise_federation
from splitinfer.errors import UserError
from splitinfer.util.flower_procs import flower_env, flower_tool, free_port, start_group, stop_group, wait_port

__all__ = ["SuperLinkProcess", "announce_host", "write_app"]

log = logging.getLogger(__name__)

CONNECTION = "splitinfer"


def write_app(folder: Path, run_config: dict[str, Any]) -> Path:
    """The app bundle folder: a pyproject.toml naming our components and this run's config."""
    folder.mkdir(parents=True, exist_ok=True)
    doc = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": "splitinfer-federate", "version": "1.0.0", "description": "federated distillation of the fallback",
                    "license": "Apache-2.0", "dependencies": []},  # fmt: skip
        "tool": {"flwr": {"app": {
            "publisher": "splitinfer",
            "components": {"serverapp": "splitinfer.cloud.federate:app", "clientapp": "splitinfer.edge.learn_client:app"},
            "config": {k: v for k, v in run_config.items() if v is not None},
        }}},  # fmt: skip
    }
    (folder / "pyproject.toml").write_text(tomli_w.dumps(doc))
    return folder


def announce_host(host: str, interface: str | None = None) -> str:
    """The IPv4 address to announce for a SuperLink listening on ``host``: a wildcard
    listener is announced on ``interface`` (else loopback), a name by what it resolves to.
    Never an address the SuperLink does not listen on (UserError instead)."""
    if host in ("0.0.0.0", "::", ""):
        return interface or "127.0.0.1"
    if interface and host != interface:
        raise UserError(f"--interface {interface} is announced but the SuperLink listens on {host}: "
                        f"pass --host {interface} (or --host 0.0.0.0)")  # fmt: skip
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    try:
        return socket.gethostbyname(host)  # what flower-superlink binds to for a name
    except OSError:
        raise UserError(f"cannot announce --host {host!r} over mDNS: not an IPv4 address; pass --no-advertise") from None


class SuperLinkProcess:
    """A ``flower-superlink --insecure`` child with its own Flower home under ``work_dir``."""

    def __init__(self, work_dir: str | Path, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.work = Path(work_dir)
        self.host = host
        self.port = port or free_port(host)
        self.home = self.work / "flwr-home"
        self.proc: subprocess.Popen | None = None
        self.runs = 0
        self._announcement = contextlib.ExitStack()  # the mDNS record, withdrawn first on stop

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout_s: float = 60.0) -> "SuperLinkProcess":
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(tomli_w.dumps(
            {"superlink": {"default": CONNECTION, CONNECTION: {"address": self.address, "insecure": True}}}))  # fmt: skip
        cmd = [flower_tool("flower-superlink"), "--insecure", "--host", self.host, "--port", str(self.port),
               "--database", str(self.work / "superlink.db"), "--disable-runtime-dependency-installation"]  # fmt: skip
        self.proc = start_group(cmd, flower_env(self.home), self.work / "superlink.log")
        if not wait_port(self.host, self.port, timeout_s, self.proc):
            self.stop()
            raise UserError(f"flower-superlink did not come up on {self.address}; see {self.work / 'superlink.log'}")
        log.info("SuperLink on %s", self.address)
        return self

    def advertise(self, model: str, rounds: int, strategy: str, interface: str | None = None) -> str:
        """Announce the Fleet API over mDNS until :meth:`stop`; returns the announced ``host:port``."""
        host = announce_host(self.host, interface)
        try:
            self._announcement.enter_context(
                advertise_federation(host, self.port, model=model, rounds=rounds, strategy=strategy, interface=interface))
        except ValueError as exc:  # an unusable address or a TXT record over the limits
            raise UserError(f"cannot announce the SuperLink over mDNS: {exc}") from None
        log.info("announcing the SuperLink at %s:%d over mDNS", host, self.port)
        return f"{host}:{self.port}"

    def run(self, run_config: dict[str, Any], timeout_s: float = 900.0) -> dict[str, Any]:
        """Submit one run (``flwr run``) and wait for the ServerApp's result."""
        self.runs += 1
        out = Path(str(run_config.get("out-dir") or self.work / f"run-{self.runs}"))
        cfg = {**run_config, "out-dir": str(out)}
        app = write_app(self.work / f"app-{self.runs}", cfg)
        (out / RESULT_FILE).unlink(missing_ok=True)
        with open(self.work / f"flwr-run-{self.runs}.log", "wb") as logf:
            rc = subprocess.run([flower_tool("flwr"), "run", str(app), CONNECTION, "--stream"], env=flower_env(self.home),
                                stdout=logf, stderr=subprocess.STDOUT, timeout=timeout_s, check=False).returncode  # fmt: skip
        path = out / RESULT_FILE
        if not path.is_file():
            raise UserError(f"the federated run wrote no result (flwr run exit {rc}); see {self.work}/flwr-run-{self.runs}.log")
        return json.loads(path.read_text())

    def stop(self, kill: bool = False) -> None:
        self._announcement.close()  # first: no edge should join a SuperLink that is leaving
        if self.proc is not None:
            stop_group(self.proc, kill=kill)

    def __enter__(self) -> "SuperLinkProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
