"""CuttlefishCallback / CuttlefishTrainer inside a real ``Trainer.train()`` on a tiny BERT."""

from __future__ import annotations

import pytest
import torch
from helpers import KeywordDataset, tiny_bert
from transformers import Trainer, TrainingArguments

from cuttlefish_hf import Cuttlefish, CuttlefishCallback, CuttlefishConfig, CuttlefishTrainer, factorized_plan
from cuttlefish_hf.layers import FactorizedLayer
from cuttlefish_hf.surgery import count_parameters

FAST = dict(measure_every_steps=2, window=2, min_warmup_measurements=3, eps_relative=0.05, rank_rule="stable_rank")


def training_args(tmp_path, **overrides) -> TrainingArguments:
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=16, num_train_epochs=4,
                    learning_rate=2e-3, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                    disable_tqdm=True, seed=0, data_seed=0)
    settings.update(overrides)
    return TrainingArguments(**settings)


def build_trainer(tmp_path, config: CuttlefishConfig, trainer_cls=Trainer, model=None, **overrides):
    """A ``trainer_cls`` running ``config`` on ``model`` (a tiny BERT by default), and its callback."""
    model = tiny_bert() if model is None else model
    args = training_args(tmp_path, **overrides)
    if trainer_cls is CuttlefishTrainer:
        trainer = CuttlefishTrainer(model=model, args=args, train_dataset=KeywordDataset(), cuttlefish_config=config)
        return trainer, trainer.cuttlefish
    callback = CuttlefishCallback(config)
    return Trainer(model=model, args=args, train_dataset=KeywordDataset(), callbacks=[callback]), callback


def train(tmp_path, config: CuttlefishConfig, trainer_cls=Trainer, resume_from=None, **overrides):
    """Train a tiny BERT with ``config`` through ``trainer_cls``; returns the trainer and its callback."""
    trainer, callback = build_trainer(tmp_path, config, trainer_cls, **overrides)
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer, callback


def step_losses(trainer) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


def test_switch_happens_during_train_and_training_goes_on(tmp_path):
    trainer, callback = train(tmp_path, CuttlefishConfig(**FAST))
    controller = callback.controller
    assert controller.switched and 0 < controller.switch_step < trainer.state.max_steps
    plan = factorized_plan(trainer.model)
    assert plan and plan == controller.report.plan
    assert count_parameters(trainer.model) == controller.report.model_params_after
    expected_drop = sum(layer.params_before - layer.params_after for layer in controller.report.layers)
    assert controller.report.model_params_before - controller.report.model_params_after == expected_drop > 0
    losses = step_losses(trainer)
    before = [loss for step, loss in losses.items() if step <= controller.switch_step]
    after = [loss for step, loss in losses.items() if step > controller.switch_step]
    assert len(after) > 5
    assert sum(after) / len(after) < sum(before) / len(before)
    summary = controller.summary()
    assert summary["switch_step"] == controller.switch_step and summary["measure_seconds"] > 0


def test_optimizer_state_and_learning_rate_survive_the_switch(tmp_path, monkeypatch):
    seen = {}
    original = Cuttlefish.switch

    def spy(self, step, optimizer=None, scheduler=None, **kwargs):
        inner = optimizer.optimizer
        seen["before"] = {p: {k: v.clone() for k, v in inner.state[p].items()} for p in inner.state}
        result = original(self, step, optimizer, scheduler, **kwargs)
        seen["after"] = {p: {k: v.clone() for k, v in inner.state[p].items()} for p in inner.state}
        seen["removed"] = result.removed_parameters
        seen["lrs"] = [group["lr"] for group in inner.param_groups]
        seen["schedule"] = scheduler.get_last_lr()
        seen["step"] = step
        return result

    monkeypatch.setattr(Cuttlefish, "switch", spy)
    trainer, _ = train(tmp_path, CuttlefishConfig(**FAST), weight_decay=0.01)
    untouched = [p for p in seen["before"] if all(p is not r for r in seen["removed"])]
    assert untouched and all(p not in seen["after"] for p in seen["removed"])
    for p in untouched:
        for key, value in seen["before"][p].items():
            assert torch.equal(seen["after"][p][key], value)
    # The linear schedule continues: lr = base * (1 - step / max_steps) in every group, the new one included.
    expected = 2e-3 * (1 - seen["step"] / trainer.state.max_steps)
    assert seen["lrs"] == pytest.approx([expected] * len(seen["lrs"]))
    assert seen["schedule"] == pytest.approx([expected] * len(seen["lrs"]))
    inner = trainer.optimizer.optimizer
    factor_ids = {id(m.first.weight) for m in trainer.model.modules() if isinstance(m, FactorizedLayer)}
    for group in inner.param_groups:  # factors are never under L2 weight decay while Frobenius decay is on
        if any(id(p) in factor_ids for p in group["params"]):
            assert group["weight_decay"] == 0.0


