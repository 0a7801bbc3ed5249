"""Rank rules, factor inits and switch points for fine-tuning a pretrained model: accuracy against parameters kept.

The packaged all-MiniLM-L6-v2 fine-tuned on ``../shared/data/debian-sections`` by ``examples/glue/run_glue.py``
with ``benchmarks/glue_minilm.py``'s schedule (3 epochs, batch 32, lr 5e-5, 64 tokens), measuring every 25 steps
as glue_minilm does. Every candidate is a set of ``CuttlefishConfig`` flags; unless it says otherwise it switches
where the library's default does (``warmup="auto"``: for pretrained weights, after ``fixed_warmup_fraction``
of the steps, step 94 of 375 here).

* ``kind_whitened`` - the pretrained default: ``kind_fractions`` (attention:FFN kept as 0.4:0.7), ``whitened`` init,
  the factors' steps scaled by 4 after the switch (``factor_lr_scale="auto"``);
* ``kind_whitened_lr1`` - the default before ``factor_lr_scale`` (``--factor_lr_scale 1``);
* ``kind_whitened_wait`` - the 0.1 default: that, switching once the stable ranks settle
  (``--warmup stable_ranks``, step 150 of 375 here);
* ``kind_svd`` - the default's ranks and switch point, plain SVD factors;
* ``uniform_whitened`` / ``uniform_svd`` - every layer keeps the same fraction;
* ``paper_rule`` - the paper's ``scaled_stable_rank`` with SVD factors, waiting for the stable ranks (chooses its
  own ranks: one point);
* ``vanilla`` - no Cuttlefish (the horizontal line).

``--fractions`` sweeps the fraction of the encoder's Linear weights kept: uniform candidates keep it in every
layer; kind candidates scale attention and FFN fractions together (ratio 0.4:0.7) so that the whole encoder
keeps it. Each run writes ``outputs/pretrained_rank_rules/runs/<run>.json``; ``collect`` merges them into
``benchmarks/results/pretrained_rank_rules_v3.json`` and a plot (``.png``) next to it (``restore`` puts the runs
of an earlier results file back into ``runs/``; v2's ``kind_whitened`` runs, made when the default's
``factor_lr_scale`` was 1, come back as ``kind_whitened_lr1``):

    .venv/bin/python benchmarks/pretrained_rank_rules.py restore \\
        --from_results benchmarks/results/pretrained_rank_rules_v2.json
    .venv/bin/python benchmarks/pretrained_rank_rules.py run --seeds 42 --candidates vanilla kind_whitened \\
        kind_whitened_lr1 kind_whitened_wait --fractions 0.4 0.5 0.6 0.7 0.8
    .venv/bin/python benchmarks/pretrained_rank_rules.py run --candidates kind_svd --fractions 0.6 \\
        --epochs 1 --max_train_samples 64   # a smoke run
    .venv/bin/python benchmarks/pretrained_rank_rules.py collect

An earlier version of this script reimplemented the switch to measure exploratory variants as well:
error-driven budget and energy allocations over whitened errors, output-gradient (diagonal Fisher) weighting,
balanced (diagonally scaled) factors. They lost to fixed kind fractions and were removed from the library; their
numbers stay in ``benchmarks/results/pretrained_rank_rules.json`` / ``.png``, which this script leaves alone.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import platform
import shlex
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import glue_minilm
from glue_minilm import REPO, minilm_folder

WORK = REPO / "outputs" / "pretrained_rank_rules"
RESULTS = REPO / "benchmarks" / "results" / "pretrained_rank_rules_v3.json"
LR1 = ("--factor_lr_scale", "1")  # the factors' steps as they were before factor_lr_scale
MEASURE = ["--measure_every_steps", "25"]
WAIT = glue_minilm.WAIT  # the 0.1 default's switch point: once the stable ranks settle
# name -> (rank rule, init, how the --fractions sweep applies: "kind", "uniform" or None, more config flags)
CANDIDATES = {"kind_whitened": ("kind_fractions", "whitened", "kind", ()),
              "kind_whitened_lr1": ("kind_fractions", "whitened", "kind", LR1),
              "kind_whitened_wait": ("kind_fractions", "whitened", "kind", (*WAIT, *LR1)),
              "kind_svd": ("kind_fractions", "svd", "kind", ()),
              "uniform_whitened": ("kind_fractions", "whitened", "uniform", ()),
              "uniform_svd": ("kind_fractions", "svd", "uniform", ()),
              "paper_rule": ("scaled_stable_rank", "svd", None, WAIT), "vanilla": (None, None, None, ())}
LABELS = {"kind_whitened": "kind_whitened: the default (switch at 25% of the steps, factors' steps x4)",
          "kind_whitened_lr1": "kind_whitened_lr1: the default before factor_lr_scale (x1)",
          "kind_whitened_wait": "kind_whitened_wait: the 0.1 default (switch when the stable ranks settle, x1)"}
# Candidates renamed since an earlier results file: its runs come back under the new name.
RENAMED = {"kind_whitened": ("kind_whitened_lr1", "run when the default's factor_lr_scale was 1, without the flag")}


def kind_weights() -> dict[str, int]:
    """Weight parameters of the encoder's targets by layer kind (what kind_fractions apply to)."""
    from transformers import AutoModelForSequenceClassification

    from cuttlefish_hf.targeting import find_targets, layer_kind

    model = AutoModelForSequenceClassification.from_pretrained(minilm_folder())
    counts = collections.Counter()
    for name in find_targets(model):
        counts[layer_kind(name)] += model.get_submodule(name).weight.numel()
    return dict(counts)


