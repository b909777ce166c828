"""Split LMs with state pinned to its side: same logits as the whole model, graphs that never
ship a cache, and the prefill/decode cost model (issue 15 item 2)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from splitinfer.adapt.lmcost import LMCost, LMProfile, expected_tokens_per_round, profile_lm
from splitinfer.core.costmodel import Link
from splitinfer.core.graph import Graph, capture
from splitinfer.core.partitioner import Partitioner
from splitinfer.core.profile import Profile
from splitinfer.errors import UserError
from splitinfer.models.kvcache import KVCache, run_step, step_positions
from splitinfer.models.lm import CausalLM, LMConfig
from splitinfer.models.lmstep import block_cut_head, capture_step, cut_report, unmarked


def _small(n_layers: int = 4) -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(LMConfig(n_layers=n_layers, d_model=64, n_heads=4, max_ctx=128)).eval()


@pytest.fixture(scope="module")
def small() -> CausalLM:
    return _small()


@pytest.fixture(scope="module")
def step_graph(small: CausalLM) -> Graph:
    return capture_step(small, context=8)[1]


def _gpt17m() -> CausalLM:
    try:
        from splitinfer.models.lmzoo import load_lm

        return load_lm("gpt17m")
    except (ImportError, KeyError, ValueError, UserError):  # the zoo entry is written by another helper
        torch.manual_seed(0)
        return CausalLM(LMConfig(n_layers=8, d_model=416, n_heads=8)).eval()


# ------------------------------------------------------------------ split == whole
def _step(model: CausalLM, caches: list[KVCache], tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One step through a chain of caches (head first): the hidden states at every cut, and the logits."""
    t = torch.tensor([tokens])
    positions, _ = step_positions(caches[:1], [len(tokens)])
    h = model.embed(t, positions)
    sent = []
    for cache in caches:
        h = run_step(model, [cache], h, [len(tokens)])
        sent.append(h)
    return torch.stack(sent[:-1]) if len(sent) > 1 else torch.empty(0), model.logits(h)


@torch.no_grad()
def test_split_prefill_and_decode_match_whole(small: CausalLM) -> None:
    n = small.n_layers
    prompt = list(b"split inference ")
    for cut in range(1, n):
        whole = [KVCache(small, 0, n)]
        split = [KVCache(small, 0, cut), KVCache(small, cut, n)]
        step = prompt
        tokens: list[int] = []
        for i in range(6):  # prefill, then five decode steps
            _, want = _step(small, whole, step)
            sent, got = _step(small, split, step)
            assert torch.allclose(got, want, atol=1e-5), (cut, i)
            assert sent.shape == (1, 1, len(step), small.cfg.d_model)  # only the hidden state crosses
            nxt = int(want[0, -1].argmax())
            assert nxt == int(got[0, -1].argmax())
            tokens.append(nxt)
            step = [nxt]
        # each side holds the caches of its own blocks only, all at the same length
        assert len(split[0].layers) == cut and len(split[1].layers) == n - cut
        assert split[0].length == split[1].length == whole[0].length == len(prompt) + 5
        full = small(torch.tensor([prompt + tokens[:-1]]))
        assert torch.allclose(full[0, -1], want[0, -1], atol=1e-5)


# ------------------------------------------------------------------ the graph knows state
def test_captured_step_marks_state(small: CausalLM, step_graph: Graph) -> None:
    g = step_graph
    n = small.n_layers
    assert g.has_state
    assert len(g.state_inputs) == 3 * n  # k, v, mask of every block
    assert len(g.state_outputs) == 2 * n  # new k, v of every block
    assert len(g.result_outputs) == 1
    assert g.output_bytes == 256 * 4  # the logits; new cache entries stay where they are made
    assert len(g.state_pairs()) == 2 * n
    again = Graph.from_json(g.to_json())
    assert again.fingerprint() == g.fingerprint() and again.state_inputs == g.state_inputs
    plain = unmarked(g)
    assert not plain.has_state and "state" not in str(plain.to_json())
    assert plain.fingerprint() != g.fingerprint()


def test_no_candidate_cut_ships_state(step_graph: Graph) -> None:
    g = step_graph
    listed = [i for i in range(len(g.nodes)) if g.is_candidate(i)]
    assert len(listed) > 2 * len(g.state_outputs)  # in-block points too, not just block boundaries
    for i in listed:
        head = g.prefix_head(i)
        assert not g.ships_state(head), i
        tensors = g.crossing(head)
        assert not any(g.node(t).state for t in tensors)
        assert g.cut_bytes(head) == sum(g.node(t).nbytes for t in tensors)
    cloud = g.prefix_head(g.cloud_only_index)
    assert set(g.crossing(cloud)) == {"tokens", "positions"}  # cloud mode sends the token ids only


