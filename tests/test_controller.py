"""``Cuttlefish``, the controller, as its spec.

Its life: ``begin`` snapshots ``srank(W_0)`` and resolves the method once; each measurement point (a step or an
epoch end) measures stable ranks until they settle or the warm-up bound is reached; ``switch`` factorizes the
targets exactly as :func:`~cuttlefish_hf.planning.plan_switch` decides; ``state_dict`` / ``load_state_dict``
carry that progress across a resume. Below: the lifecycle, when it switches, what it refuses, and models that
arrive factorized.
"""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import KeywordDataset, tiny_bert
from transformers import Trainer

from cuttlefish_hf import Cuttlefish, CuttlefishCallback, CuttlefishConfig, CuttlefishTrainer, factorize_, factorized_plan
from cuttlefish_hf import controller as controller_module
from cuttlefish_hf.layers import FactorizedLayer
from cuttlefish_hf.planning import plan_switch, resolve_method

from test_trainer_callback import FAST, build_trainer, training_args

LOGGER = "cuttlefish_hf.controller"


def run(controller: Cuttlefish, steps: int, steps_per_epoch: int | None = None) -> None:
    """Drive the controller as a training loop would (no real optimizer steps: the weights stay put)."""
    controller.begin()
    for step in range(1, steps + 1):
        controller.step_end(step)
        if steps_per_epoch and step % steps_per_epoch == 0:
            controller.epoch_end(step)


SETTLES_AT_STEP_3 = dict(measure_every_steps=1, window=1, min_warmup_measurements=3, eps_relative=1.0,
                         rank_rule="fixed_ratio", rank_ratio=0.25, skip_first_blocks=0)


# -- the lifecycle ----------------------------------------------------------------------------------------
def test_begin_resolves_the_method_once_and_the_switch_applies_plan_switch(monkeypatch):
    resolutions = []
    monkeypatch.setattr(controller_module, "resolve_method",
                        lambda *args, **kwargs: resolutions.append(args) or resolve_method(*args, **kwargs))
    model = tiny_bert()
    weights = {name: module.weight.detach().clone() for name, module in model.named_modules() if name.endswith(
        ("query", "key", "value", "dense")) and name.startswith("bert.encoder")}
    config = CuttlefishConfig(**SETTLES_AT_STEP_3)
    controller = Cuttlefish(model, config, total_steps=10)
    measurements = []
    measure = controller.meter.measure
    monkeypatch.setattr(controller.meter, "measure", lambda weights: measurements.append(1) or measure(weights))
    controller.begin()
    assert controller.rank_rule == "fixed_ratio" and controller.method.init == "svd" and not controller.decided
    for step in (1, 2):
        assert controller.step_end(step) is None
    result = controller.step_end(3)
    assert result is not None and result.step == controller.switch_step == 3 and controller.switched
    assert len(resolutions) == 1  # not again at the measurements, decide() or the switch
    assert len(measurements) == 3  # the report's stable ranks are step 3's measurement, not a fourth
    expected = {d.name: d.rank for d in plan_switch(weights, config, controller.method) if d.factorize}
    assert expected and controller.report.plan == expected == factorized_plan(model)
    assert controller.step_end(4) is None and controller.switch_step == 3  # one switch per model


def test_state_dict_resumes_the_warm_up_where_it_stopped():
    config = CuttlefishConfig(**SETTLES_AT_STEP_3)
    first = Cuttlefish(tiny_bert(), config, total_steps=10)
    first.begin()
    first.step_end(1)
    first.step_end(2)
    state = first.state_dict()
    resumed_model = tiny_bert()
    resumed = Cuttlefish(resumed_model, config, total_steps=10)
    resumed.load_state_dict(state)  # no begin(): the restored state is the begin it had
    assert resumed.measured_steps == [1, 2] and resumed.method == first.method and not resumed.decided
    assert resumed.step_end(3) is not None and resumed.switch_step == 3
    after = resumed.state_dict()
    again = Cuttlefish(resumed_model, config, total_steps=10)
    again.load_state_dict(after)  # after the switch: the model already holds the factors
    assert again.switched and again.switch_step == 3 and again.report.plan == resumed.report.plan
    assert again.summary()["plan"] == resumed.summary()["plan"] and again.step_end(4) is None
    with pytest.raises(ValueError, match="do not match the saved Cuttlefish plan"):
        Cuttlefish(tiny_bert(), config, total_steps=10).load_state_dict(after)  # a dense model, a switched state


