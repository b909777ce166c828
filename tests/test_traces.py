"""Bandwidth traces: loading, lookups, transfer integration, generators, errors."""

from __future__ import annotations

import json
import math
import random
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitinfer.errors import UserError
from splitinfer.simulations.traces import (
    MIN_MBIT,
    PRESETS,
    Trace,
    bundled_trace_names,
    constant,
    load_trace,
    markov_good_bad,
    steps,
)

EXPECTED_SAMPLES = {
    "bus.ljansbakken-oslo": 449,
    "car.snaroya-smestad": 395,
    "ferry.nesoddtangen-oslo": 945,
    "metro.kalbakken-jernbanetorget": 192,
    "fcc-10322-edition.cnn.com": 301,
    "fcc-13092-www.amazon.com": 50,
}


def _readme_rows() -> dict[str, list[float]]:
    text = (resources.files("splitinfer.simulations") / "traces" / "README.md").read_text(encoding="utf-8")
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0].endswith(".tsv"):
            rows[cells[0][: -len(".tsv")]] = [float(c) for c in cells[1:]]
    return rows


# ---------------------------------------------------------------- bundled traces and presets


def test_bundled_names_are_the_six_files() -> None:
    assert bundled_trace_names() == sorted(EXPECTED_SAMPLES)


@pytest.mark.parametrize("name", sorted(EXPECTED_SAMPLES))
def test_every_bundled_trace_loads_and_matches_readme(name: str) -> None:
    trace = load_trace(name)
    assert trace.name == name
    assert len(trace) == EXPECTED_SAMPLES[name]
    assert trace.times_s.dtype == np.float64 and trace.times_s[0] == 0.0
    assert np.all(np.diff(trace.times_s) > 0)
    assert trace.rtt_ms is None and trace.loss is None
    assert trace.duration_s > trace.times_s[-1]

    samples, period, mean, lo, hi = _readme_rows()[name]
    assert samples == len(trace)
    assert trace.duration_s == pytest.approx(period, abs=0.051)
    assert trace.mean_mbit() == pytest.approx(mean, abs=0.0051)
    assert trace.min_mbit() == pytest.approx(lo, abs=0.0051)
    assert trace.max_mbit() == pytest.approx(hi, abs=0.0051)

    summary = trace.summary()
    assert summary["name"] == name and summary["samples"] == len(trace)
    assert summary["mean_mbit"] == trace.mean_mbit()
    json.dumps(summary)


@pytest.mark.parametrize(
    "spec, full",
    [
        ("bus", "bus.ljansbakken-oslo"),
        ("metro", "metro.kalbakken-jernbanetorget"),
        ("bus.tsv", "bus.ljansbakken-oslo"),
        ("car.snaroya-smestad", "car.snaroya-smestad"),
        ("ferry.nesoddtangen-oslo.tsv", "ferry.nesoddtangen-oslo"),
        ("fcc-13092", "fcc-13092-www.amazon.com"),
    ],
)
def test_bundled_trace_by_prefix_or_full_name(spec: str, full: str) -> None:
    assert load_trace(spec).name == full


def test_ambiguous_prefix_is_a_user_error() -> None:
    with pytest.raises(UserError, match="ambiguous"):
        load_trace("fcc")


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_are_constant_traces(preset: str) -> None:
    trace = load_trace(preset)
    rate = PRESETS[preset]
    assert trace.name == preset
    assert trace.mean_mbit() == pytest.approx(rate)
    assert trace.min_mbit() == trace.max_mbit() == rate
    for t in (0.0, 12.3, 1e5):
        assert trace.bandwidth_at(t) == rate
    assert trace.transfer_end(3.0, 1_000_000) == pytest.approx(3.0 + 8.0 / rate)


def test_preset_values() -> None:
    assert PRESETS == {"cat1": 0.13, "3g": 1.1, "4g": 5.85, "wifi": 18.88}
    assert load_trace("4G").name == "4g"