def test_block_cut_sends_only_the_hidden_state(small: CausalLM, step_graph: Graph) -> None:
    d = small.cfg.d_model
    for cut in range(1, small.n_layers):
        head = block_cut_head(step_graph, cut)
        assert len(step_graph.crossing(head)) == 1
        assert step_graph.cut_bytes(head) == d * 4
        assert step_graph.head_from_cut_id(step_graph.cut_id(head)) == head
        # the head keeps the caches of its blocks, the tail its own
        sides = step_graph.state_side(head)
        for name, on_edge in sides.items():
            block = int(step_graph.node(name).state.lstrip("kvmask"))
            assert on_edge == (block < cut), (cut, name)
        # without the marks the same cut ships the tail's caches and the head's new entries
        plain = unmarked(step_graph)
        assert plain.cut_bytes(head) > (small.n_layers - cut) * 2 * 8 * d * 4
    _, verify = capture_step(small, context=8, new_tokens=3)  # verify k+1 = 3 tokens
    assert verify.cut_bytes(block_cut_head(verify, 2)) == 3 * d * 4


def test_issue_figure_gpt17m_cut_after_block_2() -> None:
    model = _gpt17m()
    r = cut_report(model, cut=2, context=64)
    d = model.cfg.d_model
    assert r["with_state"]["bytes"] == d * 4  # 1,664 B at d=416 (1,536 B at d=384)
    assert r["with_state"]["tensors"] == 1
    before = r["without_state"]
    # the caches of blocks 2..n-1 at context 64 (k and v), the head's new entries, the hidden state
    caches = (model.n_layers - 2) * 2 * 64 * d * 4
    assert before["bytes"] >= caches + d * 4 and before["bytes"] > 300_000
    assert before["tensors"] > 10


