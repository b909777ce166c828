"""Token generation through the edge Generator against real workers on 127.0.0.1.

Every mode's greedy output equals the whole model's greedy output; sampled speculative
decoding follows the target's distribution (statistically); a lost session is rebuilt
from the token history with no token lost or doubled; a killed cloud hands over to the
draft and a restarted one takes over again; the record and the CLI's --json.

Most tests run tiny random-weight models (teacher LMConfig(2, 64, 4), draft (1, 32, 4))
served by an in-process worker; the process tests use the zoo's bytelm and its draft.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
from typing import AsyncIterator

import pytest
import torch

from splitinfer.adapt.genpolicy import AcceptanceMeter, GenPolicy
from splitinfer.adapt.lmcost import LMProfile, PartMs
from splitinfer.cloud.registry import HostedLM
from splitinfer.cloud.service import WorkerConfig
from splitinfer.cloud.worker import CloudWorker
from splitinfer.edge.generate import Generator
from splitinfer.edge.lm_client import LMClient
from splitinfer.models.lm import CausalLM, LMConfig
from splitinfer.models.lmzoo import lm_weights_hash, load_lm
from splitinfer.models.seeding import seeded
from splitinfer.models.speculative import probabilities
from splitinfer.util.procs import python_module

TINY = "tiny-lm"
PROMPT = "def f(x):\n    return"

RECORD_KEYS = ("ttft_ms", "tpot_ms", "tokens", "tokens_per_s", "mode", "draft_len", "acceptance",
               "bytes_up", "bytes_down", "round_trips", "per_token")  # fmt: skip


def tiny(cfg: LMConfig) -> CausalLM:
    model = seeded(lambda: CausalLM(cfg)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


TEACHER = tiny(LMConfig(2, 64, 4))
DRAFT = tiny(LMConfig(1, 32, 4))


@torch.no_grad()
def whole_greedy(model: CausalLM, prompt: list[int], n: int) -> list[int]:
    """The whole model's greedy continuation, no cache: the reference every mode must equal."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


async def tiny_worker(**config: object) -> CloudWorker:
    settings: dict[str, object] = {"port": 0, "advertise": False, "max_wait_ms": 1.0, **config}
    worker = CloudWorker(WorkerConfig(models=("bytelm-draft",), **settings))  # type: ignore[arg-type]
    await worker.start()
    # The test's own model, hosted next to the zoo's (a worker serves zoo names only).
    worker.service.registry.lms[TINY] = HostedLM(TINY, TEACHER, lm_weights_hash(TEACHER))
    return worker


@pytest.fixture
async def worker() -> AsyncIterator[CloudWorker]:
    w = await tiny_worker()
    yield w
    await w.stop()


def tiny_gen(url: str | None, **kw: object) -> Generator:
    return Generator(TINY, cloud=url, teacher=TEACHER, draft=DRAFT, **kw)  # type: ignore[arg-type]


async def run(gen: Generator, prompt: str | list[int] = PROMPT, **kw: object) -> tuple[list[int], list[str]]:
    ids, sources = [], []
    async for tok in gen.generate(prompt, **kw):  # type: ignore[arg-type]
        ids.append(tok.id)
        sources.append(tok.source)
    return ids, sources


async def test_every_mode_greedy_equals_the_whole_model(worker: CloudWorker) -> None:
    n = 40
    expected = whole_greedy(TEACHER, list(PROMPT.encode()), n)
    gen = tiny_gen(worker.url)
    try:
        for mode in ("edge", "cloud", "speculative", "auto"):
            ids, sources = await run(gen, max_tokens=n, mode=mode)
            assert ids == expected, mode
            rec = gen.last_record()
            assert rec["tokens"] == n and all(k in rec for k in RECORD_KEYS)
            assert set(sources) == {rec["mode"]}
            assert [t["token"] for t in rec["per_token"]] == ids
        rec = gen.last_record()
        assert rec["choice"]["mode"] == rec["mode"]  # auto says what it chose and why
    finally:
        await gen.aclose()
    for cut, dtype in ((1, "float32"),):
        gen = tiny_gen(worker.url, cut=cut, hidden_dtype=dtype)
        try:
            ids, sources = await run(gen, max_tokens=n, mode="split")
        finally:
            await gen.aclose()
        assert ids == expected and set(sources) == {"split"}
        rec = gen.last_record()
        assert rec["cut"] == cut and rec["round_trips"] == n + 1 and rec["bytes_up"] > n * 64 * 4


