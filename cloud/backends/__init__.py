"""Backends: what runs the tails behind the protocol handler (DESIGN.md "Backend").

``local`` runs them in this process (the batcher); ``ray`` on Ray Serve replicas. The
service picks one with :func:`make_backend` and from then on sees only :class:`Backend`.
"""

from __future__ import annotations

from typing import Callable

from splitinfer.cloud.backends.base import Admission, Backend, DeadlineExceeded, JobResult, Overloaded
from splitinfer.cloud.config import WorkerConfig
from splitinfer.cloud.registry import ModelRegistry

__all__ = ["BACKENDS", "Admission", "Backend", "DeadlineExceeded", "JobResult", "Overloaded", "make_backend"]

BACKENDS = ("local", "ray")


def make_backend(
    config: WorkerConfig,
    registry: ModelRegistry,
    on_batch: Callable[[int], None] | None = None,
    on_served: Callable[[str, str, int], None] | None = None,
) -> Backend:
    """The backend ``config.backend`` names (Ray is imported only when asked for)."""
    if config.backend == "local":
        from splitinfer.cloud.backends.local import LocalBackend

        return LocalBackend(config, on_batch)
    if config.backend == "ray":
        from splitinfer.cloud.backends.ray_serve import RayBackend

        return RayBackend(config, registry, on_batch, on_served)
    raise ValueError(f"unknown backend {config.backend!r}; choose one of {', '.join(BACKENDS)}")
