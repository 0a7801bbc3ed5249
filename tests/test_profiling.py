"""Tests for cuttlefish_hf.profiling: the keep-dense decision follows the timings, the cache, the controller's
``skip_first_blocks="auto"`` and its config fields."""

from __future__ import annotations

import functools
import time

import pytest
import torch
from helpers import tiny_bert
from torch import nn

from cuttlefish_hf import Cuttlefish, CuttlefishConfig
from cuttlefish_hf import controller as controller_module
from cuttlefish_hf.compilation import graphs_compiled
from cuttlefish_hf.layers import FactorizedLayer, FactorizedLinear
from cuttlefish_hf.profiling import SynchronizedTimer, profile_layers, synthetic_input_shape


def blocks(*widths: tuple[int, int]) -> nn.Module:
    """One repeated block per ``(in, out)`` Linear, named ``"0.0"``, ``"1.0"``, ..."""
    return nn.Sequential(*(nn.Sequential(nn.Linear(i, o)) for i, o in widths))


class FakeTimer:
    """Seconds from a table keyed by (out_features, rank or None); counts calls and never runs anything."""

    def __init__(self, seconds: dict[tuple[int, int | None], float]) -> None:
        self.seconds = seconds
        self.calls = 0

    def __call__(self, run, module: nn.Module) -> float:
        self.calls += 1
        rank = module.rank if isinstance(module, FactorizedLayer) else None
        return self.seconds[(module.out_features, rank)]


def test_decision_follows_the_measured_timings():
    model = blocks((16, 8), (16, 12), (16, 16))
    timer = FakeTimer({(8, None): 1.0, (8, 2): 0.5,      # 2x faster: factorize
                       (12, None): 1.0, (12, 2): 0.95,   # faster, but by less than the 10% margin: keep dense
                       (16, None): 1.0, (16, 2): 1.5})   # slower: keep dense
    report = profile_layers(model, {"0.0": 2, "1.0": 2, "2.0": 2}, tokens_per_batch=4, timer=timer, margin=0.1,
                            cache={})
    assert report.keep_dense == ["1.0", "2.0"]
    first = report.layers[0]
    assert (first.dense_ms, first.factorized_ms, first.speedup, first.keep_dense) == (1000.0, 500.0, 2.0, False)
    assert first.shape == (8, 16) and first.input_shape == (4, 16) and first.rank == 2
    text = str(report)
    assert "keep dense: 2 of 3 layers" in text and "2.00x" in text and "margin 0.1" in text
    # The margin is the knob: without it, the 5% gain is enough.
    again = profile_layers(model, {"0.0": 2, "1.0": 2, "2.0": 2}, tokens_per_batch=4, timer=timer, margin=0.0,
                           cache={})
    assert again.keep_dense == ["2.0"]


def test_exactly_at_the_margin_factorizes():
    timer = FakeTimer({(8, None): 1.0, (8, 2): 0.5})
    report = profile_layers(blocks((16, 8)), {"0.0": 2}, timer=timer, margin=0.5, cache={})
    assert report.keep_dense == []


def test_dense_and_factorized_alternate_and_each_takes_the_median_of_its_repeats():
    order, values = [], iter([100.0, 100.0, 100.0, 100.0,  # two warm-up pairs
                              1.0, 3.0, 9.0, 3.0, 2.0, 50.0])  # timed pairs: dense 1, 9, 2 (median 2); factorized 3
    def timer(run, module):
        order.append("factorized" if isinstance(module, FactorizedLayer) else "dense")
        return next(values)

    report = profile_layers(blocks((16, 8)), {"0.0": 2}, timer=timer, warmup=2, repeats=3, cache={})
    assert order == ["dense", "factorized"] * 5  # a machine that drifts shifts both sides of each pair
    layer = report.layers[0]
    assert (layer.dense_ms, layer.factorized_ms) == (2000.0, 3000.0) and report.keep_dense == ["0.0"]
    speedups = sorted([1 / 3, 9 / 3, 2 / 50])
    assert layer.spread == pytest.approx((speedups[-1] - speedups[0]) / speedups[1])


def test_a_speedup_above_the_flop_ideal_is_flagged_as_a_measurement_fault():
    # 8x16 at rank 2: 128 multiply-adds per row dense, 2 * 24 = 48 factorized -> ideal 2.67x.
    timer = FakeTimer({(8, None): 1.0, (8, 2): 0.25})  # 4x: impossible
    report = profile_layers(blocks((16, 8)), {"0.0": 2}, timer=timer, cache={})
    assert report.layers[0].ideal == pytest.approx(128 / 48) and report.faults == ["0.0"]
    assert "measurement fault" in str(report) and "2.67x" in str(report)
    fine = profile_layers(blocks((16, 8)), {"0.0": 2}, timer=FakeTimer({(8, None): 1.0, (8, 2): 0.5}), cache={})
    assert fine.faults == [] and "fault" not in str(fine)