async def test_split_at_several_cuts_of_a_deeper_model() -> None:
    teacher = tiny(LMConfig(3, 48, 4))
    worker = await tiny_worker()
    worker.service.registry.lms["tiny3"] = HostedLM("tiny3", teacher, lm_weights_hash(teacher))
    expected = whole_greedy(teacher, list(PROMPT.encode()), 24)
    try:
        for cut in (1, 2):
            gen = Generator("tiny3", cloud=worker.url, teacher=teacher, draft=DRAFT, cut=cut)
            try:
                assert (await run(gen, max_tokens=24, mode="split"))[0] == expected, cut
            finally:
                await gen.aclose()
    finally:
        await worker.stop()


async def test_speculative_greedy_is_token_identical_for_every_k(worker: CloudWorker) -> None:
    n = 33
    expected = whole_greedy(TEACHER, list(PROMPT.encode()), n)
    for k in (1, 2, 3, 4):
        gen = tiny_gen(worker.url, k=k)
        try:
            ids, sources = await run(gen, max_tokens=n, mode="speculative")
        finally:
            await gen.aclose()
        rec = gen.last_record()
        assert ids == expected, k
        assert set(sources) == {"speculative"} and rec["draft_len"] <= k and 0 <= rec["acceptance"] <= 1
        assert rec["round_trips"] < n + 2  # one prefill, then rounds of up to k+1 tokens, one close


async def test_sampled_speculative_follows_the_target_distribution(worker: CloudWorker) -> None:
    """The second token (the first one a verify step produces) over many seeded trials,
    against its exact marginal sum_t1 p(t1) p(t2 | t1) computed here."""
    temperature, trials = 0.1, 300
    prompt = list(b"ab")
    with torch.no_grad():
        p1 = probabilities(TEACHER(torch.tensor([prompt]))[0, -1], temperature)
        seqs = torch.tensor([prompt + [t] for t in range(256)])
        p2 = probabilities(TEACHER(seqs)[:, -1], temperature)
        marginal = (p1[:, None] * p2).sum(0)
    counts = torch.zeros(256, dtype=torch.float64)
    gen = tiny_gen(worker.url, k=3)
    try:
        for seed in range(trials):
            ids, sources = await run(gen, prompt, max_tokens=4, mode="speculative", temperature=temperature, seed=seed)
            counts[ids[1]] += 1
    finally:
        await gen.aclose()
    empirical = counts / trials
    tv = 0.5 * float((empirical - marginal).abs().sum())
    # The draft's own distribution is far from the target's: a scheme that kept the drafts
    # would be at least this far off.
    with torch.no_grad():
        q2 = probabilities(DRAFT(seqs)[:, -1], temperature)
        draft_marginal = (p1[:, None] * q2).sum(0)
    far = 0.5 * float((draft_marginal - marginal).abs().sum())
    # What a correct sampler's TV at this many trials is (simulated draws from the marginal).
    g = torch.Generator().manual_seed(0)
    noise = sorted(0.5 * float((torch.bincount(torch.multinomial(marginal, trials, True, generator=g), minlength=256)
                                / trials - marginal).abs().sum()) for _ in range(200))  # fmt: skip
    assert tv < 1.5 * noise[197] < far, (tv, noise[197], far)
    # Chi-square over the bins with enough expected mass, the rest pooled.
    exp = marginal * trials
    big = exp >= 5
    obs_b = torch.cat([counts[big], counts[~big].sum()[None]])
    exp_b = torch.cat([exp[big], exp[~big].sum()[None]])
    chi2 = float(((obs_b - exp_b) ** 2 / exp_b.clamp(min=1e-9)).sum())
    dof = int(big.sum())
    assert chi2 < dof + 4 * (2 * dof) ** 0.5 + 10, (chi2, dof)


