"""The emulation's edge agent: the child process that runs the real agent with two markers.

    python -m splitinfer.simulations.launcher SPEC_JSON

``SPEC_JSON`` is ``{"agent": {AgentConfig fields}, "requests": N, "rate": R or null}``
(built by :func:`splitinfer.simulations.edgeproc.edge_command`). Without a ``fallback``
field the agent gets the model's student, and without a ``token`` the
``SPLITINFER_TOKEN`` environment variable, as ``splitinfer edge`` does.

It builds its own :class:`~splitinfer.edge.agent.AgentConfig` and
:class:`~splitinfer.edge.agent.EdgeAgent`, with two hooks and nothing else changed:

- ``before_run``: write ``MARKER ready`` on stderr once the agent has started (model
  loaded, start-up probe done), then wait for ``go`` on stdin (the parent sets the cpu
  quota first);
- ``before_request``: write ``MARKER t0 <monotonic s>`` when the first timed request
  (after the warm-up) starts: time 0 of the trace replay.

The summary is printed as one JSON object on stdout; a UserError ends it with one line on
stderr and exit code 2.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from typing import Any, Sequence

from splitinfer.errors import UserError
from splitinfer.simulations.edgeproc import MARKER
from splitinfer.util.output import emit_json

__all__ = ["main"]

log = logging.getLogger(__name__)


def _mark(text: str) -> None:
    sys.stderr.write(f"{MARKER} {text}\n")
    sys.stderr.flush()


def agent_config(fields: dict[str, Any]) -> Any:
    """The AgentConfig of the spec's fields (JSON lists back to tuples; the CLI's defaults
    for the fallback and the token)."""
    from splitinfer.edge.config import AgentConfig
    from splitinfer.edge.fallback import default_fallback

    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    if "fallback" not in fields:
        fields["fallback"] = default_fallback(str(fields.get("model")))
    fields.setdefault("token", os.environ.get("SPLITINFER_TOKEN"))
    try:
        return AgentConfig(**fields)
    except TypeError as exc:  # a field the agent does not have
        raise UserError(f"bad edge agent options: {exc}") from None


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Start the agent, mark "ready", wait for "go", run the requests (marking t0)."""
    from splitinfer.edge.agent import EdgeAgent
    from splitinfer.edge.hooks import AgentHooks

    config = agent_config(dict(spec["agent"]))
    running = False  # before_request counts from start-up until run() begins

    async def before_run() -> None:
        nonlocal running
        _mark("ready")
        line = await asyncio.to_thread(sys.stdin.readline)
        if line.strip() != "go":
            raise UserError("the emulation went away before the run")
        running = True

    def before_request(index: int) -> None:
        if running and index == config.warmup:
            _mark(f"t0 {time.monotonic():.6f}")

    hooks = AgentHooks(before_run=before_run, before_request=before_request)
    async with EdgeAgent(config, hooks=hooks) as agent:
        return await agent.run(int(spec["requests"]), spec.get("rate"))


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if len(args) != 1:
            raise UserError("usage: python -m splitinfer.simulations.launcher SPEC_JSON")
        summary = asyncio.run(run(json.loads(args[0])))
    except UserError as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    emit_json(summary)


if __name__ == "__main__":
    main()