# -- when it switches ---------------------------------------------------------------------------------------
def test_default_bounds_on_a_short_run_switch_at_max_warmup_and_warn_at_begin(caplog):
    # 3 epochs measured once per epoch: 1 measurement fits before 50% of the steps, min_warmup_measurements=2.
    controller = Cuttlefish(tiny_bert(), CuttlefishConfig(rank_rule="fixed_ratio"), total_steps=30,
                            steps_per_epoch=10)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        controller.begin()
    assert "only 1 stable-rank measurement(s) fit before max_warmup_fraction=0.5 (step 15 of 30)" in caplog.text
    assert "measure_every_steps=7" in caplog.text
    run(controller, 30, steps_per_epoch=10)
    # Not after the first measurement at step 10 (the old floor-based bound), but at the bound itself.
    assert controller.switch_step == 15 and controller.measured_steps == [10]


def test_first_measurement_after_the_last_step_still_switches_at_the_bound(caplog):
    controller = Cuttlefish(tiny_bert(), CuttlefishConfig(rank_rule="fixed_ratio"), total_steps=20,
                            steps_per_epoch=100)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        run(controller, 20, steps_per_epoch=100)
    assert "only 0 stable-rank measurement(s) fit" in caplog.text
    assert controller.switched and controller.switch_step == 10 and controller.measured_steps == []


def test_ranks_settling_at_the_last_step_leave_the_model_dense(caplog):
    config = CuttlefishConfig(rank_rule="fixed_ratio", measure_every_steps=5, window=1, min_warmup_measurements=2,
                              eps_relative=1.0, max_warmup_fraction=1.0)
    controller = Cuttlefish(tiny_bert(), config, total_steps=10)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        run(controller, 10)
    assert "falls at step 10 of 10" in caplog.text
    assert "settled only at the last step (10)" in caplog.text
    assert controller.measured_steps == [5, 10] and not controller.decided and not factorized_plan(controller.model)


@pytest.mark.parametrize("mode", ["cuttlefish", "pufferfish"])
def test_no_layer_worth_factorizing_is_said_at_begin_and_the_model_stays_dense(caplog, mode):
    config = CuttlefishConfig(mode=mode, rank_rule="fixed_ratio", rank_ratio=0.9, measure_every_steps=2)
    model = tiny_bert()
    before = {name: p.clone() for name, p in model.named_parameters()}
    controller = Cuttlefish(model, config, total_steps=20)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        run(controller, 20)
    assert "at rank_ratio=0.9 no target layer's factors would hold fewer parameters" in caplog.text
    targets = len(controller.targets)  # pufferfish keeps the first block dense: 6 of the 12
    assert f"not to factorize: of {targets} target layers, no rank saves parameters" in caplog.text
    assert controller.decided and not controller.switched and controller.summary()["plan"] == {}
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    measured = len(controller.measured_steps)
    controller.step_end(22)
    assert len(controller.measured_steps) == measured  # decided: nothing is measured any more


def test_pufferfish_switches_at_its_fixed_step_without_a_broadcast_per_step():
    controller = Cuttlefish(tiny_bert(), CuttlefishConfig(mode="pufferfish", fixed_warmup_fraction=0.3),
                            total_steps=20)
    run(controller, 20)
    assert controller.switch_step == 6


def test_compiled_model_is_seen_through():
    model = tiny_bert()
    compiled = torch.compile(model, backend="eager")
    controller = Cuttlefish(compiled, CuttlefishConfig(mode="si_fd"), total_steps=10)
    assert controller.model is model and not any(name.startswith("_orig_mod") for name in controller.targets)
    controller.begin()
    assert factorized_plan(model) == controller.report.plan and controller.report.plan


# -- a model that arrives factorized -----------------------------------------------------------------------------
def factorized_bert():
    model = tiny_bert()
    factorize_(model, {"bert.encoder.layer.0.intermediate.dense": 4, "bert.encoder.layer.1.output.dense": 6})
    return model


def factor_ids(model) -> set[int]:
    return {id(p) for m in model.modules() if isinstance(m, FactorizedLayer) for p in (m.first.weight, m.second.weight)}


@pytest.mark.parametrize("trainer_cls,weight_decay", [(Trainer, 0.0), (CuttlefishTrainer, 0.01)])
def test_a_factorized_model_trains_on_without_a_second_switch(tmp_path, trainer_cls, weight_decay):
    model = factorized_bert()
    plan = factorized_plan(model)
    trainer, callback = build_trainer(tmp_path, CuttlefishConfig(**FAST, frobenius_decay=0.5), trainer_cls, model,
                                      weight_decay=weight_decay, num_train_epochs=2)
    norms = {name: m.merged_weight().norm().item() for name, m in model.named_modules()
             if isinstance(m, FactorizedLayer)}
    trainer.train()
    controller = callback.controller
    assert controller.switched and controller.switch_step == 0 and controller.factorized_before_training
    assert factorized_plan(trainer.model) == plan and controller.measured_steps == []
    groups = trainer.optimizer.optimizer.param_groups
    in_optimizer = {id(p): group["weight_decay"] for group in groups for p in group["params"]}
    assert factor_ids(trainer.model) <= set(in_optimizer)
    assert {in_optimizer[i] for i in factor_ids(trainer.model)} == {0.0}
    # Frobenius decay 0.5 on tiny factors for 16 steps shrinks them; the gradients alone would not.
    for name, module in trainer.model.named_modules():
        if isinstance(module, FactorizedLayer):
            assert module.merged_weight().norm().item() < 0.9 * norms[name]


