"""The link estimator: settling on a constant link, RFC 6298 RTT smoothing, probing, filters."""

from __future__ import annotations

import math
import random

import pytest

from splitinfer.core.costmodel import transfer_ms
from splitinfer.errors import UserError
from splitinfer.adapt.estimator import (
    DEFAULT_FILTER,
    FILTERS,
    Ewma,
    HarmonicMean,
    LastSample,
    LinkEstimator,
    RecentHarmonic,
    ResettingHarmonic,
    WindowPercentile,
    make_filter,
)

RTT_MS = 30.0


def network_ms(nbytes: int, mbit: float, rtt_ms: float = RTT_MS, return_bytes: int = 0) -> float:
    """What the edge sees on a link of `mbit` with a symmetric downlink: up, RTT, down."""
    return transfer_ms(nbytes, mbit) + rtt_ms + transfer_ms(return_bytes, mbit)


@pytest.mark.parametrize("name", sorted(FILTERS))
@pytest.mark.parametrize("mbit", [0.3, 2.0, 25.0])
def test_settles_within_10_percent_of_a_constant_link(name: str, mbit: float) -> None:
    """From a wrong prior, three transfers of assorted sizes put the estimate within 10%."""
    est = LinkEstimator(name, initial_mbit=mbit * 20, initial_rtt_ms=5.0)
    for i, nbytes in enumerate([50_000, 8_000, 200_000]):
        est.observe(nbytes, network_ms(nbytes, mbit, return_bytes=4000), rtt_sample_ms=RTT_MS, now_s=float(i),
                    return_bytes=4000)  # fmt: skip
    assert est.bandwidth_mbit == pytest.approx(mbit, rel=0.10)
    assert est.samples == 3


@pytest.mark.parametrize("seed", range(5))
def test_default_filter_settles_through_measurement_noise(seed: int) -> None:
    """Transfer times off by a few percent (timer and scheduling jitter): within 10% after 5."""
    rng = random.Random(seed)
    est = LinkEstimator(initial_rtt_ms=RTT_MS)
    for i in range(5):
        nbytes = rng.choice([20_000, 60_000, 150_000])
        est.observe(nbytes, network_ms(nbytes, 3.0) * rng.uniform(0.95, 1.05), RTT_MS, now_s=float(i))
    assert est.bandwidth_mbit == pytest.approx(3.0, rel=0.10)


def test_without_rtt_samples_the_prior_rtt_is_taken_off() -> None:
    est = LinkEstimator(initial_rtt_ms=RTT_MS)
    est.observe(100_000, network_ms(100_000, 4.0))
    assert est.bandwidth_mbit == pytest.approx(4.0, rel=1e-9)
    assert est.srtt_ms is None and est.rtt_ms == RTT_MS


def test_rtt_is_smoothed_as_rfc_6298_says() -> None:
    est = LinkEstimator()
    est.observe_rtt(100.0)
    assert (est.srtt_ms, est.rttvar_ms) == (100.0, 50.0)  # first sample: SRTT = R, RTTVAR = R/2
    est.observe_rtt(60.0)
    # RTTVAR = 3/4 * 50 + 1/4 * |100 - 60| = 47.5, then SRTT = 7/8 * 100 + 1/8 * 60 = 95
    assert est.rttvar_ms == pytest.approx(47.5)
    assert est.srtt_ms == pytest.approx(95.0)
    assert est.rto_ms == pytest.approx(max(1000.0, 95.0 + 4 * 47.5))
    for _ in range(200):
        est.observe_rtt(40.0)
    assert est.srtt_ms == pytest.approx(40.0, abs=0.01)
    assert est.rttvar_ms == pytest.approx(0.0, abs=0.01)
    est.observe_rtt(float("nan"))  # ignored
    assert est.srtt_ms == pytest.approx(40.0, abs=0.01)


