"""Model update routes of a worker, and keeping its registry in step with its store.

    GET /v1/models/<id>/versions                  versions, and the rollout state
    GET /v1/models/<id>/manifest?version=V        {"manifest": {...}, "signature": "..."}
    GET /v1/models/<id>/tensors?version=V&names=a,b[&offset=N]
                                                  only those tensors, as safetensors bytes;
                                                  resumable (``offset`` or ``Range: bytes=N-``)
    POST /v1/models/<id>/report                   a canary edge's requests, disagreements and
                                                  errors: past the threshold, the canary stops

They are /v1/ paths: behind the ``infer`` scope when tokens are on (cloud/auth.py). Limits:
``update_max_names`` names per request, ``update_max_bytes`` per answer, names must be the
manifest's, and a model id never names a path (cloud/store.py hashes it).

:class:`StoreSync` re-reads the store's rollout state every ``store_poll_s`` and hosts the
current version as the model, and the previous, canary and stopped-canary versions (and the
weights the worker started with) by their hash, so during a rollout, and while a rolled-back
canary's edges switch back, every request finds its tail.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import re

from aiohttp import web

from splitinfer.cloud.metrics import WorkerMetrics
from splitinfer.cloud.registry import HostedModel, ModelRegistry
from splitinfer.cloud.store import ModelStore
from splitinfer.core.graph import capture
from splitinfer.errors import UserError
from splitinfer.models.loader import weights_hash
from splitinfer.models.signing import TrustSet
from splitinfer.models.spec import LoadedModel
from splitinfer.models.versions import UpdateRefused, load_tensors

__all__ = ["StoreSync", "add_update_routes"]

log = logging.getLogger(__name__)

MAX_NAMES_CHARS = 1 << 20  # the names parameter itself (a huge list is refused before it is split)


class StoreSync:
    """Hosts the store's versions in the registry; see the module docstring."""

    def __init__(self, store: ModelStore, registry: ModelRegistry, trust: TrustSet | None, metrics: WorkerMetrics,
                 max_bytes: int, max_names: int) -> None:  # fmt: skip
        self.store, self.registry, self.trust, self.metrics = store, registry, trust, metrics
        self.max_bytes, self.max_names = max_bytes, max_names
        self._base = {mid: h for mid, h in registry.models.items()}  # the weights it started with
        self._built: dict[tuple[str, int], HostedModel] = {}
        self._seen: dict[str, float] = {}
        self.versions_of: dict[str, int | None] = {}  # model id -> the version served as current
        self.reports: dict[tuple[str, int], list[int]] = {}  # (model, canary version) -> [requests, bad]

    def report(self, model_id: str, version: int, requests: int, bad: int) -> dict:
        """Add a canary edge's counts; stop the canary when its bad rate passes the threshold."""
        st = self.store.state(model_id)
        canary = st.get("canary") or {}
        if canary.get("version") != version:
            return {"canary": False}
        total = self.reports.setdefault((model_id, version), [0, 0])
        total[0] += requests
        total[1] += bad
        rate = total[1] / total[0] if total[0] else 0.0
        out = {"canary": True, "requests": total[0], "bad": total[1], "rate": round(rate, 4)}
        if total[0] >= int(canary.get("min_requests", 20)) and rate > float(canary.get("max_disagreement", 0.1)):
            why = f"error + disagreement rate {rate:.2%} over {total[0]} requests > {float(canary['max_disagreement']):.2%}"
            log.warning("stopping the canary of %s v%d: %s", model_id, version, why)
            self.store.rollback(model_id, why=why)
            self.metrics.rollbacks.inc()
            out["stopped"] = why
        return out

    def synced(self, model_id: str) -> bool:
        """Whether the registry hosts what the store's rollout state names now."""
        return self._seen.get(model_id) == self.store.state_mtime(model_id)

    def _host(self, model_id: str, version: int) -> HostedModel:
        key = (model_id, version)
        if key not in self._built:
            base = self._base[model_id]
            state = self.store.load_state(model_id, version, self.trust)  # UpdateRefused if tampered
            module = copy.deepcopy(base.loaded.module)
            module.load_state_dict(state, strict=True)
            module.eval()
            loaded = LoadedModel(name=base.loaded.name, module=module, example_input=base.loaded.example_input)
            gm, graph = capture(module, loaded.example_input)
            self._built[key] = HostedModel(model_id, loaded, gm, graph, weights_hash(module))
            log.info("hosting %s v%d (%s)", model_id, version, self._built[key].hash[:12])
        return self._built[key]

    def sync(self) -> None:
        """Re-read changed rollout states; build what they name (torch work: call in a thread)."""
        for model_id in list(self._base):
            mtime = self.store.state_mtime(model_id)
            if self._seen.get(model_id) == mtime:
                continue
            self._seen[model_id] = mtime
            st = self.store.state(model_id)
            if st.get("current") is None:
                continue
            # a stopped canary stays hosted by hash: its edges get answers until they switch back
            wanted = [st["current"], st.get("previous"), (st.get("canary") or {}).get("version"),
                      (st.get("stopped") or {}).get("version")]  # fmt: skip
            try:
                hosted = [self._host(model_id, v) for v in dict.fromkeys(w for w in wanted if w is not None)]
            except (UserError, RuntimeError) as exc:  # UpdateRefused, a state_dict that does not fit
                self.metrics.update_refusals.inc()
                log.error("not serving the new versions of %s: %s", model_id, exc)
                continue
            self.registry.host_versions(model_id, hosted[0], hosted[1:] + [self._base[model_id]])
            before = self.versions_of.get(model_id)
            if before is not None and before != st["current"]:
                (self.metrics.rollbacks if st["current"] < before else self.metrics.updates).inc()
            self.versions_of[model_id] = st["current"]

    async def run(self, every_s: float) -> None:
        while True:
            try:
                await asyncio.to_thread(self.sync)
            except Exception:  # a broken store must not stop the worker
                log.exception("store sync failed")
            await asyncio.sleep(every_s)


