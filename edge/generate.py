"""Token generation on the edge, alone or with a cloud worker: the :class:`Generator`.

    gen = Generator("bytelm", cloud="http://127.0.0.1:8470")
    async for tok in gen.generate("def main(", max_tokens=64, mode="auto"):
        print(tok.text, end="", flush=True)          # tok.id, tok.text, tok.source
    record = gen.last_record()                       # ttft_ms, tpot_ms, bytes_up, ...
    await gen.aclose()

The generator holds the teacher and its draft (``lm_spec(name).draft``) with their own KV
caches and one cloud client. Modes (see :mod:`splitinfer.edge.gen_modes`): ``edge`` (the
teacher here), ``cloud`` (token ids up, the cloud runs the whole model), ``split`` (blocks
[0, c) here, the hidden state up), ``speculative`` (the draft proposes k tokens here, the
cloud verifies them in one round trip; k from :class:`~splitinfer.adapt.genpolicy.GenPolicy`
unless fixed), ``auto`` (the policy's choice for this generation) and ``draft``.

Failures never lose or double a token: the token history is the only truth. A
``session_lost`` answer reopens a session and re-sends the whole history; a cloud that
does not answer (unreachable, closed, slower than ``timeout_s`` per step) hands over to
the draft alone (source ``draft``) while a background task retries the cloud every
``retry_s``; once it answers, the session is rebuilt from the history and the mode
resumes. Without a draft the teacher runs here instead (source ``edge``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any, AsyncGenerator, AsyncIterator

import torch

from splitinfer.adapt.estimator import LinkEstimator
from splitinfer.adapt.genpolicy import AcceptanceMeter, GenChoice, GenPolicy
from splitinfer.edge.client import CloudError, CloudUnavailable
from splitinfer.edge.gen_local import LocalLM, Token, TorchThread, Utf8Stream
from splitinfer.edge.gen_modes import CloudRunner, LocalRunner, Runner, SessionSpec, SpeculativeRunner
from splitinfer.edge.gen_record import GenRecorder
from splitinfer.edge.lm_client import LMClient, SessionLost, lm_client
from splitinfer.edge.tls import ClientTLS
from splitinfer.errors import UserError
from splitinfer.models.lm import CausalLM

__all__ = ["GEN_MODES", "Generator", "Token"]

log = logging.getLogger(__name__)

GEN_MODES = ("auto", "edge", "cloud", "split", "speculative", "draft")
CLOUD_MODES = ("cloud", "split", "speculative")
LINK_FRESH_S = 30.0  # auto re-pings the worker only when its RTT estimate is older than this
MAX_LOST_IN_A_ROW = 3  # session_lost this many times without a token: treat the cloud as gone


class Generator:
    """Generates tokens with a local teacher/draft and a cloud worker; module docstring."""

    def __init__(
        self,
        model: str = "bytelm",
        *,
        cloud: str | None = None,
        token: str | None = None,
        tls: ClientTLS | None = None,
        teacher: CausalLM | None = None,  # a model object instead of the zoo's (tests, own models)
        draft: CausalLM | None = None,
        draft_name: str | None = None,  # default: lm_spec(model).draft
        threads: int | None = None,
        timeout_s: float = 10.0,  # one cloud step; longer -> the draft takes over
        connect_timeout_s: float = 3.0,
        retry_s: float = 1.0,  # while on the draft: how often to try the cloud again
        k: int | None = None,  # fixed draft length; None: adaptive (policy)
        k_max: int = 8,
        cut: int | None = None,  # split cut; None: the policy's best (else the middle block)
        hidden_dtype: str = "float32",  # split: the hidden state on the wire (float32 | float16)
        rtt_ms: float | None = None,  # link priors for auto (None: measured)
        bandwidth_mbit: float | None = None,
        cloud_speedup: float = 1.0,  # auto's prior: the cloud is this many times faster (then learned)
        check_weights: bool = True,  # send the teacher's weights hash: the worker refuses others
    ) -> None:
        if hidden_dtype not in ("float32", "float16"):
            raise UserError(f"hidden dtype must be float32 or float16, got {hidden_dtype!r}")
        if k is not None and k < 1:
            raise UserError(f"the draft length k must be at least 1, got {k}")
        if not timeout_s > 0 or not retry_s > 0:
            raise UserError("timeout_s and retry_s must be positive")
        self.model_name = model
        self.cloud_url = cloud
        self._token, self._tls = token, tls
        self._teacher_given, self._draft_given, self._draft_name = teacher, draft, draft_name
        self.threads = threads
        self.timeout_s, self.connect_timeout_s, self.retry_s = timeout_s, connect_timeout_s, retry_s
        self.k, self.k_max, self.cut = k, k_max, cut
        self.hidden_dtype = torch.float16 if hidden_dtype == "float16" else torch.float32
        self.cloud_speedup = cloud_speedup
        self.check_weights = check_weights
        self.link = LinkEstimator(initial_mbit=bandwidth_mbit, initial_rtt_ms=rtt_ms)
        self.acceptance = AcceptanceMeter()
        self.teacher: CausalLM | None = None
        self.draft: CausalLM | None = None
        self.weights: str | None = None
        self.client: LMClient | None = None
        self.policy: GenPolicy | None = None
        self._torch: TorchThread | None = None
        self._started = False
        self._start_lock = asyncio.Lock()
        self._record: dict[str, Any] = {}
        self._probed = False
        self._link_at: float | None = None  # monotonic time of the last ping round

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        """Load the models (off the event loop); a no-op once started."""
        async with self._start_lock:
            if self._started:
                return
            from splitinfer.models.lmzoo import is_lm, lm_spec, lm_weights_hash, load_lm

            if self._teacher_given is None and not is_lm(self.model_name):
                raise UserError(f"unknown LM {self.model_name!r}; known: {', '.join(_lm_names())}")
            self._torch = TorchThread(self.threads)
            self.teacher = self._teacher_given or await self._torch.run(load_lm, self.model_name)
            draft_name = self._draft_name or (lm_spec(self.model_name).draft if is_lm(self.model_name) else None)
            self.draft = self._draft_given or (await self._torch.run(load_lm, draft_name) if draft_name else None)
            if self.check_weights:
                self.weights = await self._torch.run(lm_weights_hash, self.teacher)
            if self.cloud_url:
                self.client = lm_client(self.cloud_url, self._token, self._tls, connect_timeout_s=self.connect_timeout_s)
            self._started = True

    async def aclose(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None
        if self._torch is not None:
            self._torch.close()
            self._torch = None
        self._started = False

    async def __aenter__(self) -> "Generator":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def last_record(self) -> dict[str, Any]:
        """The JSON record of the latest generation (ongoing: so far)."""
        return dict(self._record)

    @property
    def record(self) -> dict[str, Any]:
        return self.last_record()

    # -- the policy ------------------------------------------------------------------------
    async def _policy(self, sampled: bool) -> GenPolicy:
        if self.policy is None:
            from splitinfer.adapt.lmcost import profile_lm

            assert self._torch is not None and self.teacher is not None
            edge = await self._torch.run(lambda: profile_lm(self.teacher, self.model_name, repeats=3))
            draft = await self._torch.run(lambda: profile_lm(self.draft, "draft", repeats=3)) if self.draft else None
            self.policy = GenPolicy(edge, draft, cloud_speedup=self.cloud_speedup, k_max=self.k_max,
                                    max_ctx=self.teacher.cfg.max_ctx)  # fmt: skip
        self.policy.set_sampled(sampled)
        return self.policy

    async def _measure_link(self) -> bool:
        """Connect and take RTT (and, once, uplink) samples; False: no cloud answers."""
        if self.client is None:
            return False
        try:
            await self.client.connect()
            # Every cloud step feeds the RTT estimate (and its time): a fresh one needs no pings;
            # a stale one is refreshed by one, none at all takes three.
            fresh = self._link_at is not None and time.monotonic() - self._link_at < LINK_FRESH_S
            if not fresh or self.link.rtt_ms is None:
                for _ in range(1 if self.link.rtt_ms is not None else 3):
                    self.link.observe_rtt(await self.client.ping(self.connect_timeout_s))
                self._link_at = time.monotonic()
            if self.link.bandwidth_mbit is None and not self._probed:
                self._probed = True
                mbit = await self.client.probe_mbit(64_000, self.link.rtt_ms or 0.0, self.timeout_s)
                self.link.filter.update(mbit)
        except (CloudUnavailable, CloudError) as exc:
            log.info("auto: the cloud does not answer (%s)", exc)
            return False
        return True

    async def _choose(self, prompt_len: int, max_tokens: int, sampled: bool) -> GenChoice:
        ok = await self._measure_link()
        policy = await self._policy(sampled)
        return policy.choose(self.link.rtt_ms, self.link.bandwidth_mbit, prompt_len=prompt_len,
                             max_tokens=max_tokens, acceptance=self.acceptance.value, cloud_ok=ok)  # fmt: skip

    def _k_for(self, context: int, room: int) -> int:
        if self.k is not None or self.policy is None:
            return self.k if self.k is not None else 4
        rtt = self.link.rtt_ms or 0.0
        mbit = self.link.bandwidth_mbit or math.inf
        return self.policy.best_k(rtt, mbit, self.acceptance.value, context, k_limit=room)[0]

    # -- one generation ----------------------------------------------------------------------
    async def generate(
        self,
        prompt: str | list[int],
        *,
        max_tokens: int = 64,
        mode: str = "auto",
        temperature: float = 0.0,
        seed: int = 0,
    ) -> AsyncIterator[Token]:
        """Stream the tokens after ``prompt``; the record is :meth:`last_record` afterwards."""
        if mode not in GEN_MODES:
            raise UserError(f"unknown mode {mode!r}: one of {', '.join(GEN_MODES)}")
        if max_tokens < 1:
            raise UserError(f"max tokens must be at least 1, got {max_tokens}")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise UserError(f"temperature must be >= 0, got {temperature}")
        await self.start()
        assert self.teacher is not None and self._torch is not None
        history = list(prompt.encode("utf-8")) if isinstance(prompt, str) else [int(t) for t in prompt]
        max_ctx = self.teacher.cfg.max_ctx
        if not history:
            raise UserError("the prompt is empty")
        if any(not 0 <= t < 256 for t in history):
            raise UserError("prompt token ids must be bytes (0..255)")
        if len(history) >= max_ctx:
            raise UserError(f"the prompt has {len(history)} tokens; the model's context is {max_ctx}")
        if mode in CLOUD_MODES and self.client is None:
            raise UserError(f"mode {mode!r} needs a cloud: pass --cloud URL")
        if mode == "draft" and self.draft is None:
            raise UserError(f"{self.model_name} has no draft model")
        gen = torch.Generator().manual_seed(seed)
        choice: GenChoice | None = None
        chosen = mode
        if mode == "auto":
            choice = await self._choose(len(history), max_tokens, temperature > 0)
            chosen = choice.mode
        elif mode == "speculative" and self.k is None:
            await self._policy(temperature > 0)
        rec = GenRecorder(chosen, mode, self.client, len(history), choice.to_json() if choice is not None else None)
        primary = self._runner(chosen, choice, temperature, seed, gen, rec)
        fallback = self._fallback_runner(temperature, gen)
        self._record = rec.record()
        stream = self._loop(history, max_tokens, max_ctx, primary, fallback, rec)
        try:
            async for tok in stream:
                yield tok
        finally:
            await stream.aclose()  # a caller that stops early: close the session now, not at GC

    def _runner(self, mode: str, choice: GenChoice | None, temperature: float, seed: int,
                gen: torch.Generator, rec: GenRecorder) -> Runner:  # fmt: skip
        assert self.teacher is not None and self._torch is not None
        if mode == "edge":
            return LocalRunner(LocalLM(self.teacher), self._torch, "edge", temperature, gen)
        if mode == "draft":
            assert self.draft is not None
            return LocalRunner(LocalLM(self.draft), self._torch, "draft", temperature, gen)
        assert self.client is not None
        spec = SessionSpec(self.model_name, self.weights, temperature, seed, self.timeout_s)
        if mode == "split":
            n = self.teacher.n_layers
            cut = self.cut or (choice.cut if choice is not None and choice.cut else max(1, n // 2))
            if not 0 < cut < n:
                raise UserError(f"split cut must be in 1..{n - 1}, got {cut}")
            rec.set_cut(cut)
            return CloudRunner(self.client, spec, self._torch, LocalLM(self.teacher, cut), self.hidden_dtype,
                               on_step=self._observe_step)  # fmt: skip
        if mode == "speculative":
            if self.draft is None:
                raise UserError(f"{self.model_name} has no draft model for speculative decoding")

            def verified(n: int, k: int) -> None:
                self.acceptance.observe(n, k)
                rec.verified(n, k)

            return SpeculativeRunner(self.client, spec, self._torch, LocalLM(self.draft), self._k_for, gen,
                                     on_step=self._observe_step, on_verify=verified,
                                     on_draft=self._observe_draft)  # fmt: skip
        return CloudRunner(self.client, spec, self._torch, on_step=self._observe_step)

    def _fallback_runner(self, temperature: float, gen: torch.Generator) -> Runner:
        assert self.teacher is not None and self._torch is not None
        if self.draft is not None:
            return LocalRunner(LocalLM(self.draft), self._torch, "draft", temperature, gen)
        return LocalRunner(LocalLM(self.teacher), self._torch, "edge", temperature, gen)

    def _observe_step(self, new: int, context: int, server_ms: float, prefill: bool) -> None:
        """A cloud step's timing: the RTT estimate and the cloud's speed."""
        last = self.client.last if self.client is not None else None
        if last is not None:
            self.link.observe_rtt(last.network_ms)
            self._link_at = time.monotonic()
        if self.policy is not None and server_ms > 0:
            self.policy.observe_cloud(new, context, server_ms, prefill=prefill)

    def _observe_draft(self, k: int, context: int, ms: float) -> None:
        """A round's drafting time here: how fast the draft really is on this device."""
        if self.policy is not None:
            self.policy.observe_draft(k, context, ms)

    async def _cloud_back(self) -> bool:
        """Retry the cloud every retry_s (in the background) until it answers again."""
        assert self.client is not None
        while True:
            await asyncio.sleep(self.retry_s)
            try:
                await self.client.connect()
                await self.client.ping(self.connect_timeout_s)
                return True
            except (CloudUnavailable, CloudError) as exc:
                log.debug("the cloud still does not answer: %s", exc)

    async def _loop(self, history: list[int], max_tokens: int, max_ctx: int, primary: Runner, fallback: Runner,
                    rec: GenRecorder) -> AsyncGenerator[Token, None]:  # fmt: skip
        text = Utf8Stream()
        active = primary
        retry: asyncio.Task[bool] | None = None
        lost_in_a_row = 0
        reconnected_now = False
        produced = 0
        try:
            while produced < max_tokens and len(history) < max_ctx:
                if active is fallback and retry is not None and retry.done():
                    if retry.result():
                        log.info("the cloud answers again: back to %s", primary.source)
                        rec.notes.append(f"cloud back at token {produced}")
                        primary.reset()
                        active, retry = primary, None
                    else:
                        retry = asyncio.get_running_loop().create_task(self._cloud_back())
                room = min(max_tokens - produced, max_ctx - len(history))
                try:
                    ids = await active.advance(history, room)
                except SessionLost as exc:
                    lost_in_a_row += 1
                    rec.rebuilt()
                    log.info("session lost (%s): rebuilding from %d tokens of history", exc, len(history))
                    primary.reset()
                    if lost_in_a_row < MAX_LOST_IN_A_ROW:
                        continue
                    active, retry = self._to_fallback(primary, fallback, rec, f"session_lost: {exc}")
                    continue
                except (CloudUnavailable, CloudError) as exc:
                    primary.reset()
                    if not reconnected_now and not getattr(exc, "timeout", False):
                        reconnected_now = True  # the socket may just have closed (a restart): one retry at once
                        continue
                    active, retry = self._to_fallback(primary, fallback, rec, str(exc))
                    continue
                lost_in_a_row = 0
                reconnected_now = False
                ids = ids[:room]
                toks = [Token(t, text.push(t), active.source) for t in ids]
                history.extend(ids)
                produced += len(ids)
                rec.step(toks)
                self._record = rec.record()
                for tok in toks:
                    yield tok
        finally:
            if retry is not None:
                retry.cancel()
            self._record = rec.record()
            try:
                await asyncio.wait_for(primary.close(), 2.0)
            except (asyncio.TimeoutError, CloudUnavailable, CloudError, SessionLost):
                pass

    def _to_fallback(self, primary: Runner, fallback: Runner, rec: GenRecorder,
                     reason: str) -> tuple[Runner, asyncio.Task[bool] | None]:  # fmt: skip
        """Hand over to the draft (or the local teacher) and start retrying the cloud."""
        log.warning("the cloud cannot answer (%s): generating with the %s here", reason, fallback.source)
        rec.fell_back(reason, fallback.source)
        task = asyncio.get_running_loop().create_task(self._cloud_back()) if self.client is not None else None
        return fallback, task


def _lm_names() -> list[str]:
    from splitinfer.models.lmzoo import lm_names

    return lm_names()