def test_a_transfer_shorter_than_the_rtt_is_not_taken_as_infinitely_fast() -> None:
    est = LinkEstimator("last", initial_rtt_ms=50.0)
    est.observe(1000, 40.0)  # jitter: the share is below the RTT
    assert est.bandwidth_mbit == pytest.approx(1000 * 8 / (0.1 * 40.0 * 1e3))  # floored at a tenth
    assert est.observe(0, 10.0) is None and est.observe(1000, 0.0) is None  # nothing to learn


def test_a_rate_measured_by_the_receiver_wins_over_the_edge_timing() -> None:
    """The cloud timed a probe's arrival at 5 Mbit/s; the edge, busy with a head, read the
    answer 200 ms late: the sample is the cloud's rate."""
    est = LinkEstimator("last", initial_rtt_ms=RTT_MS)
    late = network_ms(50_000, 5.0) + 200.0
    assert est.observe(50_000, late, measured_mbit=5.0, now_s=1.0) == pytest.approx(5.0)
    assert est.observe(50_000, late, now_s=2.0) == pytest.approx(50_000 * 8 / ((late - RTT_MS) * 1e3))
    assert est.observe(50_000, late, measured_mbit=float("nan"), now_s=3.0) < 2.0  # no measurement: the edge's


def test_probing_when_nothing_was_sent_for_a_while() -> None:
    est = LinkEstimator(probe_after_s=1.0, probe_relaxed_s=4.0)
    assert est.needs_probe(0.0)  # never heard of the link
    est.note_sent(0.0, 4000)
    assert not est.needs_probe(0.5)
    assert est.needs_probe(1.0)
    est.observe(4000, network_ms(4000, 1.0), now_s=1.2)
    assert not est.needs_probe(2.0) and est.needs_probe(2.2)
    est.relax_probing(True)
    assert not est.needs_probe(4.0) and est.needs_probe(5.2)
    est.relax_probing(False)
    assert est.needs_probe(2.2)


def test_probe_size_follows_the_estimate_within_bounds() -> None:
    est = LinkEstimator("last", probe_target_ms=100.0, probe_min_bytes=4000, probe_max_bytes=64_000)
    assert est.probe_bytes() == 4000  # nothing known: the smallest
    est.observe(10_000, transfer_ms(10_000, 2.0))
    assert est.probe_bytes() == 25_000  # 100 ms at 2 Mbit/s
    est.observe(10_000, transfer_ms(10_000, 1000.0))
    assert est.probe_bytes() == 64_000


def test_an_unanswered_transfer_caps_the_estimate() -> None:
    """A 1 MB transfer believed to take 0.8 s at 10 Mbit/s, still unanswered after 4 s:
    the link is at most 8 Mbit / (4 s - RTT - cloud time)."""
    est = LinkEstimator("last", initial_rtt_ms=20.0)
    est.observe(100_000, network_ms(100_000, 10.0, rtt_ms=20.0))
    assert est.bandwidth_mbit == pytest.approx(10.0)
    est.note_sent(100.0, 1_000_000, extra_ms=30.0)
    assert est.bandwidth_now(100.5) == pytest.approx(10.0)  # not overdue yet
    assert est.bandwidth_now(104.0) == pytest.approx(8.0 / (4.0 - 0.05), rel=1e-9)
    est.observe(1_000_000, network_ms(1_000_000, 2.0, rtt_ms=20.0), now_s=104.02)
    assert est.bandwidth_now(104.1) == pytest.approx(2.0)  # answered: the sample rules