class _Cached(nn.Module):
    """A toy with a cache read twice (y, z) and a new cache a later node reads."""

    def forward(self, x: torch.Tensor, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.relu(x + cache.sum(dim=1, keepdim=True))
        new = cache * 0.5 + y
        z = torch.tanh(y * cache.mean(dim=1, keepdim=True)) + new.mean(dim=1, keepdim=True)
        return z, new


def test_cut_that_would_ship_state_is_not_a_candidate() -> None:
    example = (torch.randn(1, 4), torch.randn(1, 4))
    gm, g = capture(_Cached(), example, state_inputs={1: "c"}, state_outputs={1: "c"})
    plain = capture(_Cached(), example)[1]
    assert g.state_inputs == ("cache",) and len(g.state_outputs) == 1
    refused = 0
    for i in range(g.cloud_only_index + 1, g.edge_only_index):
        head = g.prefix_head(i)
        if not plain.is_candidate(i):
            continue
        if g.ships_state(head):
            refused += 1
            assert not g.is_candidate(i)
            with pytest.raises(UserError, match="state"):
                g.head_from_cut_id(str(i))
        else:
            assert "cache" not in g.crossing(head)
    assert refused > 0
    with pytest.raises(UserError):
        capture(_Cached(), example, state_inputs=[5])


def _profiles(g: Graph, slowdown: float) -> tuple[Profile, Profile]:
    ms = {n.name: (0.0 if n.op == "placeholder" else 0.05 + n.nbytes / 1e6) for n in g.nodes}
    cloud = Profile("lm", g, ms, {}, "cpu", 1, "", (), 1, 1)
    return cloud.scaled(slowdown), cloud


def test_partitioner_never_ships_state(step_graph: Graph) -> None:
    edge, cloud = _profiles(step_graph, 10.0)
    p = Partitioner(edge, cloud)
    for link in (Link(0.5, 80), Link(5.85, 20), Link(100, 5), Link(10_000, 0)):
        best = p.best(link)
        assert not step_graph.ships_state(best.head)
        assert not any(step_graph.node(t).state for t in best.tensors)
        split = p.best_split(link)
        assert split is None or not step_graph.ships_state(split)
        for c in p.candidates(link):
            assert not any(step_graph.node(t).state for t in c.tensors)
            assert c.bytes == step_graph.cut_bytes(c.head)


# ------------------------------------------------------------------ cost model
@pytest.fixture(scope="module")
def profile(small: CausalLM) -> LMProfile:
    return profile_lm(small, "small", prompt_lens=(4, 16), contexts=(8, 32), verify_tokens=(3,), repeats=1)


def test_profile_json_and_slowdown(profile: LMProfile, tmp_path) -> None:
    path = tmp_path / "p.json"
    profile.save(path)
    back = LMProfile.load(path)
    assert back.n_layers == 4 and set(back.decode) == {8, 32} and set(back.verify[3]) == {8, 32}
    assert math.isclose(back.decode_ms(8).total, profile.decode_ms(8).total, rel_tol=1e-3, abs_tol=1e-4)
    slow = profile.slowdown(10)
    assert math.isclose(slow.prefill_ms(16).total, 10 * profile.prefill_ms(16).total)
    assert slow.slowdown_factor == 10
    lo, hi = sorted((profile.decode_ms(8).total, profile.decode_ms(32).total))
    assert lo - 1e-9 <= profile.decode_ms(20).total <= hi + 1e-9  # interpolated between points
    assert profile.decode_ms(64).total >= profile.decode_ms(32).total - 1e-9  # never cheaper past the end
    with pytest.raises(UserError):
        LMProfile.from_json({"model": "x"})


def test_cost_model_consistent_with_profiles(profile: LMProfile) -> None:
    edge = profile.slowdown(10)
    cost = LMCost(edge, profile, context=32)
    assert math.isclose(cost.edge_ms_per_token(), edge.decode[32].total)
    free = cost.cloud_ms_per_token(0.0, math.inf)
    assert math.isclose(free, profile.decode[32].total)
    for cut in range(1, 4):
        want = edge.decode[32].range_ms(0, cut, embed=True) + profile.decode[32].range_ms(cut, 4, logits=True)
        assert math.isclose(cost.split_ms_per_token(cut, 0.0, math.inf), want)
    cut, ms = cost.best_cut(20, 5.85)
    assert ms == min(cost.split_ms_per_token(c, 20, 5.85) for c in range(1, 4))
    assert cost.ms_per_token("split", 20, 5.85) == ms
    draft = profile.slowdown(2)
    rounds = cost.speculative_round_ms(4, 0.0, math.inf, draft)
    assert math.isclose(rounds, 4 * draft.decode[32].total + profile.verify_ms(5, 32).total)
    assert math.isclose(cost.speculative_ms_per_token(4, 0.5, 0.0, math.inf, draft),
                        rounds / expected_tokens_per_round(4, 0.5))  # fmt: skip
    assert math.isclose(cost.ttft_ms(16, "edge"), edge.prefill[16].total)
    assert math.isclose(cost.ttft_ms(16, "cloud"), profile.prefill[16].total)
    assert cost.ttft_ms(16, "speculative", draft=draft) >= cost.ttft_ms(16, "cloud")
    with pytest.raises(UserError):
        cost.split_ms_per_token(0, 0, 1)
    with pytest.raises(UserError):
        cost.ms_per_token("nope")


def test_cost_model_monotone(profile: LMProfile) -> None:
    cost = LMCost(profile.slowdown(10), profile, context=32)
    draft = profile.slowdown(2)
    fns = [
        lambda r, b: cost.cloud_ms_per_token(r, b),
        lambda r, b: cost.split_ms_per_token(2, r, b),
        lambda r, b: cost.best_cut(r, b)[1],
        lambda r, b: cost.speculative_ms_per_token(4, 0.7, r, b, draft),
        lambda r, b: cost.ttft_ms(16, "split", r, b, cut=1),
        lambda r, b: cost.ttft_ms(16, "cloud", r, b),
    ]
    for f in fns:
        by_rtt = [f(r, 5.85) for r in (0, 5, 20, 80)]
        by_bw = [f(20, b) for b in (1.1, 5.85, 18.88, 1000)]
        assert by_rtt == sorted(by_rtt) and by_rtt[0] < by_rtt[-1]
        assert by_bw == sorted(by_bw, reverse=True) and by_bw[0] > by_bw[-1]
    # more accepted drafts, fewer ms per token; the hidden state costs more than a token id
    spec = [cost.speculative_ms_per_token(4, a, 20, 5.85, draft) for a in (0.0, 0.5, 0.9, 1.0)]
    assert spec == sorted(spec, reverse=True)
    assert cost.split_ms_per_token(2, 20, 0.1) - cost.split_ms_per_token(2, 20, 1000) > (
        cost.cloud_ms_per_token(20, 0.1) - cost.cloud_ms_per_token(20, 1000)
    )


def test_expected_tokens_per_round() -> None:
    assert expected_tokens_per_round(4, 0.0) == 1.0
    assert expected_tokens_per_round(4, 1.0) == 5.0
    assert math.isclose(expected_tokens_per_round(3, 0.5), 1 + 0.5 + 0.25 + 0.125)


def test_cached_profile(small: CausalLM, tmp_path) -> None:
    from splitinfer.adapt.lmcost import cached_profile

    path = tmp_path / "prof" / "small.json"
    kw = {"prompt_lens": (4,), "contexts": (8,), "verify_tokens": (), "repeats": 1}
    first = cached_profile(small, "small", path, **kw)
    assert path.exists() and cached_profile(small, "small", path, **kw) == LMProfile.load(path)
    assert first.n_layers == small.n_layers
