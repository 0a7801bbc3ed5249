"""The pretrained-model default: ``rank_rule="auto"`` / ``init="auto"`` pick the kind-fractions rule and the
whitened init for pretrained weights (one verdict), record the layers' inputs during the warm-up, and
factorize them in the whitened metric at the switch."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from helpers import KeywordDataset, pretrained_like, tiny_bert
from transformers import Trainer, TrainingArguments

from cuttlefish_hf import Cuttlefish, CuttlefishCallback, CuttlefishConfig
from cuttlefish_hf.config import PRETRAINED_FACTOR_LR_SCALE
from cuttlefish_hf.targeting import layer_kind
from cuttlefish_hf.whitening import output_error
from cuttlefish_hf.layers import FactorizedLinear, svd_factors

FAST = dict(measure_every_steps=2, window=2, min_warmup_measurements=3, eps_relative=0.05)


def batch(seed: int = 0, size: int = 16, length: int = 12) -> torch.Tensor:
    return torch.randint(8, 64, (size, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("config, pretrained, rule, init, reason", [
    (CuttlefishConfig(), False, "scaled_stable_rank", "svd", "randomly initialized"),
    (CuttlefishConfig(), True, "kind_fractions", "whitened", "look pretrained"),
    (CuttlefishConfig(rank_rule="energy"), True, "energy", "whitened",
     "init='auto' and warmup='auto' and factor_lr_scale='auto' and the weights look pretrained"),
    (CuttlefishConfig(rank_rule="energy", init="svd"), True, "energy", "svd",
     "warmup='auto' and factor_lr_scale='auto' and the weights look"),
    (CuttlefishConfig(rank_rule="energy", init="svd", warmup="fixed"), True, "energy", "svd",
     "factor_lr_scale='auto' and the weights look pretrained"),
    (CuttlefishConfig(rank_rule="energy", init="svd", warmup="fixed", factor_lr_scale=1), True, "energy", "svd",
     "set in the config"),
    (CuttlefishConfig(rank_rule="kind_fractions", init="whitened"), False, "kind_fractions", "whitened",
     "warmup='auto' and factor_lr_scale='auto' and the weights look randomly initialized"),
    (CuttlefishConfig(rank_rule="activation_aware"), False, "kind_fractions", "whitened", "warmup='auto'"),
    (CuttlefishConfig(init="svd"), True, "kind_fractions", "svd",
     "rank_rule='auto' and warmup='auto' and factor_lr_scale='auto' and the weights look pretrained"),
    (CuttlefishConfig(mode="pufferfish"), True, "fixed_ratio", "svd", "pufferfish mode"),
])
def test_rank_rule_and_init_are_resolved_at_begin_and_explained(config, pretrained, rule, init, reason):
    model = pretrained_like(tiny_bert()) if pretrained else tiny_bert()
    controller = Cuttlefish(model, config, total_steps=100)
    assert controller.rank_rule is None
    controller.begin()
    assert controller.rank_rule == rule and controller.method.init == init
    assert reason in controller.rank_rule_reason
    assert (controller.activations is not None) == (init == "whitened")
    summary = controller.summary()
    assert summary["rank_rule"] == rule and summary["init"] == init
    assert summary["rank_rule_reason"] == controller.rank_rule_reason
    auto_scale = PRETRAINED_FACTOR_LR_SCALE if pretrained and config.mode == "cuttlefish" else 1.0
    assert controller.method.factor_lr_scale == (auto_scale if config.factor_lr_scale == "auto"
                                                 else config.factor_lr_scale)


def test_statistics_restart_after_each_measurement_and_stop_at_the_token_cap():
    model = pretrained_like(tiny_bert()).train()
    config = CuttlefishConfig(measure_every_steps=1, min_warmup_measurements=50, activation_tokens=100,
                              warmup="stable_ranks")
    controller = Cuttlefish(model, config, total_steps=1000)
    controller.begin()
    name = controller.targets[0]
    model(input_ids=batch(0))
    assert controller.activations.count(name) == 16 * 12
    model(input_ids=batch(1))  # 192 tokens >= the cap of 100: not recorded
    assert controller.activations.count(name) == 16 * 12
    assert controller.step_end(1) is None  # a measurement, no switch: the statistics start over
    assert controller.activations.names == []
    model(input_ids=batch(2))
    assert controller.activations.count(name) == 16 * 12


def test_switch_factorizes_in_the_metric_of_the_last_period_inputs():
    model = pretrained_like(tiny_bert()).train()
    controller = Cuttlefish(model, CuttlefishConfig(rank_rule="auto"), total_steps=100)
    controller.begin()
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in controller.targets}
    probes = [model.get_submodule(name).register_forward_pre_hook(
        lambda module, args, name=name: inputs[name].append(args[0].detach().reshape(-1, args[0].shape[-1])))
        for name in controller.targets]
    with torch.no_grad():
        torch.manual_seed(0)
        model(input_ids=batch(3))
    for probe in probes:
        probe.remove()
    dense = {name: model.get_submodule(name).weight.detach().clone() for name in controller.targets}
    result = controller.switch(step=5)

    fractions = CuttlefishConfig().kind_fractions
    for decision in result.decisions:  # ranks keep the kind's fraction of each layer's parameters
        m, n = decision.shape
        assert decision.rule == "kind_fractions"
        assert decision.rank == min(m, n, math.floor(fractions[layer_kind(decision.name)] * m * n / (m + n)))
    compared = 0
    for name in controller.report.plan:  # smaller output error on the recorded inputs than plain SVD
        x = torch.cat(inputs[name]).double()
        covariance = x.T @ x / x.shape[0]
        layer = model.get_submodule(name)
        assert isinstance(layer, FactorizedLinear)
        first, second = svd_factors(dense[name], layer.rank)
        assert output_error(dense[name], layer.merged_weight(), covariance) < \
            output_error(dense[name], second @ first, covariance)
        compared += 1
    assert compared == len(controller.targets)
    # statistics are released and their hooks gone
    assert controller.activations is None
    assert not any(module._forward_pre_hooks for module in model.modules())


def test_without_recorded_inputs_the_switch_falls_back_to_plain_svd(caplog):
    model = pretrained_like(tiny_bert())
    controller = Cuttlefish(model, CuttlefishConfig(), total_steps=100)
    controller.begin()
    dense = {name: model.get_submodule(name).weight.detach().clone() for name in controller.targets}
    controller.switch(step=1)
    assert "recorded no layer inputs" in caplog.text
    name = next(iter(controller.report.plan))
    first, second = svd_factors(dense[name], controller.report.plan[name])
    torch.testing.assert_close(model.get_submodule(name).merged_weight(), second @ first, atol=1e-5, rtol=1e-4)


def test_resumed_warm_up_keeps_the_rule_and_records_again():
    model = pretrained_like(tiny_bert())
    controller = Cuttlefish(model, CuttlefishConfig(), total_steps=100)
    controller.begin()
    state = controller.state_dict()
    assert state["method"][:2] == ["kind_fractions", "whitened"]
    controller.activations.stop()
    resumed = Cuttlefish(model, CuttlefishConfig(), total_steps=100)
    resumed.load_state_dict(state)
    assert resumed.method == controller.method
    assert resumed.activations is not None and resumed.activations.collecting


def test_a_warm_up_checkpoint_of_0_1_resumes_with_the_rule_and_init_it_meant():
    model = pretrained_like(tiny_bert())
    controller = Cuttlefish(model, CuttlefishConfig(), total_steps=100)
    controller.begin()
    controller.activations.stop()
    state = controller.state_dict()
    for key in ("method", "steps_to_record", "recording_paused"):  # what 0.1 did not save
        del state[key]
    state.update(rank_rule="activation_aware", rank_rule_reason="rank_rule='auto' and the weights look pretrained")
    resumed = Cuttlefish(model, CuttlefishConfig(), total_steps=100)
    resumed.load_state_dict(state)
    assert (resumed.rank_rule, resumed.method.init) == ("kind_fractions", "whitened")
    assert resumed.activations is not None and resumed.activations.collecting


def test_trainer_fine_tune_of_pretrained_weights_uses_the_pretrained_rule_and_whitened_init(tmp_path):
    callback = CuttlefishCallback(CuttlefishConfig(**FAST))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=16, num_train_epochs=4,
                             learning_rate=2e-3, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True, seed=0, data_seed=0)
    trainer = Trainer(model=pretrained_like(tiny_bert()), args=args, train_dataset=KeywordDataset(),
                      callbacks=[callback])
    trainer.train()
    controller = callback.controller
    assert controller.switched and 0 < controller.switch_step < trainer.state.max_steps
    summary = controller.summary()
    assert summary["rank_rule"] == "kind_fractions" and "pretrained" in summary["rank_rule_reason"]
    assert summary["init"] == "whitened"
    assert all(d.rule == "kind_fractions" for d in controller.decisions)
    assert controller.activations is None and summary["statistics_seconds"] > 0
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e and e["step"] > controller.switch_step]
    assert len(losses) > 5 and all(math.isfinite(loss) for loss in losses)


# -- when pretrained weights switch: warmup="fixed" --------------------------------------------------------
def forward_and_step(model, controller, step: int):
    model(input_ids=batch(step))  # 16 x 12 = 192 tokens per layer
    return controller.step_end(step)


def test_pretrained_weights_switch_at_the_fixed_fraction_with_the_last_inputs_before_it():
    model = pretrained_like(tiny_bert()).train()
    controller = Cuttlefish(model, CuttlefishConfig(activation_tokens=400, measure_every_steps=1,
                                                    fixed_warmup_fraction=0.1), total_steps=100)
    controller.begin()
    assert controller.method.warmup == "fixed" and "warmup='auto'" in controller.rank_rule_reason
    name = controller.targets[0]
    recorded = {}
    for step in range(1, 10):
        assert forward_and_step(model, controller, step) is None
        recorded[step] = controller.activations.count(name) if name in controller.activations.names else 0
    # step 1's 192 tokens: 400 take 3 steps, 4 with one spare; recording pauses until 4 steps before the switch
    assert recorded == {1: 0, 2: 0, 3: 0, 4: 0, 5: 0, 6: 0, 7: 192, 8: 384, 9: 576}
    result = forward_and_step(model, controller, 10)
    assert result is not None and controller.switch_step == 10 and controller.switched
    assert controller.measured_steps == []  # no stable-rank measurements (they would restart the inputs)
    assert controller.summary()["warmup"] == "fixed"
    # kind_fractions reads no spectrum: nothing is measured for the report either (its stable ranks: train begin)
    assert controller.summary()["measure_seconds"] == 0.0
    assert {d.name: d.stable_rank for d in controller.decisions} == controller.init_stable_ranks


@pytest.mark.parametrize("pretrained, config, switch_step", [
    (False, CuttlefishConfig(init="whitened"), None),                       # from scratch: wait for the ranks
    (True, CuttlefishConfig(warmup="stable_ranks"), None),                   # as configured
    (True, CuttlefishConfig(init="svd"), 3),                                 # nothing to record
    (False, CuttlefishConfig(warmup="fixed", init="svd", rank_rule="fixed_ratio"), 3),
    (True, CuttlefishConfig(mode="pufferfish", fixed_warmup_fraction=0.5), None),  # its own fixed warm-up
])
def test_the_warmup_follows_the_verdict_and_the_config(pretrained, config, switch_step):
    model = pretrained_like(tiny_bert()) if pretrained else tiny_bert()
    model.train()
    config = dataclasses.replace(config, measure_every_steps=100, max_warmup_fraction=0.9, fixed_warmup_fraction=(
        config.fixed_warmup_fraction if config.mode == "pufferfish" else 0.03))  # validated, the shared one kept
    controller = Cuttlefish(model, config, total_steps=100)
    controller.begin()
    for step in range(1, 5):
        forward_and_step(model, controller, step)
    assert controller.switch_step == switch_step


def test_fixed_warmup_warns_like_pufferfish_when_its_step_leaves_nothing_to_train(caplog):
    model = pretrained_like(tiny_bert()).train()
    with caplog.at_level("WARNING", logger="cuttlefish_hf.controller"):
        controller = Cuttlefish(model, CuttlefishConfig(fixed_warmup_fraction=1.0, min_warmup_measurements=50),
                                total_steps=10)
        controller.begin()
    assert "fixed_warmup_fraction bound falls at step 10 of 10" in caplog.text and "stays dense" in caplog.text
    assert "min_warmup_measurements" not in caplog.text  # no stable-rank measurements to fit


def test_a_checkpoint_from_before_warmup_resumes_waiting_for_the_stable_ranks():
    model = pretrained_like(tiny_bert())
    controller = Cuttlefish(model, CuttlefishConfig(), total_steps=100)
    controller.begin()
    state = controller.state_dict()
    assert state["method"][4] == "fixed"
    state["method"] = state["method"][:4]  # saved before the field existed
    resumed = Cuttlefish(model, CuttlefishConfig(), total_steps=100)
    resumed.load_state_dict(state)
    assert resumed.method.warmup == "stable_ranks"


def test_a_checkpoint_from_before_factor_lr_scale_resumes_with_unscaled_factor_steps():
    model = pretrained_like(tiny_bert())
    controller = Cuttlefish(model, CuttlefishConfig(), total_steps=100)
    controller.begin()
    state = controller.state_dict()
    assert state["method"][5] == PRETRAINED_FACTOR_LR_SCALE == 4.0  # 'auto' on pretrained weights
    state["method"] = state["method"][:5]  # saved before the field existed: trained with 1
    resumed = Cuttlefish(model, CuttlefishConfig(), total_steps=100)
    resumed.load_state_dict(state)
    assert resumed.method.factor_lr_scale == 1.0 and resumed.method.warmup == "fixed"


def test_a_resumed_fixed_warm_up_records_the_same_steps():
    def run(controller, model, steps):
        for step in steps:
            forward_and_step(model, controller, step)
        stats = controller.activations
        return [stats.count(name) for name in stats.names]

    config = CuttlefishConfig(activation_tokens=400, fixed_warmup_fraction=0.1)
    model = pretrained_like(tiny_bert()).train()
    controller = Cuttlefish(model, config, total_steps=100)
    controller.begin()
    run(controller, model, range(1, 6))
    copy = pretrained_like(tiny_bert()).train()  # the checkpoint's weights, in a new process
    resumed = Cuttlefish(copy, config, total_steps=100)
    resumed.load_state_dict(controller.state_dict())
    resumed.load_statistics_state(controller.statistics_state())
    counts = run(resumed, copy, [6, 7, 8])
    assert counts == run(controller, model, [6, 7, 8]) and set(counts) == {384}  # steps 7 and 8 only