def test_load_from_file_with_rtt_and_loss(tmp_path: Path) -> None:
    path = tmp_path / "lab.tsv"
    path.write_text(
        "# my lab link\n"
        "\n"
        "10.0 2.0 40 0.0   # starts at 10 s: shifted to 0\n"
        "11.0\t4.0\t50\t0.01\n"
        "13.0 0.001 80 0.5\n",
        encoding="utf-8",
    )
    for spec in (str(path), path):
        trace = load_trace(spec)
        assert trace.name == "lab"
        assert trace.times_s.tolist() == [0.0, 1.0, 3.0]
        assert trace.uplink_mbit.tolist() == [2.0, 4.0, MIN_MBIT]  # clamped to the floor
        assert trace.duration_s == pytest.approx(3.0 + 1.5)  # + median interval
        assert trace.rtt_at(0.5) == 40 and trace.rtt_at(2.0) == 50 and trace.rtt_at(3.2) == 80
        assert trace.loss_at(1.0) == 0.01 and trace.loss_at(4.5 + 3.5) == 0.5


def test_rtt_and_loss_are_none_safe() -> None:
    trace = load_trace("bus")
    assert trace.rtt_at(5.0) is None and trace.loss_at(5.0) is None
    assert constant(5.0, rtt_ms=30).rtt_at(100.0) == 30


# ---------------------------------------------------------------- lookups and statistics


def test_bandwidth_at_is_piecewise_constant_and_loops() -> None:
    trace = steps([(2.0, 1.0), (3.0, 10.0), (1.0, 4.0)])
    assert trace.duration_s == 6.0
    cases = {0.0: 1.0, 1.999: 1.0, 2.0: 10.0, 4.9: 10.0, 5.0: 4.0, 5.99: 4.0, 6.0: 1.0, 8.5: 10.0, 600.0 + 5.5: 4.0}
    for t, want in cases.items():
        assert trace.bandwidth_at(t) == want, t


def test_mean_is_time_weighted() -> None:
    trace = steps([(9.0, 1.0), (1.0, 11.0)])
    assert trace.mean_mbit() == pytest.approx(2.0)  # the sample mean would be 6
    assert trace.min_mbit() == 1.0 and trace.max_mbit() == 11.0


def test_transfer_end_simple_cases() -> None:
    trace = steps([(2.0, 1.0), (3.0, 10.0)])  # 2 Mbit then 30 Mbit per 5 s period
    assert trace.transfer_end(0.0, 0) == 0.0
    assert trace.transfer_end(0.0, 125_000) == pytest.approx(1.0)  # 1 Mbit at 1 Mbit/s
    assert trace.transfer_end(1.0, 250_000) == pytest.approx(2.1)  # 1 Mbit, then 1 Mbit at 10
    # 40 Mbit from t=0: one full period (32 Mbit) + 2 Mbit slow + 6 Mbit fast
    assert trace.transfer_end(0.0, 5_000_000) == pytest.approx(5.0 + 2.0 + 0.6)
    # starting after many loops
    assert trace.transfer_end(1000.0 + 1.0, 250_000) == pytest.approx(1002.1)
    with pytest.raises(ValueError):
        trace.transfer_end(0.0, -1)


def test_transfer_end_loops_past_the_end_of_a_real_trace() -> None:
    trace = load_trace("metro")
    per_period_bytes = trace.mean_mbit() * trace.duration_s / 8e-6
    start = 17.0
    end = trace.transfer_end(start, int(3 * per_period_bytes))
    assert end == pytest.approx(start + 3 * trace.duration_s, rel=1e-6)
    far = trace.transfer_end(50 * trace.duration_s + start, 100_000)
    assert far - 50 * trace.duration_s == pytest.approx(trace.transfer_end(start, 100_000))


def _reference_transfer_end(trace: Trace, start: float, nbytes: int) -> float:
    """Walk the segments one by one (no bisect, no cumulative tables)."""
    remaining = nbytes * 8e-6
    period = trace.duration_s
    bounds = [float(x) for x in trace.times_s] + [period]
    rates = [float(x) for x in trace.uplink_mbit]
    loop = math.floor(start / period)
    i = int(np.searchsorted(trace.times_s, start - loop * period, side="right")) - 1
    t = start
    while True:
        seg_end = loop * period + bounds[i + 1]
        can = max(seg_end - t, 0.0) * rates[i]
        if can >= remaining:
            return t + remaining / rates[i]
        remaining -= can
        t = seg_end
        i += 1
        if i == len(rates):
            i, loop = 0, loop + 1


def _small_step_transfer_end(trace: Trace, start: float, nbytes: int, dt: float, horizon: float) -> float:
    """Brute force: integrate the bandwidth on a fine time grid (midpoint rule) until nbytes are sent."""
    need = nbytes * 8e-6
    grid = start + np.arange(0.0, horizon, dt)
    mid = np.mod(grid + dt / 2, trace.duration_s)
    idx = np.searchsorted(trace.times_s, mid, side="right") - 1
    sent = np.cumsum(trace.uplink_mbit[idx] * dt)
    k = int(np.searchsorted(sent, need, side="left"))
    assert k < len(grid), "transfer did not finish within the brute-force horizon"
    return float(grid[k] + dt)  # end of the step during which the last bit left