async def test_evicted_session_is_rebuilt_without_losing_a_token() -> None:
    worker = await tiny_worker(max_sessions=1)
    n = 30
    expected = whole_greedy(TEACHER, list(PROMPT.encode()), n)
    try:
        for mode in ("cloud", "speculative"):
            gen = tiny_gen(worker.url, k=2)
            other = LMClient(worker.url)
            ids: list[int] = []
            try:
                async for tok in gen.generate(PROMPT, max_tokens=n, mode=mode):
                    ids.append(tok.id)
                    if len(ids) in (5, 17):  # another caller's session evicts ours (max 1)
                        await other.open(TINY)
            finally:
                await gen.aclose()
                await other.close()
            rec = gen.last_record()
            assert ids == expected, mode
            assert rec["rebuilds"] >= 2 and set(rec["sources"]) == {mode}
    finally:
        await worker.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_restarted_worker_and_killed_cloud(cloud_process) -> None:  # type: ignore[no-untyped-def]
    """Restart between two tokens: the session is rebuilt, tokens identical. Kill: the draft
    takes over (source "draft"); back: the cloud again, every token consistent."""
    port = free_port()
    cp = cloud_process("-m", "bytelm", "--port", str(port))
    teacher, draft = load_lm("bytelm"), load_lm("bytelm-draft")
    prompt = list(PROMPT.encode())
    n = 24
    expected = whole_greedy(teacher, prompt, n)
    gen = Generator("bytelm", cloud=cp.url, retry_s=0.2)
    ids: list[int] = []
    try:
        async for tok in gen.generate(PROMPT, max_tokens=n, mode="cloud"):
            ids.append(tok.id)
            if len(ids) == 8:
                cp.kill()
                cp = await asyncio.to_thread(cloud_process, "-m", "bytelm", "--port", str(port))
        assert ids == expected and gen.last_record()["sources"] == {"cloud": n}
        # Killed mid-generation, back later: draft tokens in between, then the cloud.
        ids, sources = [], []
        async for tok in gen.generate(PROMPT, max_tokens=60, mode="cloud"):
            ids.append(tok.id)
            sources.append(tok.source)
            if len(ids) == 6:
                cp.kill()
            if len(ids) == 14:
                cp = await asyncio.to_thread(cloud_process, "-m", "bytelm", "--port", str(port))
                await asyncio.sleep(0.5)  # let the retry find it
        rec = gen.last_record()
    finally:
        await gen.aclose()
    assert len(ids) == 60 and sources[:6] == ["cloud"] * 6 and "draft" in sources
    assert sources[-1] == "cloud" and rec["fallbacks"] and rec["fallbacks"][0]["to"] == "draft"
    seq = prompt + ids
    with torch.no_grad():
        t_pred = teacher(torch.tensor([seq]))[0].argmax(-1).tolist()
        d_pred = draft(torch.tensor([seq]))[0].argmax(-1).tolist()
    for i, (tok, src) in enumerate(zip(ids, sources)):  # each token follows exactly the history before it
        pred = d_pred if src == "draft" else t_pred
        assert pred[len(prompt) + i - 1] == tok, (i, src)


def test_policy_prefers_speculative_on_a_slow_link_and_edge_on_a_fast_edge() -> None:
    def synthetic(name: str, block_ms: float, n_layers: int, d_model: int) -> LMProfile:
        """Decode costs block_ms per block, a prompt of T tokens 0.2 T of that, verify of n: 1 + 0.1 n."""
        part = lambda ms: PartMs(ms * 0.1, (ms,) * n_layers, ms * 0.2)  # noqa: E731
        return LMProfile(name, n_layers, d_model, prefill={t: part(block_ms * 0.2 * t) for t in (8, 64)},
                         decode={c: part(block_ms) for c in (16, 128)},
                         verify={n: {c: part(block_ms * (1 + 0.1 * n)) for c in (16, 128)} for n in (3, 5)})  # fmt: skip

    edge = synthetic("tiny", 1.0, 2, 64)
    draft = synthetic("draft", 0.3, 1, 32)
    slow_edge = GenPolicy(edge.slowdown(50), draft.slowdown(1), cloud=edge, k_max=6)
    choice = slow_edge.choose(80.0, 5.85, prompt_len=16, max_tokens=64, acceptance=0.9)
    assert choice.mode == "speculative" and 1 <= choice.k <= 6 and set(choice.table) >= {"edge", "cloud", "split"}
    assert slow_edge.choose(80.0, 5.85, prompt_len=16, max_tokens=64, cloud_ok=False).mode == "edge"
    fast_edge = GenPolicy(edge, draft, cloud=edge.slowdown(1.0), k_max=6)
    assert fast_edge.choose(80.0, 5.85, prompt_len=16, max_tokens=64).mode == "edge"
    # k grows with the acceptance at a long RTT
    assert slow_edge.best_k(80.0, 5.85, 0.95, 32)[0] >= slow_edge.best_k(80.0, 5.85, 0.2, 32)[0]
    meter = AcceptanceMeter(prior=0.5, prior_weight=0.0)
    meter.observe(2, 4)  # two accepted, then a rejection: 2 of 3 judged
    assert abs(meter.value - 2 / 3) < 1e-9


async def test_unreachable_cloud_falls_back_to_the_draft() -> None:
    gen = tiny_gen(f"http://127.0.0.1:{free_port()}")
    try:
        ids, sources = await run(gen, max_tokens=10, mode="speculative")
    finally:
        await gen.aclose()
    rec = gen.last_record()
    assert ids == whole_greedy(DRAFT, list(PROMPT.encode()), 10)
    assert set(sources) == {"draft"} and rec["fallbacks"][0]["at_token"] == 0


