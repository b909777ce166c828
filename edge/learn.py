"""An edge that learns from the field: the buffer filled from the agent's answers, and the
Flower SuperNode that lets the federated server train the fallback student on it.

``--learn``: :class:`BufferRecorder` is the agent's ``after_answer_tensors`` hook; every
answer that came from the cloud adds (input, the cloud's logits) to a bounded
:class:`LearnBuffer`, saved to a local folder (never sent). ``--federate ADDR``:
:class:`SuperNodeProcess` runs ``flower-supernode --insecure --superlink ADDR`` with that
folder in its node config; each round its ClientApp (:mod:`splitinfer.edge.learn_client`)
fine-tunes on the saved buffer and replies with weights only. The SuperNode is a separate
process: a server that is gone only makes it retry, the agent keeps serving.
``--federate mdns``: the SuperLink is found over mDNS when the SuperNode starts
(:func:`splitinfer.discovery.federation.find_federation`, at most ``MDNS_WAIT_S``), preferring
one that trains this agent's fallback model; none found is a UserError.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

from splitinfer.discovery.federation import FEDERATE_MDNS, find_federation
from splitinfer.edge.hooks import NO_HOOKS, AgentHooks
from splitinfer.train.federated_buffer import BufferLimits, LearnBuffer
from splitinfer.util.flower_procs import flower_env, flower_tool, free_port, start_group, stop_group

__all__ = ["BufferRecorder", "SuperNodeProcess", "learning", "resolve_superlink"]

log = logging.getLogger(__name__)

MDNS_WAIT_S = 10.0  # how long `--federate mdns` listens for a SuperLink's announcement


class BufferRecorder:
    """Fills a buffer from cloud answers and saves it to ``folder`` at most every ``save_every_s``."""

    def __init__(self, folder: str | Path, limits: BufferLimits = BufferLimits(), save_every_s: float = 2.0) -> None:
        self.folder = Path(folder)
        self.buffer = LearnBuffer(limits)
        self.save_every_s = save_every_s
        self._last_save = 0.0
        self._lock = threading.Lock()
        self.node: SuperNodeProcess | None = None  # --federate: this edge's SuperNode

    def __call__(self, x: Any, answer: Any) -> None:
        """AgentHooks.after_answer_tensors: (the request's input, its Answer)."""
        if getattr(answer, "source", None) != "cloud" or not getattr(answer, "ok", False) or not answer.outputs:
            return  # only the teacher's answers are labels; the fallback's own would teach it nothing
        if not hasattr(x, "shape"):
            return  # several-input models: not learned from
        logits = next(iter(answer.outputs.values()))
        self.buffer.add(x, logits)
        if time.monotonic() - self._last_save >= self.save_every_s:
            self.save()

    def save(self) -> Path:
        with self._lock:
            self._last_save = time.monotonic()
            return self.buffer.save(self.folder)


class SuperNodeProcess:
    """``flower-supernode`` for this edge; node config ``buffer-dir`` (+ ``seed``, ``fault``)."""

    def __init__(self, superlink: str, buffer_dir: str | Path, work_dir: str | Path | None = None,
                 seed: int = 0, fault: str | None = None) -> None:  # fmt: skip
        self.superlink = superlink
        self.buffer_dir = Path(buffer_dir)
        self.work = Path(work_dir) if work_dir is not None else self.buffer_dir
        self.seed = seed
        self.fault = fault
        self.proc: subprocess.Popen | None = None

    def start(self) -> "SuperNodeProcess":
        self.work.mkdir(parents=True, exist_ok=True)
        node = f'buffer-dir="{self.buffer_dir.resolve()}" seed={int(self.seed)}'
        if self.fault:
            node += f' fault="{self.fault}"'
        cmd = [flower_tool("flower-supernode"), "--insecure", "--superlink", self.superlink, "--port",
               str(free_port()), "--node-config", node]  # fmt: skip
        home = self.work / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        self.proc = start_group(cmd, flower_env(home), self.work / "supernode.log")
        log.info("SuperNode joined %s (buffer %s)", self.superlink, self.buffer_dir)
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, kill: bool = False) -> None:
        if self.proc is not None:
            stop_group(self.proc, kill=kill)

    def __enter__(self) -> "SuperNodeProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def resolve_superlink(federate: str, model: str | None, interface: str | None = None,
                      wait_s: float = MDNS_WAIT_S) -> str:  # fmt: skip
    """``--federate``'s value as ``host:port``: as given, or (``mdns``) found over mDNS.
    The browsing runs on a private loop in its own thread; this thread waits for it."""
    if federate != FEDERATE_MDNS:
        return federate
    address = find_federation(model, wait_s, interface)
    log.warning("joining the Flower SuperLink at %s (found over mDNS)", address)
    return address


@contextlib.contextmanager
def learning(config: Any, hooks: AgentHooks | None) -> Iterator[AgentHooks | None]:
    """With ``config.learn``: hooks that also fill the buffer, and (``config.federate``) a
    SuperNode for the agent's lifetime; the buffer is saved once more at the end."""
    if not getattr(config, "learn", False):
        yield hooks
        return
    # `mdns` is resolved first (no temp folder left behind when none is found); run_agent
    # resolves it in a thread before it enters here, so its loop never waits on the browse
    superlink = (resolve_superlink(config.federate, getattr(config, "fallback", None), getattr(config, "interface", None))
                 if config.federate else None)  # fmt: skip
    folder = Path(config.learn_dir) if config.learn_dir else Path(tempfile.mkdtemp(prefix="splitinfer-learn-"))
    recorder = BufferRecorder(folder)
    node = recorder.node = SuperNodeProcess(superlink, folder).start() if superlink else None
    try:
        yield replace(hooks or NO_HOOKS, after_answer_tensors=recorder)
    finally:
        recorder.save()
        if node is not None:
            node.stop()