def test_filters() -> None:
    h = HarmonicMean(3)
    for v in (1.0, 2.0, 4.0, 8.0):
        h.update(v)
    assert h.value == pytest.approx(3 / (1 / 2 + 1 / 4 + 1 / 8))  # the last three only
    e = Ewma(0.5)
    e.update(4.0)
    e.update(2.0)
    assert e.value == pytest.approx(3.0)
    m = WindowPercentile(3, 50.0)
    for v in (5.0, 1.0, 3.0, 100.0):
        m.update(v)
    assert m.value == 3.0
    mx = WindowPercentile(3, 100.0)
    for v in (5.0, 1.0, 3.0):
        mx.update(v)
    assert mx.value == 5.0
    r = ResettingHarmonic(5, 2.0)
    for v in (10.0, 11.0, 9.0):
        r.update(v)
    r.update(1.0)  # a step change, not noise: start over
    assert r.value == 1.0
    r.update(1.5)
    assert r.value == pytest.approx(2 / (1 + 1 / 1.5))
    last = LastSample()
    assert last.value is None
    last.update(3.0)
    assert last.value == 3.0
    for f in (h, e, m, r, last):
        f.reset()
        assert f.value is None


def test_recent_harmonic_forgets_by_time_and_starts_over_on_a_jump() -> None:
    f = RecentHarmonic(window_s=3.0, n=5, jump=2.0)
    f.update(4.0, 0.0)
    f.update(3.0, 1.0)
    assert f.value == pytest.approx(2 / (1 / 4 + 1 / 3))
    f.update(5.0, 4.5)  # the samples of 0 s and 1 s are older than 3 s: only this one counts
    assert f.value == 5.0
    for i in range(6):  # at most n samples, even within the window
        f.update(5.0 + (i % 2), 5.0 + 0.1 * i)
    assert len(f._w) == 5
    f.update(1.0, 6.0)  # more than 2x below: a step, not noise
    assert f.value == 1.0
    g = RecentHarmonic(window_s=2.5)
    for v in (2.0, 2.0, 3.0, 3.0):  # no clock: samples count as 1 s apart
        g.update(v)
    assert g.value == pytest.approx(3 / (1 / 2 + 1 / 3 + 1 / 3))
    g.reset()
    assert g.value is None
    with pytest.raises(UserError):
        RecentHarmonic(window_s=0.0)


def test_the_estimator_remembers_how_fast_the_link_was_lately() -> None:
    est = LinkEstimator("last", recent_s=60.0, initial_rtt_ms=RTT_MS)
    assert est.recent_max_mbit(0.0) is None
    est.observe(100_000, network_ms(100_000, 20.0), now_s=1.0)
    est.observe(100_000, network_ms(100_000, 2.0), now_s=2.0)
    assert est.bandwidth_mbit == pytest.approx(2.0)  # the estimate followed the drop ...
    assert est.recent_max_mbit(30.0) == pytest.approx(20.0)  # ... the memory of the fast link stays
    assert est.recent_max_mbit(61.5) == pytest.approx(2.0)  # a minute later it is gone
    assert est.recent_max_mbit(63.0) is None


def test_bad_settings_are_user_errors() -> None:
    with pytest.raises(UserError):
        make_filter("kalman")
    with pytest.raises(UserError):
        Ewma(0.0)
    with pytest.raises(UserError):
        HarmonicMean(0)
    with pytest.raises(UserError):
        LinkEstimator(initial_mbit=0.0)
    with pytest.raises(UserError):
        LinkEstimator(probe_after_s=5.0, probe_relaxed_s=1.0)
    assert DEFAULT_FILTER in FILTERS


def test_link_and_snapshot() -> None:
    est = LinkEstimator(initial_rtt_ms=25.0)
    assert est.link() is None
    assert est.link(default_mbit=3.0).uplink_mbit == 3.0
    est.observe(50_000, network_ms(50_000, 5.0, rtt_ms=25.0), rtt_sample_ms=25.0)
    link = est.link()
    assert link is not None and link.uplink_mbit == pytest.approx(5.0) and link.rtt_ms == 25.0
    snap = est.snapshot().to_json()
    assert snap["samples"] == 1 and math.isclose(snap["bandwidth_mbit"], 5.0, rel_tol=1e-3)
    est.reset()
    assert est.bandwidth_mbit is None and est.samples == 0 and est.needs_probe(0.0)
