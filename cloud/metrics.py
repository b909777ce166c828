"""Prometheus metrics of one cloud worker (a registry per worker, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class WorkerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "splitinfer_requests", "Inference requests answered, by status", ["status"], registry=self.registry
        )
        self.latency = Histogram(
            "splitinfer_request_seconds",
            "Time from a request's arrival to its answer",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.queue_depth = Gauge("splitinfer_queue_depth", "Samples waiting or running", registry=self.registry)
        self.batch_size = Histogram(
            "splitinfer_batch_size",
            "Samples per executed batch",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )

        self.held_bytes = Gauge(
            "splitinfer_held_bytes", "Bytes of requests and unsent answers held (max_queued_bytes caps it)",
            registry=self.registry,
        )
        self.answer_cache_bytes = Gauge(
            "splitinfer_answer_cache_bytes", "Output bytes of answers kept for retries", registry=self.registry
        )

        self.served = Counter(
            "splitinfer_backend_answers",
            "Answers by the backend replica that computed them (ray backend: replica id, node id, pid)",
            ["replica", "node", "pid"],
            registry=self.registry,
        )

        # model updates (cloud/updates.py): versions switched to, versions refused, rollbacks
        self.updates = Counter("splitinfer_model_updates", "Current-version changes served", registry=self.registry)
        self.update_refusals = Counter(
            "splitinfer_model_update_refusals", "Store versions refused (bad signature or hash)", registry=self.registry
        )
        self.rollbacks = Counter("splitinfer_model_rollbacks", "Rollbacks to an earlier version", registry=self.registry)

        # LM sessions (cloud/sessions.py, cloud/session_handlers.py)
        self.sessions_open = Gauge("splitinfer_sessions_open", "LM sessions open", registry=self.registry)
        self.session_bytes = Gauge(
            "splitinfer_session_bytes", "KV-cache bytes held by LM sessions (session_max_bytes caps it)",
            registry=self.registry,
        )
        self.session_evictions = Counter(
            "splitinfer_session_evictions", "LM sessions dropped by the worker, by reason (ttl, count, bytes)",
            ["reason"], registry=self.registry,
        )
        self.session_steps = Counter(
            "splitinfer_session_steps", "LM session steps answered, by kind (prefill, decode, verify)", ["kind"],
            registry=self.registry,
        )
        self.session_batch_size = Histogram(
            "splitinfer_session_batch_size", "Session steps per batched model run", buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
