"""Resume from any checkpoint gives the weights of an uninterrupted run, bit for bit (CPU)."""

from __future__ import annotations

import pytest
import torch
from test_trainer_callback import FAST, train
from transformers import Trainer

from cuttlefish_hf import CuttlefishConfig, CuttlefishTrainer, factorized_plan


def max_abs_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[key].float() - b[key].float()).abs().max()) for key in a)


def run(tmp_path, trainer_cls, config, resume_from=None, **overrides):
    settings = dict(output_dir=str(tmp_path / "run"), save_strategy="steps", save_steps=4)
    settings.update(overrides)
    return train(tmp_path, config, trainer_cls, resume_from, **settings)


CASES = {
    "trainer-wd0": (CuttlefishTrainer, {}, {}),
    "trainer-wd": (CuttlefishTrainer, {}, {"weight_decay": 0.01}),
    "trainer-accumulation": (CuttlefishTrainer, {}, {"weight_decay": 0.01, "gradient_accumulation_steps": 2,
                                                     "per_device_train_batch_size": 8}),
    "callback-wd0": (Trainer, {}, {}),
    "callback-accumulation": (Trainer, {}, {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 8}),
    "trainer-whitened": (CuttlefishTrainer, {"rank_rule": "kind_fractions", "init": "whitened"},
                         {"weight_decay": 0.01}),
    "callback-factor-lr-scale": (Trainer, {"factor_lr_scale": 2.0}, {}),  # the step-scale hook comes back too
}


@pytest.mark.parametrize("case", list(CASES))
def test_resume_after_the_switch_is_exact(tmp_path, case):
    trainer_cls, config_overrides, overrides = CASES[case]
    config = CuttlefishConfig(**{**FAST, **config_overrides})
    full, callback = run(tmp_path, trainer_cls, config, **overrides)
    switch = callback.controller.switch_step
    assert 4 < switch < 12
    reference = full.model.state_dict()
    for checkpoint in ("checkpoint-4", "checkpoint-12"):
        resumed, resumed_callback = run(tmp_path, trainer_cls, config,
                                        resume_from=str(tmp_path / "run" / checkpoint), **overrides)
        assert resumed_callback.controller.switch_step == switch
        assert factorized_plan(resumed.model) == factorized_plan(full.model)
        assert max_abs_difference(resumed.model.state_dict(), reference) == 0.0, checkpoint


WHITENED = CuttlefishConfig(**{**FAST, "rank_rule": "kind_fractions", "init": "whitened"})


def test_whitened_init_resume_in_the_middle_of_the_switch_period_is_exact(tmp_path):
    # Checkpoints every 5 steps, measurements every 2: checkpoint-5 falls inside the period (4, 6] whose input
    # statistics the switch at step 6 uses; they travel with the checkpoint.
    full, callback = run(tmp_path, CuttlefishTrainer, WHITENED, save_steps=5)
    assert callback.controller.switch_step == 6
    assert (tmp_path / "run" / "checkpoint-5" / "cuttlefish_statistics-rank0.pt").is_file()
    resumed, _ = run(tmp_path, CuttlefishTrainer, WHITENED, save_steps=5,
                     resume_from=str(tmp_path / "run" / "checkpoint-5"))
    assert max_abs_difference(resumed.model.state_dict(), full.model.state_dict()) == 0.0


def test_whitened_init_resume_without_the_statistics_says_it_records_them_again(tmp_path, caplog):
    full, _ = run(tmp_path, Trainer, WHITENED, save_steps=5)
    (tmp_path / "run" / "checkpoint-5" / "cuttlefish_statistics-rank0.pt").unlink()
    with caplog.at_level("WARNING", logger="cuttlefish_hf.integrations.trainer"):
        resumed, _ = run(tmp_path, Trainer, WHITENED, save_steps=5,
                         resume_from=str(tmp_path / "run" / "checkpoint-5"))
    assert "resumed at step 5, in the middle of a measurement period (from step 4)" in caplog.text
    # The statistics matter: recorded again from step 5 only, the factors differ from the uninterrupted run's.
    assert max_abs_difference(resumed.model.state_dict(), full.model.state_dict()) > 0