def kind_fractions(target: float, weights: dict[str, int]) -> dict[str, float]:
    """Per-kind fractions in the default's ratio whose weighted mean over ``weights`` is ``target``."""
    from cuttlefish_hf.config import DEFAULT_KIND_FRACTIONS, OTHER_KIND_FRACTION

    ratio = {kind: DEFAULT_KIND_FRACTIONS.get(kind, OTHER_KIND_FRACTION) for kind in weights}
    scale = target * sum(weights.values()) / sum(ratio[k] * n for k, n in weights.items())
    fractions = {kind: round(scale * r, 4) for kind, r in ratio.items()}
    if max(fractions.values()) > 1:
        raise ValueError(f"A kept fraction of {target} needs {fractions}: above 1 at the default's ratio.")
    return fractions


def candidate_flags(candidate: str, fraction: float | None, weights: dict[str, int]) -> list[str]:
    rule, init, sweep, more = CANDIDATES[candidate]
    if rule is None:
        return []
    flags = ["--cuttlefish", "--rank_rule", rule, "--init", init, *MEASURE, *more]
    if sweep is not None:
        kinds = kind_fractions(fraction, weights) if sweep == "kind" else dict.fromkeys(weights, fraction)
        flags += ["--kind_fractions", json.dumps(kinds)]
    return flags


def run_all(args: argparse.Namespace) -> None:
    weights, dense = kind_weights(), glue_minilm.encoder_linear_params(minilm_folder())[1]
    driver = glue_minilm.portable(shlex.join(["python", "benchmarks/pretrained_rank_rules.py", *args.argv]))
    passed = [text for flag in ("max_train_samples", "max_eval_samples") if getattr(args, flag) is not None
              for text in (f"--{flag}", str(getattr(args, flag)))] + shlex.split(args.run_glue_flags)
    (args.output_dir / "runs").mkdir(parents=True, exist_ok=True)
    with glue_minilm.copied_data(args.data_dir) as data:
        for seed, candidate in itertools.product(args.seeds, args.candidates):
            for fraction in args.fractions if CANDIDATES[candidate][2] else [None]:
                name = run_name({"candidate": candidate, "target_fraction": fraction, "seed": seed})
                path = args.output_dir / "runs" / f"{name}.json"
                if path.exists() and not args.overwrite:
                    continue
                flags = [*glue_minilm.run_flags(argparse.Namespace(epochs=args.epochs, seed=seed), data), *passed,
                         *candidate_flags(candidate, fraction, weights)]
                record = glue_minilm.run(name, flags, args.output_dir / name, in_process=args.in_process)
                record.update(candidate=candidate, seed=seed, target_fraction=fraction, driver_command=driver,
                              kept_fraction=record["encoder_linear_params"] / dense)
                path.write_text(json.dumps(record, indent=1) + "\n")
                print(f"{name}: accuracy {record['accuracy']:.4f}, kept {record['kept_fraction']:.3f}", flush=True)


def run_name(record: dict) -> str:
    fraction = record["target_fraction"]
    return f"{record['candidate']}{'' if fraction is None else f'-f{fraction:.2f}'}-seed{record['seed']}"


def restore(args: argparse.Namespace) -> None:
    """Put the runs of an earlier results file back into ``runs/`` (renamed candidates under their new name)."""
    (args.output_dir / "runs").mkdir(parents=True, exist_ok=True)
    for record in json.loads(args.from_results.read_text())["runs"]:
        if record["candidate"] in RENAMED:
            new, why = RENAMED[record["candidate"]]
            record = {**record, "candidate": new, "renamed_from": f"{record['candidate']} ({why})"}
        path = args.output_dir / "runs" / f"{run_name(record)}.json"
        if not path.exists():
            path.write_text(json.dumps(record, indent=1) + "\n")
            print(f"restored {path.name}")