SYNC = web.AppKey("store_sync", StoreSync)


def _bad(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _model_id(request: web.Request) -> str:
    model_id = request.match_info["id"]
    ModelStore.check_id(model_id)  # UserError: answered 400
    return model_id


def _version(request: web.Request, sync: StoreSync, model_id: str) -> int:
    raw = request.query.get("version", "")
    if raw == "current" or raw == "":
        v = sync.store.state(model_id).get("current")
        if v is None:
            raise UserError(f"{model_id} has no current version")
        return int(v)
    if not re.fullmatch(r"\d{1,9}", raw):
        raise UserError("version must be a number")
    return int(raw)


async def versions(request: web.Request) -> web.Response:
    sync = request.app[SYNC]
    model_id = _model_id(request)
    listing = []
    for v in sync.store.versions(model_id):
        m, _ = sync.store.manifest(model_id, v)
        listing.append({"version": v, "total_hash": m.total_hash, "parent": m.parent, "created": m.created,
                        "notes": m.notes, "bytes": m.total_bytes})  # fmt: skip
    if not listing:
        return _bad(404, f"no versions of {model_id}")
    # the hashes this worker answers now: an edge switches only to a version whose tail is served
    reg = sync.registry
    serving = sorted({reg.models[model_id].hash, *reg.alternates.get(model_id, {})}) if model_id in reg.models else []
    synced = sync.synced(model_id)  # false for the moment between a store change and the next sync
    return web.json_response({"model": model_id, "versions": listing, "serving": serving, "synced": synced,
                              **sync.store.state(model_id)})  # fmt: skip


async def report(request: web.Request) -> web.Response:
    """A canary edge's counts since its last report: {"version", "requests", "disagreements", "errors"}."""
    sync = request.app[SYNC]
    model_id = _model_id(request)
    if (request.content_length or 0) > 4096:
        return _bad(413, "a report is a small JSON object")
    try:
        data = await request.json()
        counts = [int(data[k]) for k in ("version", "requests", "disagreements", "errors")]
    except (ValueError, KeyError, TypeError):
        return _bad(400, 'send {"version", "requests", "disagreements", "errors"} as JSON numbers')
    version, requests, disagreements, errors = counts
    if not (0 <= disagreements + errors <= requests <= 100_000) or min(counts) < 0:
        return _bad(400, "counts must satisfy 0 <= disagreements + errors <= requests <= 100000")
    out = await asyncio.to_thread(sync.report, model_id, version, requests, disagreements + errors)
    return web.json_response(out)


async def manifest(request: web.Request) -> web.Response:
    sync = request.app[SYNC]
    model_id = _model_id(request)
    m, sig = sync.store.manifest(model_id, _version(request, sync, model_id))
    return web.json_response({"manifest": m.to_json(), "signature": sig})


def _offset(request: web.Request) -> int:
    rng = request.headers.get("Range")
    if rng:
        match = re.fullmatch(r"bytes=(\d{1,12})-", rng.strip())
        if not match:
            raise UserError("only 'Range: bytes=N-' is supported")
        return int(match.group(1))
    raw = request.query.get("offset", "0")
    if not re.fullmatch(r"\d{1,12}", raw):
        raise UserError("offset must be a number")
    return int(raw)


async def tensors(request: web.Request) -> web.Response:
    from safetensors.torch import save

    sync = request.app[SYNC]
    model_id = _model_id(request)
    version = _version(request, sync, model_id)
    raw = request.query.get("names", "")
    if len(raw) > MAX_NAMES_CHARS:
        return _bad(413, f"names list longer than {MAX_NAMES_CHARS} characters")
    names = sorted({n for n in raw.split(",") if n})
    if not names:
        return _bad(400, "give names=a,b,... (the tensors to send)")
    if len(names) > sync.max_names:
        return _bad(413, f"{len(names)} names: at most {sync.max_names} per request")
    m, _ = sync.store.manifest(model_id, version)
    unknown = [n for n in names if n not in m.tensors]
    if unknown:
        return _bad(400, f"{len(unknown)} names are not tensors of {model_id} v{version}, e.g. {unknown[0][:80]!r}")
    size = sum(int(m.tensors[n]["bytes"]) for n in names)
    if size > sync.max_bytes:
        return _bad(413, f"{size} bytes of tensors: at most {sync.max_bytes} per request; ask for fewer names")
    offset = _offset(request)
    path = sync.store.tensors_path(model_id, version)
    body = await asyncio.to_thread(lambda: save(load_tensors(path, names)))  # deterministic: resumable
    if offset > len(body):
        return _bad(416, f"offset {offset} beyond the {len(body)} bytes")
    headers = {"X-Total-Length": str(len(body)), "Accept-Ranges": "bytes"}
    if offset:
        headers["Content-Range"] = f"bytes {offset}-{len(body) - 1}/{len(body)}"
    return web.Response(body=body[offset:], status=206 if offset else 200, headers=headers,
                        content_type="application/octet-stream")  # fmt: skip


@web.middleware
async def _user_errors(request: web.Request, handler):
    try:
        return await handler(request)
    except (UpdateRefused, UserError) as exc:
        if not request.path.startswith("/v1/models/"):
            raise
        return _bad(404 if "has no" in str(exc) or "no versions" in str(exc) else 400, str(exc))


def add_update_routes(app: web.Application, store_dir: str | None, registry: ModelRegistry,
                      trust_files: tuple[str, ...], metrics: WorkerMetrics, max_bytes: int, max_names: int,
                      poll_s: float) -> None:  # fmt: skip
    """Add the update routes and the store sync (with no store, the routes answer 404)."""
    if store_dir is None:
        return
    trust = TrustSet.from_files(trust_files) if trust_files else None
    sync = StoreSync(ModelStore(store_dir), registry, trust, metrics, max_bytes, max_names)
    app[SYNC] = sync
    app.middlewares.append(_user_errors)
    app.router.add_get("/v1/models/{id}/versions", versions)
    app.router.add_get("/v1/models/{id}/manifest", manifest)
    app.router.add_get("/v1/models/{id}/tensors", tensors)
    app.router.add_post("/v1/models/{id}/report", report)

    async def syncing(app: web.Application):
        # before the first request: the worker starts with its store's current versions
        await asyncio.to_thread(sync.sync)
        task = asyncio.create_task(sync.run(poll_s))
        yield
        task.cancel()

    app.cleanup_ctx.append(syncing)