def test_cli_generate_json_and_bad_input() -> None:
    out = subprocess.run(python_module("splitinfer.cli", "generate", "-m", "bytelm", "--prompt", "import", "-n", "5",
                                       "--mode", "edge", "--json"), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    rec = json.loads(out.stdout)
    assert all(k in rec for k in RECORD_KEYS) and rec["tokens"] == 5 and rec["mode"] == "edge"
    assert rec["per_token"][0]["source"] == "edge"
    bad = subprocess.run(python_module("splitinfer.cli", "generate", "-m", "bytelm", "--prompt", "x", "--mode", "warp"),
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and "--mode" in bad.stderr and "Traceback" not in bad.stderr
    down = subprocess.run(python_module("splitinfer.cli", "generate", "-m", "bytelm", "--prompt", "x", "-n", "3",
                                        "--mode", "cloud", "--cloud", f"http://127.0.0.1:{free_port()}"),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert down.returncode == 0 and "draft" in down.stderr


async def test_speculative_through_a_cloud_outage_keeps_every_token_consistent() -> None:
    """An in-process worker stopped mid-generation and started again on its port: the
    draft fills the gap; back on the cloud, the draft's cache holds no unverified token."""
    port = free_port()
    worker = await tiny_worker(port=port)
    gen = tiny_gen(worker.url, k=3, retry_s=0.1)
    prompt = list(PROMPT.encode())
    ids: list[int] = []
    sources: list[str] = []
    try:
        async for tok in gen.generate(PROMPT, max_tokens=60, mode="speculative"):
            ids.append(tok.id)
            sources.append(tok.source)
            if len(ids) == 7:
                await worker.stop()
            if len(ids) == 20:
                worker = await tiny_worker(port=port)
                await asyncio.sleep(0.3)
    finally:
        await gen.aclose()
        await worker.stop()
    assert len(ids) == 60 and "draft" in sources and sources[0] == "speculative" and sources[-1] == "speculative"
    seq = prompt + ids
    with torch.no_grad():
        t_pred = TEACHER(torch.tensor([seq]))[0].argmax(-1).tolist()
        d_pred = DRAFT(torch.tensor([seq]))[0].argmax(-1).tolist()
    for i, (tok, src) in enumerate(zip(ids, sources)):
        assert (d_pred if src == "draft" else t_pred)[len(prompt) + i - 1] == tok, (i, src)


async def test_edge_agent_generate_delegates_to_a_generator() -> None:
    from splitinfer.edge.agent import AgentConfig, EdgeAgent

    async with EdgeAgent(AgentConfig(model="bytelm", cut="edge")) as agent:
        toks = [t async for t in agent.generate("import", max_tokens=4, mode="edge")]
        rec = agent.generator.last_record()
    assert [t.id for t in toks] == whole_greedy(load_lm("bytelm"), list(b"import"), 4)
    assert rec["tokens"] == 4 and rec["per_token"][0]["source"] == "edge"


async def test_stopping_early_closes_the_session(worker: CloudWorker) -> None:
    gen = tiny_gen(worker.url)
    try:
        stream = gen.generate(PROMPT, max_tokens=50, mode="cloud")
        async for _ in stream:
            if gen.last_record()["tokens"] >= 3:
                break
        await stream.aclose()  # type: ignore[attr-defined]
        assert len(worker.service.sessions.store) == 0
        assert gen.last_record()["tokens"] == 3
    finally:
        await gen.aclose()


async def test_auto_pings_only_when_its_link_estimate_is_stale(worker: CloudWorker) -> None:
    """auto's RTT comes from the cloud steps it just made: pings cost TTFT, so only a missing
    (3 pings) or stale (1 ping) estimate takes them."""
    from splitinfer.edge.generate import LINK_FRESH_S

    gen = tiny_gen(worker.url)
    pings: list[float] = []
    try:
        await gen.start()
        assert gen.client is not None
        real_ping = gen.client.ping

        async def counted(timeout_s: float = 5.0) -> float:
            ms = await real_ping(timeout_s)
            pings.append(ms)
            return ms

        gen.client.ping = counted  # type: ignore[method-assign]
        await run(gen, max_tokens=4, mode="auto")
        assert len(pings) == 3  # no estimate yet
        await run(gen, max_tokens=4, mode="cloud")
        await run(gen, max_tokens=4, mode="auto")
        assert len(pings) == 3  # the cloud steps refreshed it
        assert gen._link_at is not None
        gen._link_at -= LINK_FRESH_S + 1  # as if the last cloud step were long ago
        await run(gen, max_tokens=4, mode="auto")
        assert len(pings) == 4
    finally:
        await gen.aclose()