def collect(args: argparse.Namespace) -> None:
    import torch
    import transformers

    import cuttlefish_hf

    runs = [json.loads(p.read_text()) for p in sorted((args.output_dir / "runs").glob("*.json"))]
    groups = collections.defaultdict(list)  # (candidate, target fraction or "-") -> its runs over seeds
    for r in runs:
        groups[r["candidate"], "-" if r["target_fraction"] is None else f"{r['target_fraction']:.2f}"].append(r)
    summary: dict[str, dict[str, dict]] = collections.defaultdict(dict)
    for (candidate, key), mine in sorted(groups.items()):
        summary[candidate][key] = {"seeds": [r["seed"] for r in mine], "accuracy": [r["accuracy"] for r in mine],
                                   **{f"{k}_mean": statistics.mean(r[k] for r in mine) for k in
                                      ("accuracy", "kept_fraction", "encoder_linear_params")}}
    payload = {
        "experiment": "all-MiniLM-L6-v2 (packaged) fine-tuned on debian-sections (8 classes, 4,000 train / 1,200 "
                      "validation) with examples/glue/run_glue.py, 3 epochs",
        "candidates": {c: dict(zip(("rank_rule", "init", "fraction_sweep", "flags"), v))
                       for c, v in CANDIDATES.items()},
        "measure_flags": " ".join(MEASURE),
        "commands": [*sorted({r["driver_command"] for r in runs}),
                     "python benchmarks/pretrained_rank_rules.py collect"],
        "machine": {"cpu_cores": os.cpu_count(), "device": "cpu", "dtype": "float32", "processor": platform.processor()
                    or platform.machine(), "note": "each run's load averages: above 2 it got less than both cores"},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "cuttlefish_hf": cuttlefish_hf.__version__},
        "summary": summary,
        "runs": runs,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(payload, indent=1) + "\n")
    plot(summary, runs, args.results.with_suffix(".png"))
    for candidate, key in sorted(groups):
        row = summary[candidate][key]
        print(f"{candidate:17s} {key:>4s} kept {row['kept_fraction_mean']:.3f} accuracy "
              f"{100 * row['accuracy_mean']:.2f} (seeds {row['seeds']})")


def plot(summary: dict, runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    if "vanilla" in summary:
        vanilla = 100 * summary["vanilla"]["-"]["accuracy_mean"]
        ax.axhline(vanilla, color="black", lw=1, label=f"vanilla ({vanilla:.2f}%)")
    for i, (candidate, by_fraction) in enumerate(c for c in summary.items() if c[0] != "vanilla"):
        color, marker = f"C{i}", "os^Dv<>"[i % 7]
        rows = sorted(by_fraction.values(), key=lambda row: row["kept_fraction_mean"])
        ax.plot([r["kept_fraction_mean"] for r in rows], [100 * r["accuracy_mean"] for r in rows], color=color,
                marker=marker, label=LABELS.get(candidate, candidate))
        mine = [r for r in runs if r["candidate"] == candidate]
        ax.scatter([r["kept_fraction"] for r in mine], [100 * r["accuracy"] for r in mine], color=color,
                   marker=marker, alpha=0.3, s=14)
    ax.set_xlabel("encoder Linear parameters kept (fraction)")
    ax.set_ylabel("validation accuracy (%): mean over seeds; faint: single runs")
    seeds = sorted({r["seed"] for r in runs})
    ax.set_title(f"all-MiniLM-L6-v2 on debian-sections, 3 epochs (seeds {seeds})", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["run", "collect", "restore"])
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.4, 0.5, 0.6, 0.7, 0.8],
                        help="fractions of the encoder's Linear weights kept (sweep candidates)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max_train_samples", type=int, help="passed to run_glue.py (smoke runs)")
    parser.add_argument("--max_eval_samples", type=int, help="passed to run_glue.py (smoke runs)")
    parser.add_argument("--run_glue_flags", default="", help="more run_glue.py flags, e.g. '--max_seq_length 32'")
    parser.add_argument("--in_process", action="store_true", help="call run_glue's main here (tests)")
    parser.add_argument("--overwrite", action="store_true", help="rerun runs whose JSON exists")
    parser.add_argument("--data_dir", type=Path, default=glue_minilm.DEFAULT_DATA)
    parser.add_argument("--output_dir", type=Path, default=WORK, help="runs/*.json and run_glue outputs")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--from_results", type=Path, help="restore: the earlier results file")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    {"run": run_all, "collect": collect, "restore": restore}[args.command](args)


if __name__ == "__main__":
    main()
