"""Which generation mode to run, and how many tokens the draft proposes per round.

``--mode auto`` picks one mode per generation (edge, cloud, split, speculative) from the
live link estimate (RTT, uplink: :class:`~splitinfer.adapt.estimator.LinkEstimator`), the
measured draft acceptance (:class:`AcceptanceMeter`, a running mean) and the cost model
(:class:`~splitinfer.adapt.lmcost.LMCost`): the mode with the least predicted time for the
whole generation, ``ttft + (max_tokens - 1) * ms_per_token`` priced at the generation's
middle context. During a speculative generation :meth:`GenPolicy.best_k` re-picks the draft
length k every round from the same figures (the acceptance moves as drafts are verified).

The cloud's speed is learned, not assumed: the policy starts from the edge's own profile
divided by ``cloud_speedup`` and rescales it from the ``server_ms`` the worker reports
per step (:meth:`GenPolicy.observe_cloud`). ``draft`` (the draft model alone) is never
chosen here: it is the fallback when the cloud cannot answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from splitinfer.adapt.lmcost import LMCost, LMProfile
from splitinfer.errors import UserError

__all__ = ["AUTO_MODES", "AcceptanceMeter", "GenChoice", "GenPolicy"]

AUTO_MODES = ("edge", "cloud", "split", "speculative")
DEFAULT_ACCEPTANCE = 0.6  # before any draft was verified (a small draft of the same data)


class AcceptanceMeter:
    """Per-draft-token acceptance as a running mean over verify rounds.

    A round of k drafts with n accepted is n successes and, when n < k, one failure (the
    drafts after the first rejection were never judged): the geometric maximum-likelihood
    estimate with censoring. A prior of ``prior_weight`` pseudo-trials at ``prior`` keeps
    the first rounds from swinging k to an extreme; ``decay`` < 1 forgets old rounds so the
    mean follows a change of text."""

    def __init__(self, prior: float = DEFAULT_ACCEPTANCE, prior_weight: float = 4.0, decay: float = 0.98) -> None:
        if not 0.0 <= prior <= 1.0 or prior_weight < 0 or not 0 < decay <= 1:
            raise UserError("acceptance prior must be in [0, 1], its weight >= 0, decay in (0, 1]")
        self.prior, self.prior_weight, self.decay = prior, prior_weight, decay
        self.accepted = 0.0
        self.judged = 0.0
        self.rounds = 0
        self.drafted = 0  # totals, undecayed: what a record reports
        self.total_accepted = 0

    def observe(self, accepted: int, k: int) -> None:
        if not 0 <= accepted <= k:
            raise ValueError(f"{accepted} accepted of {k} drafts")
        self.accepted = self.accepted * self.decay + accepted
        self.judged = self.judged * self.decay + accepted + (1 if accepted < k else 0)
        self.rounds += 1
        self.drafted += k
        self.total_accepted += accepted

    @property
    def value(self) -> float:
        return (self.accepted + self.prior * self.prior_weight) / (self.judged + self.prior_weight) if (
            self.judged + self.prior_weight) > 0 else self.prior  # fmt: skip


@dataclass(frozen=True)
class GenChoice:
    """A mode (and its k or cut) with the predictions behind it."""

    mode: str
    k: int = 0  # speculative: draft tokens per round
    cut: int | None = None  # split: blocks [0, cut) on the edge
    ms_per_token: float = math.nan
    total_ms: float = math.nan  # predicted ttft + (max_tokens - 1) * ms_per_token
    reason: str = ""
    table: dict[str, float] = field(default_factory=dict)  # every candidate's predicted total ms

    def to_json(self) -> dict[str, Any]:
        r = lambda v: None if v is None or not math.isfinite(v) else round(v, 3)  # noqa: E731
        return {"mode": self.mode, "k": self.k, "cut": self.cut, "predicted_ms_per_token": r(self.ms_per_token),
                "predicted_total_ms": r(self.total_ms), "reason": self.reason,
                "predicted": {m: r(v) for m, v in self.table.items()}}  # fmt: skip


class GenPolicy:
    """Mode and draft length from profiles, the link and the acceptance (module docstring)."""

    def __init__(
        self,
        edge: LMProfile,
        draft: LMProfile | None,
        *,
        cloud: LMProfile | None = None,
        cloud_speedup: float = 1.0,
        k_max: int = 8,
        max_ctx: int = 512,
        sampled: bool = False,
        modes: tuple[str, ...] = AUTO_MODES,
    ) -> None:
        if not cloud_speedup > 0 or k_max < 1:
            raise UserError("cloud_speedup must be positive and k_max >= 1")
        unknown = set(modes) - set(AUTO_MODES)
        if unknown:
            raise UserError(f"unknown generation mode(s) {sorted(unknown)}: one of {', '.join(AUTO_MODES)}")
        self.edge, self.draft = edge, draft
        self._cloud_base = cloud if cloud is not None else edge.slowdown(1.0 / (cloud_speedup * edge.slowdown_factor))
        self.cloud_scale = 1.0  # learned: measured server ms / the base profile's prediction
        self.draft_scale = 1.0  # learned: measured drafting ms here / the draft profile's prediction
        self.k_max, self.max_ctx, self.sampled = k_max, max_ctx, sampled
        self.modes = modes

    # -- learning ------------------------------------------------------------------------
    def set_sampled(self, sampled: bool) -> None:
        """Price speculative rounds with (sampled) or without the draft's q on the uplink."""
        self.sampled = sampled

    @property
    def cloud(self) -> LMProfile:
        return self._cloud_base if self.cloud_scale == 1.0 else self._cloud_base.slowdown(self.cloud_scale)

    def observe_cloud(self, new_tokens: int, context: int, server_ms: float, *, prefill: bool = False) -> None:
        """One whole-model step's ``server_ms`` (cut 0): rescale the cloud's profile (EWMA 0.3)."""
        if not (math.isfinite(server_ms) and server_ms > 0) or new_tokens < 1:
            return
        base = self._cloud_base
        predicted = (base.prefill_ms(new_tokens) if prefill else base.verify_ms(new_tokens, max(context, 1))).total
        if predicted <= 0:
            return
        ratio = min(max(server_ms / predicted, 1e-3), 1e3)
        self.cloud_scale = 0.7 * self.cloud_scale + 0.3 * ratio

    @property
    def draft_profile(self) -> LMProfile | None:
        """The draft's profile rescaled by what drafting really took here (generation loop included)."""
        if self.draft is None or self.draft_scale == 1.0:
            return self.draft
        return self.draft.slowdown(self.draft_scale)

    def observe_draft(self, k: int, context: int, ms: float) -> None:
        """One round's drafting of ``k`` tokens took ``ms`` here: rescale the draft (EWMA 0.3).

        The profile times the model's parts only; a round also pays the sampling loop, the
        thread hop and (on a throttled device) the quota waits, which it cannot see."""
        if self.draft is None or k < 1 or not (math.isfinite(ms) and ms > 0):
            return
        predicted = k * self.draft.decode_ms(max(context, 1)).total
        if predicted <= 0:
            return
        ratio = min(max(ms / predicted, 1e-3), 1e3)
        self.draft_scale = 0.7 * self.draft_scale + 0.3 * ratio

    # -- predictions ---------------------------------------------------------------------
    def cost(self, context: int) -> LMCost:
        return LMCost(self.edge, self.cloud, context=max(1, min(context, self.max_ctx)))

    def best_k(self, rtt_ms: float, mbit: float, acceptance: float, context: int, *, k_limit: int | None = None) -> tuple[int, float]:
        """The draft length with the least predicted ms per token (ties: the shorter)."""
        if self.draft is None:
            raise UserError("speculative decoding needs the draft's profile")
        cost = self.cost(context)
        top = max(1, min(self.k_max, k_limit if k_limit is not None else self.k_max))
        best = min(
            ((cost.speculative_ms_per_token(k, acceptance, rtt_ms, mbit, self.draft_profile, sampled=self.sampled), k)
             for k in range(1, top + 1)))  # fmt: skip
        return best[1], best[0]

    def choose(
        self,
        rtt_ms: float | None,
        mbit: float | None,
        *,
        prompt_len: int,
        max_tokens: int,
        acceptance: float = DEFAULT_ACCEPTANCE,
        cloud_ok: bool = True,
    ) -> GenChoice:
        """The mode of one generation. No cloud (or no link estimate yet): edge."""
        if not cloud_ok:
            return GenChoice("edge", reason="no cloud reachable")
        rtt = 0.0 if rtt_ms is None else max(0.0, rtt_ms)
        bw = math.inf if mbit is None or not mbit > 0 else mbit
        context = prompt_len + max(max_tokens, 1) // 2
        cost = self.cost(context)
        n = max(max_tokens, 1)
        table: dict[str, float] = {}
        best: GenChoice | None = None
        for mode in self.modes:
            k, cut = 0, None
            if mode == "speculative":
                if self.draft is None:
                    continue
                k, per = self.best_k(rtt, bw, acceptance, context)
            elif mode == "split":
                if cost.n_layers < 2:
                    continue
                cut, per = cost.best_cut(rtt, bw)
            else:
                per = cost.ms_per_token(mode, rtt, bw)
            ttft = cost.ttft_ms(prompt_len, mode, rtt, bw, cut=cut, draft=self.draft_profile)
            total = ttft + (n - 1) * per
            table[mode] = total
            if best is None or total < best.total_ms:
                best = GenChoice(mode, k, cut, per, total)
        if best is None:
            return GenChoice("edge", reason="no mode to compare")
        reason = f"least predicted time at rtt {rtt:.1f} ms, {bw:.3g} Mbit/s, acceptance {acceptance:.2f}"
        return GenChoice(best.mode, best.k, best.cut, best.ms_per_token, best.total_ms, reason, table)