@st.composite
def random_traces(draw: st.DrawFn) -> Trace:
    n = draw(st.integers(1, 12))
    widths = draw(st.lists(st.floats(0.05, 5.0), min_size=n, max_size=n))
    rates = draw(st.lists(st.floats(0.05, 50.0), min_size=n, max_size=n))
    times = np.concatenate(([0.0], np.cumsum(widths)[:-1]))
    return Trace("random", times, np.array(rates), period_s=float(sum(widths)))


@settings(max_examples=200, deadline=None)
@given(trace=random_traces(), start_frac=st.floats(0.0, 4.0), size_frac=st.floats(0.0, 3.5))
def test_transfer_end_matches_segment_walk(trace: Trace, start_frac: float, size_frac: float) -> None:
    start = start_frac * trace.duration_s
    per_period_bytes = trace.mean_mbit() * trace.duration_s / 8e-6
    nbytes = int(size_frac * per_period_bytes)
    got = trace.transfer_end(start, nbytes)
    want = _reference_transfer_end(trace, start, nbytes)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-9)
    assert got >= start


def test_transfer_end_matches_small_step_integration_on_random_traces() -> None:
    rng = random.Random(1234)
    dt = 1e-4
    for _ in range(40):
        n = rng.randint(1, 10)
        widths = [rng.uniform(0.1, 3.0) for _ in range(n)]
        rates = [rng.uniform(1.0, 10.0) for _ in range(n)]
        trace = Trace("r", np.concatenate(([0.0], np.cumsum(widths)[:-1])), np.array(rates), period_s=sum(widths))
        start = rng.uniform(0.0, 3 * trace.duration_s)
        nbytes = rng.randint(1, int(2.5 * trace.mean_mbit() * trace.duration_s / 8e-6))
        got = trace.transfer_end(start, nbytes)
        need_s = nbytes * 8e-6 / trace.min_mbit()  # upper bound on the transfer time
        brute = _small_step_transfer_end(trace, start, nbytes, dt, horizon=need_s + 1.0)
        # the grid misplaces at most dt of bits at each segment boundary crossed
        crossings = n * (math.ceil((got - start) / trace.duration_s) + 1)
        tol = dt * (2 + crossings * trace.max_mbit() / trace.min_mbit())
        assert abs(got - brute) <= tol, (got, brute, tol)


@settings(max_examples=100, deadline=None)
@given(trace=random_traces(), start=st.floats(0.0, 100.0), a=st.integers(0, 10**7), b=st.integers(0, 10**7))
def test_transfer_end_is_additive_and_monotone(trace: Trace, start: float, a: int, b: int) -> None:
    mid = trace.transfer_end(start, a)
    both = trace.transfer_end(start, a + b)
    assert trace.transfer_end(mid, b) == pytest.approx(both, rel=1e-9, abs=1e-7)
    assert both >= mid >= start


# ---------------------------------------------------------------- transforms, JSON


def test_scaled_multiplies_bandwidth_and_keeps_the_rest() -> None:
    trace = constant(2.0, duration_s=10.0, rtt_ms=25.0)
    double = trace.scaled(2.0)
    assert double.bandwidth_at(3.0) == 4.0 and double.rtt_at(3.0) == 25.0
    assert double.duration_s == 10.0
    assert trace.bandwidth_at(3.0) == 2.0  # original untouched
    with pytest.raises(UserError):
        trace.scaled(0)


def test_json_round_trip() -> None:
    for trace in (load_trace("bus"), constant(3.0, rtt_ms=12.0), markov_good_bad(8, 1, 0.2, 0.5, 0.5, 30, seed=3)):
        data = json.loads(json.dumps(trace.to_json()))
        back = Trace.from_json(data)
        assert back == trace
        assert back.duration_s == trace.duration_s
        assert back.transfer_end(7.0, 123_456) == trace.transfer_end(7.0, 123_456)
    with pytest.raises(UserError):
        Trace.from_json({"name": "x", "times_s": [0.0]})