def test_learning_rate_rewarmup_ramps_after_the_switch(tmp_path):
    trainer, callback = train(tmp_path, CuttlefishConfig(**FAST, rewarmup_steps=4))
    switch = callback.controller.switch_step
    lrs = {entry["step"]: entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry}
    # Trainer logs the scheduler's value; the re-warm-up scales only the step itself, leaving the schedule intact.
    assert lrs[switch + 1] == pytest.approx(2e-3 * (1 - (switch) / trainer.state.max_steps), rel=1e-4)


def test_bf16_autocast_on_cpu_switches_and_trains(tmp_path):
    trainer, callback = train(tmp_path, CuttlefishConfig(**FAST), bf16=True)
    assert callback.controller.switched
    losses = list(step_losses(trainer).values())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(m.first.weight.dtype == torch.float32 for m in trainer.model.modules() if isinstance(m, FactorizedLayer))


@pytest.mark.parametrize("mode", ["pufferfish", "si_fd"])
def test_baseline_modes(tmp_path, mode):
    config = CuttlefishConfig(mode=mode, rank_ratio=0.25, fixed_warmup_fraction=0.25)
    trainer, callback = train(tmp_path, config)
    controller = callback.controller
    if mode == "si_fd":
        assert controller.switch_step == 0
    else:
        assert controller.switch_step == int(0.25 * trainer.state.max_steps)
        assert not any(name.startswith("bert.encoder.layer.0.") for name in controller.report.plan)
    assert controller.report.plan and set(controller.report.plan.values()) == {8}  # ceil(32 / 4): all are 32-wide


def test_frobenius_decay_is_applied_after_the_switch(tmp_path):
    with_decay, _ = train(tmp_path / "a", CuttlefishConfig(mode="si_fd", frobenius_decay=0.5))
    without, _ = train(tmp_path / "b", CuttlefishConfig(mode="si_fd", frobenius_decay=0.0))
    def factor_norm(model):
        return sum(m.merged_weight().norm() for m in model.modules() if isinstance(m, FactorizedLayer))
    assert factor_norm(with_decay.model) < 0.95 * factor_norm(without.model)


def test_bad_setups_fail_before_training(tmp_path):
    with pytest.raises(ValueError, match="target_modules"):
        train(tmp_path, CuttlefishConfig(target_modules=["no_such_layer"]))


def run_with_checkpoints(tmp_path, name, resume_from=None, trainer_cls=Trainer, **overrides):
    return train(tmp_path, CuttlefishConfig(**FAST), trainer_cls, resume_from, output_dir=str(tmp_path / name),
                 save_strategy="steps", save_steps=4, **overrides)


@pytest.mark.parametrize("trainer_cls,overrides", [(Trainer, {}), (CuttlefishTrainer, {"weight_decay": 0.01})])
def test_kill_and_resume_before_and_after_the_switch(tmp_path, trainer_cls, overrides):
    full, full_callback = run_with_checkpoints(tmp_path, "full", trainer_cls=trainer_cls, **overrides)
    switch = full_callback.controller.switch_step
    assert 4 < switch < 12  # checkpoint-4 is before the switch, checkpoint-12 after it
    reference = full.model.state_dict()
    for checkpoint in ("checkpoint-4", "checkpoint-12"):
        resumed, callback = run_with_checkpoints(tmp_path, "full", resume_from=str(tmp_path / "full" / checkpoint),
                                                 trainer_cls=trainer_cls, **overrides)
        assert callback.controller.switch_step == switch
        assert factorized_plan(resumed.model) == factorized_plan(full.model)
        state = resumed.model.state_dict()
        assert state.keys() == reference.keys()
        for key, value in reference.items():
            torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-5, msg=f"{checkpoint}: {key}")


def test_plain_trainer_refuses_a_resume_it_cannot_honour(tmp_path):
    run_with_checkpoints(tmp_path, "run", weight_decay=0.01)
    with pytest.raises(ValueError, match="CuttlefishTrainer"):
        run_with_checkpoints(tmp_path, "run", resume_from=str(tmp_path / "run" / "checkpoint-12"), weight_decay=0.01)


def test_saved_model_after_training_reloads_factorized_with_identical_logits(tmp_path):
    from transformers import AutoModelForSequenceClassification

    trainer, callback = train(tmp_path, CuttlefishConfig(**FAST))
    trainer.save_model(str(tmp_path / "final"))
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "final")).eval()
    assert factorized_plan(reloaded) == callback.controller.report.plan
    batch = KeywordDataset(size=4)[:4]
    model = trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=batch["input_ids"]).logits,
                                   model(input_ids=batch["input_ids"]).logits, rtol=0, atol=0)


