"""Tests for cuttlefish_hf.tracker: when the stable ranks have settled and training should switch."""

from __future__ import annotations

import json
import math

import pytest

from cuttlefish_hf.tracker import LOOSENING, StableRankTracker


def _first_switch(tracker: StableRankTracker, curves: dict[str, callable], limit: int = 200) -> int | None:
    """Feed ``curves[name](k)`` for k = 0, 1, ...; return the 1-based measurement count at the first switch."""
    for k in range(limit):
        if tracker.update({name: curve(k) for name, curve in curves.items()}):
            return k + 1
    return None


def _reference_switch(curve, full_rank, window, eps_relative, ema_decay, min_measurements, limit=200):
    """Independent re-statement of the rule for one layer: EMA, |diff|, mean of last ``window`` <= eps*full."""
    ema = []
    for k in range(limit):
        value = curve(k)
        ema.append(value if not ema else ema_decay * ema[-1] + (1 - ema_decay) * value)
        if len(ema) > window and k + 1 >= min_measurements:
            diffs = [abs(b - a) for a, b in zip(ema[-window - 1:], ema[-window:])]
            if sum(diffs) / window <= eps_relative * full_rank:
                return k + 1
    return None


def _flat(value):
    return lambda k: value


def _ramp(slope, start=10.0):
    return lambda k: start + slope * k


def _settling(tau, start=60.0, end=20.0):
    return lambda k: end + (start - end) * math.exp(-k / tau)


# --------------------------------------------------------------------------- basic switching
def test_flat_curves_switch_exactly_at_min_measurements():
    tracker = StableRankTracker({"a": 64, "b": 128}, window=3, min_measurements=6)
    decisions = [tracker.update({"a": 12.5, "b": 40.0}) for _ in range(8)]
    assert decisions == [False] * 5 + [True] * 3
    assert tracker.num_measurements == 8


def test_flat_curves_wait_for_a_full_window():
    # min_measurements (2) < window + 1: the first test needs window + 1 = 6 measurements.
    tracker = StableRankTracker({"a": 64}, window=5, min_measurements=2)
    decisions = [tracker.update({"a": 3.0}) for _ in range(7)]
    assert decisions.index(True) + 1 == 6
    assert tracker.mean_change("a") == 0.0


def test_mean_change_is_none_until_window_filled():
    tracker = StableRankTracker({"a": 64}, window=3, ema_decay=0.0)  # ema_decay 0: smoothed == raw
    for k in range(3):
        tracker.update({"a": float(k)})
        assert tracker.mean_change("a") is None
    tracker.update({"a": 10.0})  # raw 0, 1, 2, 10: diffs 1, 1, 8
    assert tracker.mean_change("a") == pytest.approx(10 / 3)
    assert tracker.history["a"] == [0.0, 1.0, 2.0, 10.0]


def test_ema_smoothing_values():
    tracker = StableRankTracker({"a": 64}, ema_decay=0.5)
    for value in (8.0, 4.0, 4.0):
        tracker.update({"a": value})
    assert tracker.smoothed["a"] == [8.0, 6.0, 5.0]


def test_settling_curves_switch_later_than_flat_and_slower_later_still():
    kwargs = dict(window=3, eps_relative=0.001, min_measurements=5, ema_decay=0.5)
    full = 100  # threshold 0.1 rank per measurement
    flat = _first_switch(StableRankTracker({"a": full}, **kwargs), {"a": _flat(20.0)})
    fast = _first_switch(StableRankTracker({"a": full}, **kwargs), {"a": _settling(2.0)})
    slow = _first_switch(StableRankTracker({"a": full}, **kwargs), {"a": _settling(8.0)})
    assert flat == 5
    assert flat < fast < slow
    for tau, got in ((2.0, fast), (8.0, slow)):
        assert got == _reference_switch(_settling(tau), full, 3, 0.001, 0.5, 5)


def test_layers_switch_only_when_all_are_stable():
    # Two layers: one flat, one settling slowly. With 2 layers, 1 unstable is 50%: no loosening.
    kwargs = dict(window=3, eps_relative=0.001, min_measurements=5)
    both = _first_switch(StableRankTracker({"a": 100, "b": 100}, **kwargs), {"a": _flat(20.0), "b": _settling(8.0)})
    alone = _first_switch(StableRankTracker({"b": 100}, **kwargs), {"b": _settling(8.0)})
    assert both == alone


def test_never_settling_curve_switches_exactly_at_max_measurements():
    tracker = StableRankTracker({"a": 64}, window=3, min_measurements=2, max_measurements=20)
    decisions = [tracker.update({"a": 10.0 + 2.0 * k}) for k in range(22)]
    assert decisions.index(True) + 1 == 20
    assert not any(decisions[:19])
    assert tracker.unstable_layers() == ["a"]


def test_without_max_a_ramp_never_switches():
    tracker = StableRankTracker({"a": 64}, window=3, max_measurements=None)
    assert _first_switch(tracker, {"a": _ramp(1.0)}, limit=150) is None


def test_max_measurements_wins_over_min_measurements():
    tracker = StableRankTracker({"a": 64}, window=2, min_measurements=10, max_measurements=4)
    assert [tracker.update({"a": 1.0}) for _ in range(4)] == [False, False, False, True]


# --------------------------------------------------------------------------- loosening
def test_loosening_table_is_the_references():
    assert LOOSENING == ((0.1, 5.0), (0.2, 2.5))


