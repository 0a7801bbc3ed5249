"""Self-distillation after the switch and the Fisher-weighted init: what the controller and Trainer do with them."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from helpers import KeywordDataset, tiny_bert, tiny_gpt2

from cuttlefish_hf import Cuttlefish, CuttlefishConfig, CuttlefishTrainer
from cuttlefish_hf.distillation import SelfDistillation, distillation_loss
from cuttlefish_hf.optim import squared_gradient_averages
from test_trainer_callback import build_trainer

SWITCH_AT_2 = dict(mode="pufferfish", rank_ratio=0.25, fixed_warmup_fraction=0.5)


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    data = KeywordDataset(size=8, seed=seed)
    return {key: torch.stack([data[i][key] for i in range(8)]) for key in ("input_ids", "attention_mask", "labels")}


def test_distillation_loss_is_the_tempered_kl_and_mse_for_one_output():
    student, teacher = torch.randn(4, 3, 5), torch.randn(4, 3, 5)
    expected = F.kl_div(F.log_softmax(student / 2, -1), F.softmax(teacher / 2, -1), reduction="sum") / 12 * 4
    assert float(distillation_loss(student, teacher, 2.0)) == pytest.approx(float(expected), rel=1e-5)
    assert float(distillation_loss(teacher, teacher)) == pytest.approx(0.0, abs=1e-6)
    single = torch.randn(6, 1)
    assert float(distillation_loss(single, single + 1)) == pytest.approx(1.0)


def test_the_hook_mixes_task_and_teacher_losses_in_training_only():
    model = tiny_bert(seed=0).eval()
    teacher_logits = model(**batch()).logits.detach()
    distillation = SelfDistillation(model, weight=0.25)
    with torch.no_grad():  # the student moves away from the teacher (as the cut does)
        model.classifier.bias.add_(torch.tensor([1.0, -1.0]))
    model.train()
    torch.manual_seed(0)
    plain = model(**batch())
    distillation.attach(model)
    torch.manual_seed(0)  # same dropout
    mixed = model(**batch())
    kd = distillation_loss(plain.logits, teacher_logits).detach()
    assert float(kd) > 0.1
    assert float(mixed.loss.detach()) == pytest.approx(float(0.75 * plain.loss.detach() + 0.25 * kd), rel=1e-5)
    mixed.loss.backward()  # the teacher takes no gradient, the student does
    assert all(p.grad is None for p in distillation.teacher.parameters())
    assert model.classifier.weight.grad is not None
    model.eval()
    with torch.no_grad():
        evaluated = model(**batch())
    assert float(evaluated.loss) == pytest.approx(float(F.cross_entropy(evaluated.logits, batch()["labels"])))
    distillation.close()
    assert distillation.teacher is None and not model._forward_hooks
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        SelfDistillation(model, weight=0.0)


def test_a_model_without_labels_trains_on_and_is_warned_about_once(caplog):
    model = tiny_bert(seed=0).train()
    distillation = SelfDistillation(model, weight=0.5)
    distillation.attach(model)
    inputs = {k: v for k, v in batch().items() if k != "labels"}
    with caplog.at_level(logging.WARNING, logger="cuttlefish_hf.distillation"):
        model(**inputs)
        model(**inputs)
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "no `loss`" in caplog.records[0].message


def train_controller(config: CuttlefishConfig, steps: int = 4, model=None, optimizer_cls=torch.optim.AdamW):
    model = tiny_bert(seed=0) if model is None else model
    controller = Cuttlefish(model, config, total_steps=steps, steps_per_epoch=steps)
    optimizer = optimizer_cls(model.parameters(), lr=1e-3)
    controller.begin(optimizer)
    for step in range(1, steps + 1):
        model.train()
        model(**batch(step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        controller.step_end(step, optimizer)
    return model, controller


def test_the_controller_teaches_with_the_dense_model_at_the_switch_and_releases_it_at_the_end():
    model, controller = train_controller(CuttlefishConfig(**SWITCH_AT_2, distillation=0.5))
    assert controller.switched and controller.distillation is not None
    teacher = controller.distillation.teacher
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not any(type(m).__name__.startswith("Factorized") for m in teacher.modules())  # dense
    assert all(not k.startswith("teacher") for k in model.state_dict())  # saved weights never hold it
    controller.end()
    assert controller.distillation is None and not model._forward_hooks


def test_without_distillation_nothing_is_copied_or_hooked():
    model, controller = train_controller(CuttlefishConfig(**SWITCH_AT_2))
    assert controller.switched and controller.distillation is None and not model._forward_hooks


def test_resuming_after_the_switch_says_the_teacher_is_gone(caplog):
    model, controller = train_controller(CuttlefishConfig(**SWITCH_AT_2, distillation=0.5))
    resumed = Cuttlefish(model, CuttlefishConfig(**SWITCH_AT_2, distillation=0.5), total_steps=4)
    with caplog.at_level(logging.WARNING, logger="cuttlefish_hf.controller"):
        resumed.load_state_dict(controller.state_dict())
    assert "not part of checkpoints" in caplog.text


@pytest.mark.parametrize("trainer_cls", ["callback", CuttlefishTrainer])
def test_trainer_runs_distill_and_release_the_teacher(tmp_path, trainer_cls):
    from transformers import Trainer

    config = CuttlefishConfig(**SWITCH_AT_2, distillation=0.5)
    trainer, callback = build_trainer(tmp_path, config, Trainer if trainer_cls == "callback" else trainer_cls,
                                      num_train_epochs=2)
    seen = []
    original = SelfDistillation._hook
    def spy(self, module, args, kwargs, output):
        seen.append(module.training)
        return original(self, module, args, kwargs, output)
    SelfDistillation._hook = spy
    try:
        trainer.train()
    finally:
        SelfDistillation._hook = original
    controller = callback.controller
    assert controller.switched and controller.distillation is None  # released at train end
    assert len(seen) == trainer.state.global_step - controller.switch_step  # every step after the switch
    assert not trainer.model._forward_hooks


def test_squared_gradient_averages_read_adam_state_as_the_dense_matrix():
    model = tiny_gpt2(seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    attention = model.transformer.h[0].attn.c_attn  # a Conv1D: weight (in, out)
    averages = squared_gradient_averages(optimizer, {"attn": attention})
    torch.testing.assert_close(averages["attn"], optimizer.state[attention.weight]["exp_avg_sq"].T)
    sgd = torch.optim.SGD(model.parameters(), lr=1e-3)
    sgd.step()
    assert squared_gradient_averages(sgd, {"attn": attention}) == {}


def test_fisher_whitened_switch_reads_adam_and_differs_from_whitened(caplog):
    config = dict(SWITCH_AT_2, rank_rule="kind_fractions", mode="cuttlefish", measure_every_steps=1, window=1,
                  min_warmup_measurements=1, eps_relative=1.0, max_warmup_fraction=0.5)
    fisher, controller = train_controller(CuttlefishConfig(**config, init="fisher_whitened"))
    whitened, _ = train_controller(CuttlefishConfig(**config, init="whitened"))
    assert controller.switched and controller.summary()["init"] == "fisher_whitened"
    name = next(iter(controller.report.plan))
    first_f = fisher.get_submodule(name).first.weight
    first_w = whitened.get_submodule(name).first.weight
    assert first_f.shape == first_w.shape and not torch.allclose(first_f, first_w, atol=1e-4)
    with caplog.at_level(logging.WARNING, logger="cuttlefish_hf.controller"):
        train_controller(CuttlefishConfig(**config, init="fisher_whitened"), optimizer_cls=torch.optim.SGD)
    assert "no squared-gradient averages" in caplog.text