def test_cuttlefish_trainer_logs_per_layer_curves_to_integrations_not_the_console(tmp_path):
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def __init__(self):
            self.keys = set()

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.keys.update(logs)

    recorder = Recorder()
    trainer = CuttlefishTrainer(model=tiny_bert(), args=training_args(tmp_path), train_dataset=KeywordDataset(),
                                cuttlefish_config=CuttlefishConfig(**FAST), callbacks=[recorder])
    trainer.train()
    layer = "cuttlefish/stable_rank/bert.encoder.layer.0.attention.self.query"
    assert layer in recorder.keys and "cuttlefish/unstable_layers" in recorder.keys
    history_keys = {key for entry in trainer.state.log_history for key in entry}
    assert "cuttlefish/stable_rank_fraction" in history_keys and layer not in history_keys


@pytest.mark.parametrize("flag,value", [("fsdp", "full_shard"), ("deepspeed", "ds_config.json")])
def test_fsdp_and_deepspeed_are_refused_at_train_begin(tmp_path, flag, value):
    args = training_args(tmp_path)
    object.__setattr__(args, flag, value)  # set after construction: the real backends are not installed here
    with pytest.raises(ValueError, match=f"does not support {'FSDP' if flag == 'fsdp' else 'DeepSpeed'}"):
        CuttlefishCallback(CuttlefishConfig()).on_train_begin(args, None, None, model=tiny_bert())


def test_plain_callback_refuses_multi_process_training(tmp_path, monkeypatch):
    args = training_args(tmp_path)
    monkeypatch.setattr(type(args), "world_size", property(lambda self: 2))
    with pytest.raises(ValueError, match="use CuttlefishTrainer"):
        CuttlefishCallback(CuttlefishConfig()).on_train_begin(args, None, None, model=tiny_bert())


def test_step_times_before_and_after_the_switch():
    import time

    controller = Cuttlefish(tiny_bert(), CuttlefishConfig(mode="pufferfish", fixed_warmup_fraction=0.5),
                            total_steps=10)
    controller.begin()
    for step in range(1, 11):
        time.sleep(0.04 if step <= 5 else 0.02)  # "training": slower before the switch at step 5
        controller.step_end(step)
    times = controller.step_times()
    assert controller.switch_step == 5
    assert len(controller.timings.step_intervals["dense"]) == 4 and len(controller.timings.step_intervals["low_rank"]) == 5
    assert times["dense_step_seconds"] == pytest.approx(0.04, abs=0.015)
    assert 1.4 < times["step_speedup"] < 2.6
    report = controller.report
    assert times["targeted_flop_ideal_speedup"] == report.target_params_before / report.target_params_after
    assert controller.summary()["step_speedup"] == times["step_speedup"]


def test_plain_callback_logs_the_measurements_cuttlefish_trainer_logs(tmp_path, capsys):
    from transformers import TrainerCallback

    class Integration(TrainerCallback):
        """Records what a ``report_to`` integration receives; Trainer places those before the user's callbacks."""

        def __init__(self):
            self.logs = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append({**logs, "step": state.global_step})

    def measurements(entries) -> list[dict]:
        return [{key: value for key, value in entry.items() if key.startswith("cuttlefish/") or key == "step"}
                for entry in entries if any(key.startswith("cuttlefish/") for key in entry)]

    runs = {}
    for name in ("callback", "trainer"):
        integration, config = Integration(), CuttlefishConfig(**FAST)
        args = training_args(tmp_path / name, num_train_epochs=2)
        if name == "callback":
            trainer = Trainer(model=tiny_bert(), args=args, train_dataset=KeywordDataset(),
                              callbacks=[integration, CuttlefishCallback(config)])
        else:
            trainer = CuttlefishTrainer(model=tiny_bert(), args=args, train_dataset=KeywordDataset(),
                                        cuttlefish_config=config, callbacks=[integration])
        capsys.readouterr()
        trainer.train()
        runs[name] = {"history": measurements(trainer.state.log_history), "integration": measurements(integration.logs),
                      "console": capsys.readouterr().out, "losses": step_losses(trainer)}

    callback, cuttlefish_trainer = runs["callback"], runs["trainer"]
    summary = {"cuttlefish/stable_rank_fraction", "cuttlefish/unstable_layers", "step"}
    assert callback["history"] and all(set(entry) == summary for entry in callback["history"])
    layer = "cuttlefish/stable_rank/bert.encoder.layer.0.attention.self.query"
    per_layer_steps = [entry["step"] for entry in callback["integration"] if layer in entry]
    assert per_layer_steps == [entry["step"] for entry in callback["history"]]  # a curve point per measurement
    for key in ("history", "integration"):  # the same entries at the same steps, with the same values
        assert len(callback[key]) == len(cuttlefish_trainer[key])
        for ours, theirs in zip(callback[key], cuttlefish_trainer[key]):
            assert ours == pytest.approx(theirs)
    assert callback["losses"] == pytest.approx(cuttlefish_trainer["losses"])  # one loss per logging step, still
    assert list(callback["losses"]) == list(range(1, 17))
    for run in runs.values():  # the console printer shows the summary, not one line per layer
        assert "cuttlefish/stable_rank_fraction" in run["console"] and "cuttlefish/stable_rank/" not in run["console"]