def test_cache_avoids_measuring_again():
    model = blocks((16, 8), (16, 8), (16, 8))
    timer = FakeTimer({(8, None): 1.0, (8, 2): 0.5, (8, 3): 0.6})
    cache: dict = {}
    first = profile_layers(model, {"0.0": 2, "1.0": 2, "2.0": 2}, timer=timer, cache=cache, warmup=1, repeats=2)
    assert timer.calls == 2 * 3  # equal layers: timed once, dense and factorized, 3 timer calls each
    assert (first.measured, first.cached) == (1, 2)
    second = profile_layers(model, {"0.0": 2, "1.0": 2, "2.0": 2}, timer=timer, cache=cache, warmup=1, repeats=2)
    assert timer.calls == 6 and (second.measured, second.cached) == (0, 3)
    assert [(t.dense_ms, t.factorized_ms) for t in second.layers] == [(t.dense_ms, t.factorized_ms)
                                                                     for t in first.layers]
    profile_layers(model, {"0.0": 3}, timer=timer, cache=cache, warmup=1, repeats=2)  # new rank: a new pair
    assert timer.calls == 6 + 6
    profile_layers(model, {"0.0": 2}, timer=timer, cache=cache, warmup=1, repeats=2, dtype=torch.float64)
    assert timer.calls == 12 + 6  # another dtype: measured again
    profile_layers(model, {"0.0": 2}, timer=timer, cache=cache, warmup=1, repeats=2, tokens_per_batch=8)
    assert timer.calls == 18 + 6  # another input size too


def test_input_shapes_and_convs():
    model = nn.Sequential(nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Linear(8, 8)))
    seen = []

    def timer(run, module):
        seen.append(type(module).__name__)
        run()  # the closure really runs forward+backward on the synthetic input
        return 1.0

    report = profile_layers(model, {"0.0": 2, "0.1": 2}, tokens_per_batch=36, input_shapes={"0.1": (5, 8)},
                            timer=timer, warmup=0, repeats=1, cache={})
    assert [t.input_shape for t in report.layers] == [(1, 4, 6, 6), (5, 8)]
    assert seen == ["Conv2d", "FactorizedConv2d", "Linear", "FactorizedLinear"]
    assert synthetic_input_shape(nn.Linear(3, 5), 7) == (7, 3)
    # An already factorized layer is profiled at its dense shape.
    factorized = nn.Sequential(nn.Sequential(FactorizedLinear(16, 8, rank=4)))
    report = profile_layers(factorized, {"0.0": 2}, timer=timer, warmup=0, repeats=1, cache={})
    assert report.layers[0].shape == (8, 16)


