"""Signed model versions from a worker's store routes: what both followers of an edge share.

The split model's follower (:mod:`splitinfer.edge.updates`) and the fallback's
(:mod:`splitinfer.edge.fallback_updates`) ask the same routes (cloud/updates.py) the same
way: list the versions, take a version's manifest, check its Ed25519 signature against the
``--trust`` keys, download only the tensors whose sha256 differs from the edge's own (in
parts under the worker's per-answer limit, resuming a cut-off answer by offset) and verify
every tensor and the total hash. Anything wrong raises :class:`UpdateRefused` and changes
nothing; the caller builds and installs the new weights.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

import aiohttp
import torch

from splitinfer.edge.config import AgentConfig
from splitinfer.edge.tls import Trust, decide
from splitinfer.models.signing import TrustSet
from splitinfer.models.versions import Manifest, UpdateRefused, delta_names, tensor_sha256, verify_tensors

__all__ = ["SignedFetcher"]

log = logging.getLogger(__name__)

PART_BYTES = 64 * 2**20  # tensors asked for in parts of about this many bytes
PART_NAME_CHARS = 6000  # and of names this long at most (a worker's request line is limited to 8 KiB)
RETRIES = 3


class SignedFetcher:
    """One worker URL, the agent's TLS/token rule for it, and the trusted signing keys."""

    def __init__(self, url: str, cfg: AgentConfig, counters: dict[str, Any]) -> None:
        self.url = url
        # the same TLS settings and token rule as the agent's CloudClient for this (user-chosen) URL
        link = decide(url, static=True, tls=cfg.tls, has_token=cfg.token is not None)
        assert isinstance(link, Trust)  # a static URL is always allowed
        self.link = link
        # per request: the context (CA, client certificate); a pin goes on the connector
        self._ssl: Any = link.ssl_context if link.ssl_context is not None else True
        self.trust = TrustSet.from_files(cfg.trust)
        self.token = cfg.token
        self.counters = counters  # bytes_downloaded is counted here

    def session(self) -> aiohttp.ClientSession:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token and self.link.send_token else {}
        fingerprint = aiohttp.Fingerprint(bytes.fromhex(self.link.pin)) if self.link.pin else True
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=fingerprint), headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=300))  # fmt: skip

    async def follow(self, check: Callable[[aiohttp.ClientSession], Awaitable[None]], poll_s: float, what: str,
                     quiet: bool = False) -> None:  # fmt: skip
        """``check`` every ``poll_s`` on one session, forever: a refused update is counted
        (``refusals``, ``last_error``), any other failure logged (debug when ``quiet``: e.g. a
        model with no versions yet), and none stops the following."""
        async with self.session() as session:
            while True:
                try:
                    await check(session)
                except UpdateRefused as exc:
                    self.counters["refusals"] += 1
                    self.counters["last_error"] = str(exc)
                    log.error("%s: update refused: %s", what, exc)
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
                    log.log(logging.DEBUG if quiet else logging.INFO, "%s: update check failed: %s", what, exc)
                except Exception:  # e.g. building the new weights failed: keep following, retry next poll
                    log.warning("%s: update check failed", what, exc_info=True)
                await asyncio.sleep(poll_s)

    async def json(self, session: aiohttp.ClientSession, path: str, **params: str) -> dict:
        async with session.get(self.url + path, params=params, ssl=self._ssl) as resp:
            if resp.status != 200:
                raise aiohttp.ClientError(f"{path}: HTTP {resp.status}: {(await resp.text())[:200]}")
            return await resp.json()

    async def post(self, session: aiohttp.ClientSession, path: str, body: dict) -> int:
        async with session.post(self.url + path, json=body, ssl=self._ssl) as resp:
            return resp.status

    async def signed_state(self, session: aiohttp.ClientSession, model: str, version: int,
                           own: dict[str, torch.Tensor]) -> tuple[Manifest, dict[str, torch.Tensor], int]:  # fmt: skip
        """Version ``version`` of ``model`` as a verified state dict built on ``own`` (the
        tensors that did not change are not downloaded); also how many tensors were."""
        got = await self.json(session, f"/v1/models/{model}/manifest", version=str(version))
        manifest = Manifest.from_json(got.get("manifest"))
        if manifest.model != model or manifest.version != version:
            raise UpdateRefused(f"the cloud sent the manifest of {manifest.model} v{manifest.version}")
        self.trust.verify(manifest, got.get("signature"))
        have = await asyncio.to_thread(lambda: {k: tensor_sha256(v) for k, v in own.items()})
        names = delta_names(have, manifest)
        fresh: dict[str, torch.Tensor] = {}
        for part in _parts(names, manifest):
            fresh.update(await self._download(session, manifest, part))
        state = {k: v for k, v in own.items() if k in manifest.tensors}
        state.update(fresh)
        await asyncio.to_thread(verify_tensors, manifest, state)  # UpdateRefused: nothing changes
        return manifest, state, len(names)

    async def _download(self, session: aiohttp.ClientSession, manifest: Manifest, names: list[str]) -> dict[str, torch.Tensor]:
        """Some tensors as safetensors bytes, resumed from where a cut-off answer stopped."""
        from safetensors.torch import load

        body = bytearray()
        params = {"version": str(manifest.version), "names": ",".join(names)}
        for attempt in range(RETRIES):
            try:
                async with session.get(f"{self.url}/v1/models/{manifest.model}/tensors",
                                       params={**params, "offset": str(len(body))}, ssl=self._ssl) as resp:  # fmt: skip
                    if resp.status not in (200, 206):
                        raise aiohttp.ClientError(f"tensors: HTTP {resp.status}: {(await resp.text())[:200]}")
                    total = int(resp.headers.get("X-Total-Length", "0"))
                    async for chunk in resp.content.iter_chunked(1 << 16):
                        body += chunk
                        self.counters["bytes_downloaded"] += len(chunk)
                if len(body) >= total:
                    break
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                if attempt == RETRIES - 1:
                    raise
                log.info("tensor download cut off at %d bytes (%s): resuming", len(body), exc)
        try:
            got = await asyncio.to_thread(load, bytes(body))
        except Exception as exc:  # a corrupt safetensors body
            raise UpdateRefused(f"tensors of v{manifest.version} are not valid safetensors: {exc}") from None
        if set(got) != set(names):
            raise UpdateRefused(f"the cloud sent other tensors than asked for v{manifest.version}")
        return got


def _parts(names: list[str], manifest: Manifest) -> list[list[str]]:
    """Names in groups of about PART_BYTES (each under the worker's per-answer limit)."""
    parts: list[list[str]] = [[]]
    size = chars = 0
    for n in names:
        b = int(manifest.tensors[n]["bytes"])
        if parts[-1] and (size + b > PART_BYTES or chars + len(n) + 1 > PART_NAME_CHARS):
            parts.append([])
            size = chars = 0
        parts[-1].append(n)
        size += b
        chars += len(n) + 1
    return [p for p in parts if p]