def test_plain_trainer_refuses_a_factorized_model_under_weight_decay(tmp_path):
    trainer = Trainer(model=factorized_bert(), args=training_args(tmp_path, weight_decay=0.01),
                      train_dataset=KeywordDataset(), callbacks=[CuttlefishCallback(CuttlefishConfig(**FAST))])
    with pytest.raises(ValueError, match=r"holds factorized layers, with weight_decay > 0 .*CuttlefishTrainer"):
        trainer.train()


def test_bound_at_an_epoch_end_measures_that_epoch_first():
    controller = Cuttlefish(tiny_bert(), CuttlefishConfig(rank_rule="fixed_ratio"), total_steps=40, steps_per_epoch=10)
    run(controller, 40, steps_per_epoch=10)
    assert controller.switch_step == 20 and controller.measured_steps == [10, 20]


def test_bound_between_step_measurements_switches_on_time():
    config = CuttlefishConfig(rank_rule="fixed_ratio", measure_every_steps=4, min_warmup_measurements=50)
    controller = Cuttlefish(tiny_bert(), config, total_steps=30, steps_per_epoch=10)
    run(controller, 30, steps_per_epoch=10)
    assert controller.switch_step == 15 and controller.measured_steps == [4, 8, 12]


def test_a_switch_that_factorizes_nothing_leaves_the_optimizer_alone():
    model = tiny_bert()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    groups = [list(group["params"]) for group in optimizer.param_groups]
    controller = Cuttlefish(model, CuttlefishConfig(mode="si_fd", rank_ratio=0.9, rewarmup_steps=5), total_steps=10)
    result = controller.begin(optimizer)
    assert result.report.layers == [] and result.new_parameters == [] and not controller.switched
    assert [list(group["params"]) for group in optimizer.param_groups] == groups
    assert not optimizer._optimizer_step_pre_hooks  # no re-warm-up ramp on a model that did not change


# -- did it pay? -----------------------------------------------------------------------------------------------------
def timed_run(seconds_dense: float, seconds_low_rank: float, caplog, monkeypatch, **config) -> Cuttlefish:
    """A Pufferfish run whose steps take the given seconds (on a fake clock) before and after its switch."""
    from cuttlefish_hf.controller import SPEED_REPORT_STEPS

    controller = Cuttlefish(tiny_bert(), CuttlefishConfig(mode="pufferfish", fixed_warmup_fraction=0.2, **config),
                            total_steps=100)
    clock = {"now": 0.0}
    monkeypatch.setattr("cuttlefish_hf.controller.time.perf_counter", lambda: clock["now"])
    with caplog.at_level(logging.INFO, logger=LOGGER):
        controller.begin()
        for step in range(1, 20 + SPEED_REPORT_STEPS + 2):
            clock["now"] += seconds_low_rank if controller.switched else seconds_dense
            controller.step_end(step)
    return controller


def test_the_run_says_once_that_the_switch_paid(caplog, monkeypatch):
    controller = timed_run(0.4, 0.2, caplog, monkeypatch)
    assert controller.step_times()["step_speedup"] == pytest.approx(2.0)
    messages = [r.getMessage() for r in caplog.records if "low-rank steps take" in r.getMessage()]
    assert messages == [f"Cuttlefish: low-rank steps take 200.0 ms against 400.0 ms dense (medians): 2.00x faster "
                        f"(FLOP ideal of the factorized layers: {controller.step_times()['targeted_flop_ideal_speedup']:.2f}x)."]


def test_a_slower_low_rank_phase_is_a_warning_naming_likely_causes(caplog, monkeypatch):
    timed_run(0.2, 0.25, caplog, monkeypatch)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "SLOWER" in r.getMessage()]
    assert len(warnings) == 1 and "0.80x, SLOWER than dense" in warnings[0]
    assert "skip_first_blocks='auto'" in warnings[0] and "unaligned ranks" not in warnings[0]  # every rank 8


def test_a_slower_run_with_unaligned_ranks_names_rank_multiple(caplog, monkeypatch):
    controller = timed_run(0.2, 0.25, caplog, monkeypatch, rank_ratio=0.3)
    ranks = {layer.rank for layer in controller.report.layers}
    assert ranks and all(rank % 8 for rank in ranks)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "SLOWER" in r.getMessage()]
    assert f"unaligned ranks ({len(controller.report.layers)} of {len(controller.report.layers)} not a multiple " \
           "of 8: rank_multiple=8" in warnings[0]
