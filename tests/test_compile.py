"""``torch.compile`` across the switch: in Trainer (``torch_compile=True`` or a compiled model handed to it) and
in a plain loop; the compiled run must match the eager one and run the factorized model's graph afterwards."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from helpers import KeywordDataset, tiny_bert
from safetensors import safe_open
from test_trainer_callback import FAST, step_losses, training_args
from torch._dynamo import register_backend

from cuttlefish_hf import Cuttlefish, CuttlefishCallback, CuttlefishConfig, CuttlefishTrainer, factorized_plan
from cuttlefish_hf import controller as controller_module
from cuttlefish_hf.layers import FactorizedLayer
from cuttlefish_hf.profiling import profile_layers

# Pretrained-weights path on a tiny model: input statistics recorded at step 1 and in the steps before the
# fixed switch (step 8 of 32), hooks added and removed around a compiled model.
WHITENED = dict(rank_rule="kind_fractions", init="whitened", warmup="fixed", activation_tokens=200)
GRAPHS_RUN = [0]


@register_backend
def counting_eager(graph_module, example_inputs):
    """Runs each compiled graph eagerly and counts the graphs run (one per graph-break-free region)."""
    def run(*args):
        GRAPHS_RUN[0] += 1
        return graph_module.forward(*args)
    return run


@pytest.fixture(autouse=True)
def fresh_compile_caches():
    torch.compiler.reset()
    yield
    torch.compiler.reset()


def train(tmp_path, config: dict, compiled: str | None, trainer_cls=tf.Trainer):
    """Train a tiny BERT (no dropout: inductor draws its own random numbers) for 32 steps; ``compiled`` is
    None (eager), ``"args:<backend>"`` (``TrainingArguments(torch_compile=True)``) or ``"model"`` (a
    ``torch.compile``d model handed to Trainer)."""
    model = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    overrides = {}
    if compiled and compiled.startswith("args:"):
        overrides = dict(torch_compile=True, torch_compile_backend=compiled.removeprefix("args:"))
    elif compiled == "model":
        model = torch.compile(model, backend="aot_eager")
        overrides = dict(remove_unused_columns=False)  # a compiled forward takes (*args, **kwargs)
    args = training_args(tmp_path, **overrides)
    cuttlefish = CuttlefishConfig(**config)
    if trainer_cls is CuttlefishTrainer:
        trainer = CuttlefishTrainer(model=model, args=args, train_dataset=KeywordDataset(),
                                    cuttlefish_config=cuttlefish)
        callback = trainer.cuttlefish
    else:
        callback = CuttlefishCallback(cuttlefish)
        trainer = tf.Trainer(model=model, args=args, train_dataset=KeywordDataset(), callbacks=[callback])
    trainer.train()
    return trainer, callback.controller


@pytest.mark.parametrize("config,compiled,trainer_cls", [
    (FAST, "args:aot_eager", tf.Trainer),
    (FAST, "model", tf.Trainer),
    (WHITENED, "args:aot_eager", CuttlefishTrainer),
    (FAST, "args:inductor", CuttlefishTrainer),
], ids=["from-scratch-torch_compile", "from-scratch-compiled-model", "pretrained-path-torch_compile", "inductor"])
def test_compiled_trainer_run_matches_the_eager_run(tmp_path, config, compiled, trainer_cls):
    eager, eager_controller = train(tmp_path / "eager", config, None, trainer_cls)
    assert eager_controller.summary()["compiled_graphs_low_rank"] == 0
    with torch._inductor.config.patch(fallback_random=True):
        trainer, controller = train(tmp_path / "compiled", config, compiled, trainer_cls)
    plan = controller.report.plan
    assert plan and plan == eager_controller.report.plan and controller.switch_step == eager_controller.switch_step
    losses, eager_losses = step_losses(trainer), step_losses(eager)
    assert len(losses) == 32 and losses.keys() == eager_losses.keys()
    assert max(abs(losses[s] - eager_losses[s]) for s in losses) < 1e-4  # the low-rank steps included
    summary = controller.summary()
    assert summary["compiled_graphs_dense"] >= 1 and 1 <= summary["compiled_graphs_low_rank"] <= 2
    assert not any("_orig_mod" in name for name in plan)
    trainer.save_model(str(tmp_path / "final"))
    with safe_open(str(tmp_path / "final" / "model.safetensors"), framework="pt") as handle:
        assert not any("_orig_mod" in key for key in handle.keys())
    loaded = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "final")
    assert factorized_plan(loaded) == plan


def run_loop(compile_model: bool) -> tuple[list[float], list[int], Cuttlefish, dict]:
    """A plain loop (what an Accelerate loop does) over the pretrained-weights path; per step: the loss and the
    graphs the compiled model ran."""
    torch.manual_seed(0)
    model = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    runner = torch.compile(model, backend="counting_eager") if compile_model else model
    controller = Cuttlefish(runner, CuttlefishConfig(**WHITENED), total_steps=24)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    controller.begin(optimizer)
    recorded = {}
    losses, graphs = [], []
    loader = torch.utils.data.DataLoader(KeywordDataset(), batch_size=16)
    for step in range(1, 25):
        batch = next(iter(loader)) if step == 1 else batch  # one batch: no data-order noise
        GRAPHS_RUN[0] = 0
        loss = runner(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        graphs.append(GRAPHS_RUN[0])
        stats = controller.activations
        if stats is not None and stats.collecting:
            recorded = {name: stats.second_moment_sum(name).clone() for name in stats.names}
        controller.step_end(step, optimizer)
    return losses, graphs, controller, recorded


def test_compiled_loop_runs_one_graph_per_step_outside_the_recording_and_matches_eager(caplog):
    eager_losses, _, eager, eager_recorded = run_loop(compile_model=False)
    losses, graphs, controller, recorded = run_loop(compile_model=True)
    assert controller.switch_step == eager.switch_step == 6 and controller.report.plan == eager.report.plan
    assert recorded.keys() == eager_recorded.keys() and recorded
    assert all(torch.allclose(recorded[name], eager_recorded[name], rtol=1e-5) for name in recorded)
    assert max(abs(a - b) for a, b in zip(losses, eager_losses)) < 1e-5
    # Recording (step 1, steps 4-6): the hooks run between graphs. Otherwise one graph: hooks once added leave
    # no graph breaks behind, and the switch brings the factorized model's graph, not the dense one's.
    assert graphs[0] > 1 and graphs[3] > 1
    assert graphs[1] == graphs[2] == 1 and set(graphs[6:]) == {1}
    assert controller.compiled_graphs()["low_rank"] == 1
    with caplog.at_level("INFO", logger="cuttlefish_hf"):
        controller.report_speed()
    assert "torch.compile compiled 1 graph(s) since the switch" in caplog.text


def test_a_compiled_run_profiles_its_layers_compiled_and_then_runs_the_factorized_graph(tmp_path, monkeypatch):
    # skip_first_blocks="auto" times the layers at the switch: compiled in a compiled run, which then drops
    # torch.compile's caches; the run goes on with one factorized graph and the eager run's plan and losses.
    seen = []

    def profile(*args, **kwargs):  # deterministic timings: every factorized layer twice as fast
        seen.append(kwargs["compiled"])
        return profile_layers(*args, **kwargs, cache={},
                              timer=lambda run, module: 0.5 if isinstance(module, FactorizedLayer) else 1.0)

    monkeypatch.setattr(controller_module, "profile_layers", profile)
    config = {**FAST, "skip_first_blocks": "auto"}
    eager, eager_controller = train(tmp_path / "eager", config, None)
    trainer, controller = train(tmp_path / "compiled", config, "args:aot_eager")
    assert seen == [False, True] and controller.profile_report.compiled
    assert controller.report.plan == eager_controller.report.plan and len(controller.report.plan) == 12
    losses, eager_losses = step_losses(trainer), step_losses(eager)
    assert max(abs(losses[s] - eager_losses[s]) for s in losses) < 1e-4
    assert controller.summary()["compiled_graphs_low_rank"] == 1