def _loosening_run(n_layers: int, slope: float) -> int | None:
    """``n_layers - 1`` flat layers and one ramping at ``slope``; threshold 1.0 rank/measurement."""
    names = [f"l{i}" for i in range(n_layers)]
    tracker = StableRankTracker({n: 100 for n in names}, window=3, eps_relative=0.01, min_measurements=12,
                                max_measurements=40)
    curves = {n: _flat(30.0) for n in names[1:]}
    curves[names[0]] = _ramp(slope)
    return _first_switch(tracker, curves)


def test_one_layer_slightly_above_eps_among_many_still_switches():
    # 1 of 10 unstable (10%): threshold x5; 1.2 > 1.0 but <= 5.0 -> switch at min_measurements.
    assert _loosening_run(10, 1.2) == 12
    assert _loosening_run(10, 4.5) == 12
    assert _loosening_run(10, 6.0) == 40  # beyond x5: waits for max_measurements
    # 1 of 5 unstable (20%): threshold x2.5.
    assert _loosening_run(5, 2.0) == 12
    assert _loosening_run(5, 3.0) == 40
    # 1 of 2 unstable (50%): no loosening at all.
    assert _loosening_run(2, 1.2) == 40
    assert _loosening_run(2, 0.9) == 12


def test_unstable_layers_reports_loosened_view():
    names = [f"l{i}" for i in range(10)]
    tracker = StableRankTracker({n: 100 for n in names}, window=3, eps_relative=0.01, min_measurements=1)
    for k in range(12):
        values = {n: 30.0 for n in names}
        values["l0"] = 10.0 + 1.2 * k  # strictly unstable, loosened-stable
        tracker.update(values)
    assert tracker.unstable_layers() == []
    assert tracker.mean_change("l0") == pytest.approx(1.2, rel=0.01)
    tracker2 = StableRankTracker({"l0": 100, "l1": 100}, window=3, eps_relative=0.01)
    for k in range(12):
        tracker2.update({"l0": 10.0 + 1.2 * k, "l1": 30.0})
    assert tracker2.unstable_layers() == ["l0"]


# --------------------------------------------------------------------------- relative threshold
def test_threshold_is_relative_to_full_rank():
    # Same absolute change (0.5 rank per measurement): stable for a 1024-wide layer (threshold 1.024),
    # unstable for a 64-wide one (threshold 0.064).
    kwargs = dict(window=3, eps_relative=0.001, min_measurements=6, max_measurements=30)
    wide = _first_switch(StableRankTracker({"a": 1024}, **kwargs), {"a": _ramp(0.5)})
    narrow = _first_switch(StableRankTracker({"a": 64}, **kwargs), {"a": _ramp(0.5)})
    assert wide == 6
    assert narrow == 30


def test_eps_zero_requires_exactly_flat():
    tracker = StableRankTracker({"a": 64}, window=2, eps_relative=0.0, min_measurements=1, max_measurements=10)
    assert _first_switch(tracker, {"a": _flat(5.0)}) == 3
    tracker = StableRankTracker({"a": 64}, window=2, eps_relative=0.0, max_measurements=10)
    assert _first_switch(tracker, {"a": _settling(3.0)}) == 10


# --------------------------------------------------------------------------- state and errors
def _curves():
    return {"a": _settling(3.0), "b": _settling(6.0, start=100.0, end=40.0), "c": lambda k: 15 + (k % 3) * 0.01}


@pytest.mark.parametrize("cut", [1, 4, 9])
def test_state_dict_round_trip_continues_identically(cut):
    kwargs = dict(window=3, eps_relative=0.002, min_measurements=4, max_measurements=50)
    full_ranks = {"a": 64, "b": 128, "c": 32}
    curves = _curves()
    reference = StableRankTracker(full_ranks, **kwargs)
    expected = [reference.update({n: f(k) for n, f in curves.items()}) for k in range(30)]
    assert True in expected and expected.index(True) > 9  # the cut points fall before the switch

    first = StableRankTracker(full_ranks, **kwargs)
    got = [first.update({n: f(k) for n, f in curves.items()}) for k in range(cut)]
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints go through JSON
    resumed = StableRankTracker(full_ranks, **kwargs)
    resumed.load_state_dict(state)
    assert resumed.num_measurements == cut
    got += [resumed.update({n: f(k) for n, f in curves.items()}) for k in range(cut, 30)]
    assert got == expected
    assert resumed.smoothed == reference.smoothed
    assert resumed.history == reference.history


def test_state_dict_is_a_copy():
    tracker = StableRankTracker({"a": 64})
    tracker.update({"a": 1.0})
    state = tracker.state_dict()
    state["history"]["a"].append(99.0)
    assert tracker.history["a"] == [1.0]


def test_load_state_for_other_layers_raises():
    tracker = StableRankTracker({"a": 64, "b": 64})
    tracker.update({"a": 1.0, "b": 2.0})
    other = StableRankTracker({"a": 64, "c": 64})
    with pytest.raises(ValueError, match="different set of layers"):
        other.load_state_dict(tracker.state_dict())
    assert other.num_measurements == 0


def test_missing_layer_in_measurement_raises():
    tracker = StableRankTracker({"a": 64, "b": 64})
    with pytest.raises(ValueError, match="missing tracked layers"):
        tracker.update({"a": 1.0})
    assert tracker.num_measurements == 0
    tracker.update({"a": 1.0, "b": 1.0, "extra": 5.0})  # extra names are ignored
    assert set(tracker.history) == {"a", "b"}


def test_bad_construction_raises():
    with pytest.raises(ValueError, match="at least one layer"):
        StableRankTracker({})
    with pytest.raises(ValueError, match="window"):
        StableRankTracker({"a": 4}, window=0)
