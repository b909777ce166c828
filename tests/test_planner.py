"""The planner (splitinfer.adapt.planner) on the bundled profiles of real models: the one
place that turns profiles into a running adaptive policy."""

from __future__ import annotations

import math

import pytest

from splitinfer.adapt.planner import (
    Plan,
    adaptive_policy,
    crossover_mbit,
    cut_table,
    load_pair,
    plan_adaptive,
    reference_pair,
    start,
)
from splitinfer.adapt.policy import Adaptive, CutTable
from splitinfer.adapt.reference import reference_dir
from splitinfer.core.costmodel import CodecCost, Link
from splitinfer.core.graph import EDGE_ONLY
from splitinfer.core.profile import Profile
from splitinfer.errors import UserError

SMALL, BIG = "tinycnn-digits", "resnet18"


@pytest.mark.parametrize("model", [SMALL, BIG])
def test_reference_pair_is_the_bundled_edge_and_cloud(model: str) -> None:
    edge, cloud = reference_pair(model)
    d = reference_dir() / model
    assert edge.to_json() == Profile.load(d / "edge.json").to_json()
    assert cloud.to_json() == Profile.load(d / "cloud.json").to_json()
    assert edge.model == cloud.model == model
    assert edge.graph.fingerprint() == cloud.graph.fingerprint()
    assert edge.threads == 1 and cloud.threads == 2  # partitions/README.md's stand-in devices


def test_reference_pair_of_an_unknown_model_is_one_user_error() -> None:
    with pytest.raises(UserError) as exc:
        reference_pair("no-such-model")
    assert "no-such-model" in str(exc.value) and "\n" not in str(exc.value)


def test_load_pair_checks_the_graph(tmp_path) -> None:  # noqa: ANN001
    small_e, small_c = reference_pair(SMALL)
    big_e, _ = reference_pair(BIG)
    for name, prof in (("se", small_e), ("sc", small_c), ("be", big_e)):
        prof.save(tmp_path / f"{name}.json")
    edge, cloud = load_pair(tmp_path / "se.json", tmp_path / "sc.json", small_e.graph.fingerprint())
    assert edge.to_json() == small_e.to_json() and cloud.to_json() == small_c.to_json()
    assert load_pair(tmp_path / "se.json", tmp_path / "sc.json")[0].model == SMALL  # no fingerprint: no check
    with pytest.raises(UserError, match="not of resnet18's graph"):
        load_pair(tmp_path / "se.json", tmp_path / "sc.json", big_e.graph.fingerprint(), model=BIG)
    with pytest.raises(UserError, match="different models"):
        load_pair(tmp_path / "be.json", tmp_path / "sc.json")
    with pytest.raises(UserError, match="not found"):
        load_pair(tmp_path / "missing.json", tmp_path / "sc.json")


def test_cut_table_scales_the_edge_and_keeps_the_codec() -> None:
    edge, cloud = reference_pair(BIG)
    plain = cut_table(edge, cloud)
    assert isinstance(plain, CutTable)
    assert plain.edge_only.breakdown.edge_ms == pytest.approx(edge.total_ms)
    slow = cut_table(edge, cloud, edge_slowdown=4.0)
    assert slow.edge_only.breakdown.edge_ms == pytest.approx(4 * edge.total_ms)
    assert slow.cloud_only is not None and plain.cloud_only is not None
    assert slow.cloud_only.breakdown.cloud_ms == pytest.approx(plain.cloud_only.breakdown.cloud_ms)
    codec = CodecCost(name="fp16", size_ratio=0.5, encode_ms_per_mb=1.0, decode_ms_per_mb=1.0)
    assert cut_table(edge, cloud, codec).codec == codec
    with pytest.raises(UserError):
        cut_table(edge, cloud, edge_slowdown=0.0)


def test_adaptive_policy_starts_from_the_link_and_start_records_nothing_sent() -> None:
    edge, cloud = reference_pair(SMALL)
    table = cut_table(edge, cloud, edge_slowdown=10.0)
    link = Link(uplink_mbit=50.0, rtt_ms=2.0)
    policy = adaptive_policy(table, link, margin=0.2)
    assert isinstance(policy, Adaptive) and policy.table is table
    assert policy.margin == 0.2 and policy.rtt_ms == 2.0
    assert policy.estimated_link(0.0) == Link(uplink_mbit=50.0, rtt_ms=2.0)
    first = start(policy, 100.0)
    assert first.id != EDGE_ONLY, "an edge 10x slower splits on a fast link"
    assert first == table.best(link) and policy.current == first
    # The start-up choice sent nothing: nothing is left in flight to cap the estimate later.
    assert policy.estimator.bandwidth_now(1000.0) == pytest.approx(50.0)
    # Without that record the unanswered "transfer" would drag the estimate down.
    bare = adaptive_policy(table, link)
    bare.choose(100.0)
    assert bare.estimator.bandwidth_now(1000.0) < 1.0


def test_plan_adaptive_is_the_pieces_in_one_call() -> None:
    edge, cloud = reference_pair(BIG)
    link = Link(uplink_mbit=5.0, rtt_ms=20.0)
    plan = plan_adaptive(edge, cloud, link, 0.0, edge_slowdown=20.0)
    assert isinstance(plan, Plan) and plan.link == link and plan.edge_slowdown == 20.0
    assert plan.policy.table is plan.table
    expected = cut_table(edge, cloud, edge_slowdown=20.0).best(link)
    assert plan.first.id == expected.id
    assert plan.first.predicted_ms == pytest.approx(expected.predicted_ms)
    assert plan.table.edge_only.breakdown.edge_ms == pytest.approx(20 * edge.total_ms)


def test_crossover_is_where_the_cost_model_leaves_the_edge() -> None:
    edge, cloud = reference_pair(SMALL)
    # on this machine's reference profiles the tiny model never leaves the edge at its own speed
    assert crossover_mbit(edge, cloud, 1.0, 2.0) is None
    crossings = [crossover_mbit(edge, cloud, k, 2.0) for k in (5.0, 10.0, 20.0, 50.0)]
    assert all(c is not None for c in crossings)
    assert crossings == sorted(crossings, reverse=True), "a slower edge leaves sooner"
    for k, cross in zip((5.0, 10.0, 20.0, 50.0), crossings):
        table = cut_table(edge, cloud, edge_slowdown=k)
        assert table.best(Link(uplink_mbit=cross, rtt_ms=2.0)).id != EDGE_ONLY  # type: ignore[arg-type]
        below = cross / 1.03  # type: ignore[operator]
        assert table.best(Link(uplink_mbit=below, rtt_ms=2.0)).id == EDGE_ONLY
    big_e, big_c = reference_pair(BIG)
    cross = crossover_mbit(big_e, big_c, 1.0, 20.0)
    assert cross is not None and 0.1 <= cross <= 1000.0 and math.isfinite(cross)