def test_trace_is_frozen_and_read_only() -> None:
    trace = load_trace("car")
    with pytest.raises(AttributeError):
        trace.name = "other"  # type: ignore[misc]
    with pytest.raises(ValueError):
        trace.uplink_mbit[0] = 100.0


# ---------------------------------------------------------------- generators


def test_constant() -> None:
    trace = constant(5.0, duration_s=20.0)
    assert len(trace) == 1 and trace.duration_s == 20.0
    assert trace.bandwidth_at(1234.5) == 5.0 and trace.mean_mbit() == 5.0


def test_steps() -> None:
    trace = steps([(10, 5.85), (5, 0.13), (10, 5.85)])
    assert trace.times_s.tolist() == [0.0, 10.0, 15.0]
    assert trace.duration_s == 25.0
    assert trace.mean_mbit() == pytest.approx((20 * 5.85 + 5 * 0.13) / 25)


def test_markov_good_bad_properties() -> None:
    a = markov_good_bad(20.0, 0.5, 0.1, 0.3, step_s=0.5, duration_s=500.0, seed=7)
    b = markov_good_bad(20.0, 0.5, 0.1, 0.3, step_s=0.5, duration_s=500.0, seed=7)
    c = markov_good_bad(20.0, 0.5, 0.1, 0.3, step_s=0.5, duration_s=500.0, seed=8)
    assert a == b
    assert not np.array_equal(a.uplink_mbit, c.uplink_mbit)
    assert set(a.uplink_mbit.tolist()) == {20.0, 0.5}
    assert len(a) == 1000 and a.duration_s == pytest.approx(500.0)
    assert np.allclose(np.diff(a.times_s), 0.5)
    assert a.uplink_mbit[0] == 20.0  # starts good
    # stationary share of the good state: p_bg / (p_gb + p_bg) = 0.75
    good_share = float(np.mean(a.uplink_mbit == 20.0))
    assert 0.6 < good_share < 0.9
    never_bad = markov_good_bad(20.0, 0.5, 0.0, 1.0, step_s=1.0, duration_s=50.0, seed=1)
    assert set(never_bad.uplink_mbit.tolist()) == {20.0}


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "empty"),
        ("# only a comment\n\n", "empty"),
        ("0 1.0\n1 abc\n", "not a number"),
        ("0 1.0\n1 2.0\n1 3.0\n", "not after"),
        ("0 1.0\n2 2.0\n1 3.0\n", "not after"),
        ("0 1.0\n1 -2.0\n", "bandwidth"),
        ("0 1.0\n1 0\n", "bandwidth"),
        ("0\n", "columns"),
        ("0 1 2 3 4\n", "columns"),
        ("0 1 20\n1 2\n", "columns"),
        ("0 1 20 1.5\n", "loss"),
        ("0 1 -5\n", "rtt"),
        ("0 nan\n", "finite"),
    ],
)
def test_bad_trace_files_raise_user_error(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.tsv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=message) as info:
        load_trace(str(path))
    assert "\n" not in str(info.value)


def test_missing_and_unknown_traces_raise_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_trace(str(tmp_path / "nope.tsv"))
    with pytest.raises(UserError, match="not found"):
        load_trace("some/dir/nope")
    with pytest.raises(UserError, match="directory"):
        load_trace(str(tmp_path) + "/")
    with pytest.raises(UserError, match="unknown trace"):
        load_trace("submarine")
    with pytest.raises(UserError):
        load_trace("")
    (tmp_path / "binary.tsv").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UserError):
        load_trace(str(tmp_path / "binary.tsv"))


def test_bad_constructor_arguments_raise_user_error() -> None:
    with pytest.raises(UserError):
        Trace("x", np.array([1.0, 2.0]), np.array([1.0, 1.0]))  # does not start at 0
    with pytest.raises(UserError):
        Trace("x", np.array([0.0, 1.0]), np.array([1.0]))  # length mismatch
    with pytest.raises(UserError):
        Trace("x", np.array([0.0, 1.0]), np.array([1.0, 1.0]), period_s=1.0)  # period too short
    with pytest.raises(UserError):
        Trace("x", np.array([], dtype=float), np.array([], dtype=float))
    with pytest.raises(UserError):
        steps([])
    with pytest.raises(UserError):
        steps([(0.0, 1.0)])
    with pytest.raises(UserError):
        markov_good_bad(10, 1, 1.5, 0.1, 1.0, 10.0, seed=0)
    with pytest.raises(UserError):
        constant(1.0, duration_s=0)
