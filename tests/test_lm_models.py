"""The LM zoo: deterministic builds, shipped weights, tokenizer, reproducible training, cached decode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from splitinfer.models.fastdecode import FastDecoder
from splitinfer.models.kvcache import KVCache, run_step
from splitinfer.models.lm import CausalLM, LMConfig
from splitinfer.models.lmzoo import (
    build_lm,
    decode_bytes,
    encode_text,
    is_lm,
    lm_names,
    lm_spec,
    lm_weights_hash,
    load_lm,
    read_lm_weights,
)
from splitinfer.train.lm_data import LMCorpus, load_corpus
from splitinfer.train.lm_training import LMTrainConfig, bits_per_byte, greedy_agreement, held_out_windows, train_lm

SHIPPED = ("bytelm", "bytelm-draft")


@pytest.fixture(scope="module")
def corpus() -> LMCorpus:
    return load_corpus()


@pytest.fixture(scope="module")
def held_out(corpus: LMCorpus) -> torch.Tensor:
    """A held-out snippet: 8 windows of 128 bytes of files no model trained on."""
    return held_out_windows(corpus, ctx=128, n=8)


# ------------------------------------------------------------------------------ zoo
def test_zoo_names_and_shapes() -> None:
    assert lm_names() == ["bytelm", "bytelm-draft", "gpt17m"]
    assert all(is_lm(n) for n in lm_names()) and not is_lm("tinycnn")
    assert lm_spec("bytelm").draft == "bytelm-draft"
    assert lm_spec("bytelm").cfg == LMConfig(6, 256, 8, max_ctx=512)
    assert lm_spec("bytelm-draft").cfg == LMConfig(2, 96, 4, max_ctx=512)
    with pytest.raises(KeyError, match="known"):
        lm_spec("nope")
    params = sum(p.numel() for p in build_lm("gpt17m").parameters())
    assert 15e6 < params < 19e6


def test_builds_are_deterministic() -> None:
    for name in lm_names():
        a, b = load_lm(name), load_lm(name)
        assert lm_weights_hash(a) == lm_weights_hash(b)
        assert not a.training
    rng = torch.get_rng_state()
    build_lm("bytelm-draft")
    assert torch.equal(rng, torch.get_rng_state())  # the caller's RNG is untouched
    assert lm_weights_hash(load_lm("bytelm")) != lm_weights_hash(load_lm("bytelm", weights=False))


def test_tokenizer_round_trip() -> None:
    text = "def f(x):\n    return 'héllo, 世界 ✓ 🐍'\n"
    tokens = encode_text(text)
    assert all(0 <= t < 256 for t in tokens) and len(tokens) == len(text.encode("utf-8"))
    assert decode_bytes(tokens) == text
    assert decode_bytes(encode_text("é")[:1]) == "\ufffd"  # a cut multi-byte char does not raise


# ------------------------------------------------------------------- shipped weights
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_weights_beat_random_init(name: str, held_out: torch.Tensor) -> None:
    path = lm_spec(name).weights
    assert path is not None, f"{name}.pt not shipped"
    blob = read_lm_weights(path)
    assert all(v.dtype == torch.float16 for v in blob["state_dict"].values())
    meta = blob["meta"]
    assert not meta["partial"] and meta["data"]["data_digest"] and meta["held_out_bpb"] > 0
    assert {"recipe", "steps_done", "train_seconds", "command"} <= set(meta)
    trained = bits_per_byte(load_lm(name), held_out)
    random_init = bits_per_byte(load_lm(name, weights=False), held_out)
    assert trained < random_init - 3.0, (trained, random_init)  # random init is ~8 bits/byte


def test_teacher_beats_draft_and_they_agree(held_out: torch.Tensor) -> None:
    teacher, draft = load_lm("bytelm"), load_lm("bytelm-draft")
    t_bpb, d_bpb = bits_per_byte(teacher, held_out), bits_per_byte(draft, held_out)
    assert t_bpb < d_bpb - 0.1, (t_bpb, d_bpb)
    assert greedy_agreement(draft, teacher, held_out) > 0.6


@pytest.mark.parametrize("name", SHIPPED)
def test_forward_equals_cached_decode(name: str, corpus: LMCorpus) -> None:
    model = load_lm(name)
    tokens = corpus.held_out[:48].long()[None]
    whole = model(tokens)
    cache = KVCache(model, 0, model.n_layers)
    prompt = 16
    with torch.no_grad():
        h = model.embed(tokens[:, :prompt], torch.arange(prompt)[None])
        steps = [model.logits(run_step(model, [cache], h, [prompt]))]
        for i in range(prompt, tokens.shape[1]):
            h = model.embed(tokens[:, i : i + 1], torch.tensor([[i]]))
            steps.append(model.logits(run_step(model, [cache], h, [1])))
    cached = torch.cat(steps, dim=1)
    assert cache.length == tokens.shape[1]
    assert torch.allclose(whole, cached, atol=1e-5), float((whole - cached).abs().max())
    assert torch.equal(whole.argmax(-1), cached.argmax(-1))


@pytest.mark.parametrize("name", SHIPPED)
def test_fast_decoder_equals_forward_through_prefill_decode_and_rollback(name: str, corpus: LMCorpus) -> None:
    """The edge's lean single-sequence path gives the model's own logits, also after a rollback."""
    model = load_lm(name)
    tokens = corpus.held_out[:48].long()[None]
    with torch.no_grad():
        whole = model(tokens)[0]
    fast = FastDecoder(model)
    got = [fast.feed(tokens[0, :16].tolist())]  # a prefill: causal among its own positions
    got += [fast.feed([int(t)]) for t in tokens[0, 16:]]
    expected = whole[15:]
    assert fast.length == 48
    assert torch.allclose(torch.stack(got), expected, atol=1e-5), float((torch.stack(got) - expected).abs().max())
    assert torch.equal(torch.stack(got).argmax(-1), expected.argmax(-1))
    # rollback to 30 positions, then other tokens: the stale keys past 30 must not be attended to
    fast.truncate(30)
    other = torch.randint(0, 256, (10,), generator=torch.Generator().manual_seed(3))
    seq = torch.cat([tokens[0, :30], other])[None]
    with torch.no_grad():
        ref = model(seq)[0, -1]
    assert torch.allclose(fast.feed(other.tolist()), ref, atol=1e-5)
    with pytest.raises(ValueError, match="past the context"):
        fast.feed([1] * model.cfg.max_ctx)
    with pytest.raises(ValueError):
        fast.truncate(fast.length + 1)


# ------------------------------------------------------------------------- training
_TINY = LMConfig(n_layers=1, d_model=32, n_heads=2, max_ctx=64)


def test_training_is_reproducible(corpus: LMCorpus) -> None:
    cfg = LMTrainConfig(steps=4, batch_size=2, ctx=32, warmup=1, eval_windows=2, threads=1)
    a, b = train_lm(_TINY, cfg, corpus), train_lm(_TINY, cfg, corpus)
    assert a.losses == b.losses and lm_weights_hash(a.model) == lm_weights_hash(b.model)
    c = train_lm(_TINY, LMTrainConfig(**{**cfg.__dict__, "seed": 1}), corpus)
    assert c.losses != a.losses
    assert a.losses[-1] < a.losses[0] and a.held_out_bpb < a.init_bpb


def test_distillation_runs(corpus: LMCorpus) -> None:
    teacher = seeded_tiny_teacher()
    cfg = LMTrainConfig(steps=2, batch_size=2, ctx=32, warmup=1, eval_windows=2, alpha=0.5, temperature=2.0)
    r = train_lm(_TINY, cfg, corpus, teacher=teacher)
    assert len(r.losses) == 2 and all(x > 0 for x in r.losses)


def seeded_tiny_teacher() -> CausalLM:
    return build_lm(LMConfig(n_layers=1, d_model=48, n_heads=2, max_ctx=64))


def test_cli_train_lm(tmp_path: Path) -> None:
    from splitinfer.train.cli import train_cmd

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command("train")(train_cmd)
    app.command("other")(lambda: None)
    out = tmp_path / "d.pt"
    args = ["train", "--model", "bytelm-draft", "--steps", "2", "--ctx", "32", "--batch-size", "2",
            "--teacher", "none", "--out", str(out), "--json"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["steps"] == 2 and summary["held_out_bpb_fp16"] > 0 and summary["data_digest"]
    assert "--steps 2" in summary["command"]
    blob = read_lm_weights(out)
    assert blob["name"] == "bytelm-draft" and blob["meta"]["recipe"]["ctx"] == 32
    res = CliRunner().invoke(app, ["train", "--model", "gpt17m", "--out", str(out)])
    assert res.exit_code != 0  # random weights only