def test_real_timer_smoke():
    model = nn.Sequential(nn.Sequential(nn.Linear(32, 32)), nn.Sequential(nn.Conv2d(4, 8, 3)))
    report = profile_layers(model, {"0.0": 4, "1.0": 2}, tokens_per_batch=64, warmup=1, repeats=2, cache={})
    assert all(t.dense_ms > 0 and t.factorized_ms > 0 for t in report.layers)
    assert 0 < report.seconds < 30 and report.device == "cpu" and report.dtype == "float32"
    # A module's first call warms up, then doubles the window until it lasts the target (here never: capped).
    timer, layer, calls = SynchronizedTimer("cpu", target_seconds=1.0, max_calls=6), nn.Linear(2, 2), []
    timer(lambda: calls.append(1), layer)
    assert len(calls) == 1 + 1 + 2 + 4 + 6
    calls.clear()
    timer(lambda: calls.append(1), layer)
    assert len(calls) == 6
    # ... and stops growing once a window lasts the target: 3 ms calls fill 5 ms with 2 of them.
    timer, calls = SynchronizedTimer("cpu", target_seconds=5e-3), []
    timer(lambda: (calls.append(1), time.sleep(3e-3)), layer)
    assert len(calls) == 1 + 1 + 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(margin=1.0), "margin"),
    (dict(repeats=0), "repeats"),
    (dict(tokens_per_batch=0), "tokens_per_batch"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        profile_layers(blocks((4, 4)), {"0.0": 1}, **kwargs)


def test_unknown_layer():
    with pytest.raises(ValueError, match="not Linear/Conv2d"):
        profile_layers(blocks((4, 4)), {"0": 1})


# -- config and controller ------------------------------------------------------------------------------------
def test_config_accepts_auto_and_checks_profile_fields():
    config = CuttlefishConfig(skip_first_blocks="auto", profile_margin=0.2, profile_tokens_per_batch=512,
                              profile_dtype="bfloat16")
    assert config.resolved_skip_first_blocks == "auto"
    assert CuttlefishConfig.from_dict(config.to_dict()) == config
    for kwargs, field in [(dict(skip_first_blocks="yes"), "skip_first_blocks"),
                          (dict(profile_margin=1.0), "profile_margin"),
                          (dict(profile_tokens_per_batch=0), "profile_tokens_per_batch"),
                          (dict(profile_dtype="fp16"), "profile_dtype")]:
        with pytest.raises(ValueError, match=field):
            CuttlefishConfig(**kwargs)


def test_controller_auto_keeps_slow_layers_dense(monkeypatch):
    # Factorizing only pays off for the 64-wide intermediate layers; everything else stays dense.
    timer = FakeTimer({(32, None): 1.0, (32, 8): 1.0, (64, None): 1.0, (64, 8): 0.5})
    monkeypatch.setattr(controller_module, "profile_layers", functools.partial(profile_layers, timer=timer, cache={}))
    model = tiny_bert()
    config = CuttlefishConfig(skip_first_blocks="auto", rank_rule="fixed_ratio", rank_ratio=0.25,
                              profile_tokens_per_batch=16)
    controller = Cuttlefish(model, config)
    assert len(controller.targets) == 12  # "auto" skips no block up front
    controller.begin()
    controller.switch(1)
    assert sorted(controller.report.plan) == ["bert.encoder.layer.0.intermediate.dense",
                                              "bert.encoder.layer.1.intermediate.dense"]
    summary = controller.summary()
    assert len(summary["profile_kept_dense"]) == 10 and summary["profile_seconds"] > 0
    assert {d.name for d in controller.decisions if not d.factorize} == set(summary["profile_kept_dense"])
    assert controller.profile_report.layers[0].input_shape == (16, 32)
    restored = Cuttlefish(model, config)
    restored.load_state_dict(controller.state_dict())
    assert restored.timings.profile_seconds == controller.timings.profile_seconds


def test_controller_warns_when_timings_beat_the_flop_ideal(monkeypatch, caplog):
    timer = FakeTimer({(32, None): 1.0, (32, 8): 0.01, (64, None): 1.0, (64, 8): 0.5})  # 100x at an ideal of 2-2.7x
    monkeypatch.setattr(controller_module, "profile_layers", functools.partial(profile_layers, timer=timer, cache={}))
    config = CuttlefishConfig(skip_first_blocks="auto", rank_rule="fixed_ratio", rank_ratio=0.25,
                              profile_tokens_per_batch=16)
    controller = Cuttlefish(tiny_bert(), config)
    controller.begin()
    with caplog.at_level("WARNING", logger="cuttlefish_hf.controller"):
        controller.switch(1)
    assert len(controller.profile_report.faults) == 10
    assert "10 layers timed faster than their FLOP ideal" in caplog.text and "quiet machine" in caplog.text


def test_controller_without_auto_does_not_profile(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("profiled without skip_first_blocks='auto'")

    monkeypatch.setattr(controller_module, "profile_layers", fail)
    controller = Cuttlefish(tiny_bert(), CuttlefishConfig(skip_first_blocks=1, rank_rule="fixed_ratio"))
    controller.begin()
    controller.switch(1)
    assert controller.summary()["profile_seconds"] == 0.0 and len(controller.report.plan) == 6


def test_compiled_profile_runs_each_distinct_layer_through_torch_compile_then_drops_the_graphs():
    torch.compiler.reset()
    before_anything = graphs_compiled()
    runs = [0]
    compiled_elsewhere = torch.compile(lambda x: x * 2, backend="eager")
    compiled_elsewhere(torch.ones(2))
    assert graphs_compiled() == before_anything + 1

    def timer(run, module):
        run()
        runs[0] += 1
        return 1.0 if isinstance(module, nn.Linear) else 0.5

    model = blocks((32, 32), (32, 32))
    eager = profile_layers(model, {"0.0": 4, "1.0": 4}, timer=timer, warmup=1, repeats=1, cache={})
    assert graphs_compiled() == before_anything + 1 and not eager.compiled  # eager: nothing compiled
    report = profile_layers(model, {"0.0": 4, "1.0": 4}, timer=timer, warmup=1, repeats=1, cache={}, compiled=True)
    # The dense and the factorized layer each compiled once; the second, equal block came from the cache.
    assert graphs_compiled() == before_anything + 3 and report.compiled and (report.measured, report.cached) == (1, 1)
    assert runs[0] == 2 * 4  # each profile: (1 warm-up + 1 timed) x (dense, factorized), every run really run
    assert "on cpu in float32, compiled;" in str(report) and report.keep_dense == []
    # Its graphs were dropped afterwards: what was compiled before re-traces once on its next call.
    compiled_elsewhere(torch.ones(2))
    assert graphs_compiled() == before_anything + 4
    torch.compiler.reset()


@pytest.mark.parametrize("compiled", [False, True])
def test_controller_profiles_compiled_when_the_run_compiled(monkeypatch, compiled):
    seen = {}

    def recording_profile(*args, **kwargs):
        seen.update(kwargs)
        return profile_layers(*args, **kwargs, timer=FakeTimer({(32, None): 1.0, (32, 8): 0.5, (64, None): 1.0,
                                                                 (64, 8): 0.5}), cache={})

    monkeypatch.setattr(controller_module, "profile_layers", recording_profile)
    torch.compiler.reset()
    model = tiny_bert()
    runner = torch.compile(model, backend="eager") if compiled else model
    controller = Cuttlefish(runner, CuttlefishConfig(skip_first_blocks="auto", rank_rule="fixed_ratio",
                                                     profile_tokens_per_batch=16))
    controller.begin()
    runner(input_ids=torch.ones(2, 8, dtype=torch.long))  # a dense step, compiled or not
    controller.switch(1)
    assert seen["compiled"] is compiled and controller.profile_report.compiled is compiled
    torch.compiler.reset()
