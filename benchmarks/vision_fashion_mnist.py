"""Vanilla vs Cuttlefish vs Pufferfish vs SI&FD: a small DeiT trained from scratch on Fashion-MNIST, on the CPU.

Each mode runs ``examples/vision/train.py`` once, in its own process, with the same seed, data and schedule; this
script collects their ``results.json`` into ``benchmarks/results/vision_fashion_mnist.json`` (and a markdown table
next to it). About 6-8 minutes a run on 2 idle CPU cores. The IDX files come from Debian's package (or pass
``--data-dir``)::

    apt-get install dataset-fashion-mnist      # -> /usr/share/datasets/fashion-mnist/*.gz
    python benchmarks/vision_fashion_mnist.py  # [--epochs 15 --train-subset 20000 --modes vanilla cuttlefish]
    python benchmarks/vision_fashion_mnist.py --seed 1 --modes vanilla cuttlefish \
        --results benchmarks/results/vision_fashion_mnist_seed1.json

Every run uses one OpenMP thread per process (plus one data-loading worker): on a shared 2-core machine, two
threads spinning against other jobs were up to 10x slower than one. Wall times are still noisy there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "vision" / "train.py"
MODEL = ["--model", "deit_tiny_patch16_224", "--img-size", "28", "--patch-size", "7", "--in-chans", "1",
         "--embed-dim", "96", "--depth", "4", "--num-heads", "3"]
RECIPE = ["--batch-size", "128", "--lr", "1e-3", "--weight-decay", "0.05", "--warmup-epochs", "1",
          "--smoothing", "0.1", "--crop-scale", "0.8", "1.0", "--hflip", "0.5", "--color-jitter", "0",
          "--num-workers", "1"]


def run(mode: str, args: argparse.Namespace, output_dir: Path) -> dict:
    command = [sys.executable, str(EXAMPLE), "--cpu", "--data-dir", args.data_dir, "--output-dir", str(output_dir),
               *(["--no_cuttlefish"] if mode == "vanilla" else ["--mode", mode]), "--epochs", str(args.epochs), "--train-subset", str(args.train_subset), *MODEL, *RECIPE,
               "--seed", str(args.seed)]
    if args.eval_subset:
        command += ["--eval-subset", str(args.eval_subset)]
    output_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    print(f"[{time.strftime('%H:%M:%S')}] {mode}: {' '.join(command[1:])}", flush=True)
    with open(output_dir / "log.txt", "w", encoding="utf-8") as log:
        subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, check=True, cwd=ROOT)
    results = json.loads((output_dir / "results.json").read_text(encoding="utf-8"))
    return {
        "mode": mode,
        "final_accuracy": results["final_accuracy"],
        "best_accuracy": results["best_accuracy"],
        "params_before": results["params_before"],
        "params_after": results["params_after"],
        "target_params_before": results["target_params_before"],
        "target_params_after": results["target_params_after"],
        "switch_epoch": results["switch_epoch"],
        "switch_step": results["switch_step"],
        "steps": results["steps"],
        "wall_seconds": round(results["wall_seconds"], 1),
        "train_seconds": round(results["train_seconds"], 1),
        "eval_seconds": round(results["eval_seconds"], 1),
        "measure_seconds": round(results["measure_seconds"], 3),
        "surgery_seconds": round(results["surgery_seconds"], 3),
        "measurement_overhead_percent": round(results["measurement_overhead_percent"], 3),
        "plan": results["cuttlefish"].get("plan", {}),
        "per_epoch": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in epoch.items()}
                      for epoch in results["epochs"]],
        "machine": results["machine"],
    }


def epoch_speedup(run: dict) -> str:
    """Median epoch time (train + eval) at full rank over that of the epochs after the switch epoch."""
    epochs = run["per_epoch"]
    first_low = next((i for i, e in enumerate(epochs) if e["low_rank"]), None)
    if first_low is None:
        return "-"
    dense = [e["seconds"] for e in epochs[:first_low]]
    low = [e["seconds"] for e in epochs[first_low + 1:]]  # the switch epoch itself was trained dense
    if not dense or not low:
        return "-"
    ideal = run["target_params_before"] / run["target_params_after"]
    return f"{statistics.median(dense) / statistics.median(low):.2f}x (ideal {ideal:.2f}x)"


def table(runs: list[dict]) -> str:
    rows = [("run", "test acc % (final / best)", "params", "targeted layers", "switch epoch", "wall s",
             "epoch speedup after the switch", "measuring %")]
    for r in runs:
        switch = "-" if r["switch_epoch"] is None else f"{r['switch_epoch']:.2f}"
        rows.append((r["mode"], f"{r['final_accuracy']:.2f} / {r['best_accuracy']:.2f}", f"{r['params_after']:,}",
                     f"{r['target_params_before']:,} -> {r['target_params_after']:,}", switch,
                     f"{r['wall_seconds']:.0f}", epoch_speedup(r), f"{r['measurement_overhead_percent']:.2f}"))
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + "---|" * len(rows[0]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--train-subset", type=int, default=20000, help="of the 60,000 training images")
    parser.add_argument("--eval-subset", type=int, default=None, help="default: the whole 10,000-image test set")
    parser.add_argument("--modes", nargs="+", default=["vanilla", "cuttlefish", "pufferfish", "si_fd"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=str(ROOT / "outputs" / "vision_fashion_mnist"))
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "vision_fashion_mnist.json"))
    parser.add_argument("--table-only", action="store_true", help="only rewrite the markdown table from --results")
    args = parser.parse_args()
    if args.table_only:
        markdown = table(json.loads(Path(args.results).read_text(encoding="utf-8"))["runs"])
        Path(args.results).with_suffix(".md").write_text(markdown + "\n", encoding="utf-8")
        print(markdown)
        return

    start, load_before = time.perf_counter(), os.getloadavg()
    runs = [run(mode, args, Path(args.output_dir) / f"{mode}-seed{args.seed}") for mode in args.modes]
    report = {
        "benchmark": "small DeiT from scratch on Fashion-MNIST: " + ", ".join(args.modes),
        "data": {"dataset": "Fashion-MNIST (Debian dataset-fashion-mnist IDX files)",
                 "train_images": args.train_subset, "test_images": args.eval_subset or 10000},
        "model": "timm deit_tiny_patch16_224 with img_size=28, patch_size=7, in_chans=1, embed_dim=96, depth=4, "
                 "num_heads=3 (16 patches + class token), from scratch",
        "recipe": {"epochs": args.epochs, "flags": RECIPE, "seed": args.seed,
                   "optimizer": "timm adamw (no decay on norms/biases/tokens)",
                   "schedule": "1 epoch linear warm-up, cosine decay", "cuttlefish_config": "library defaults"},
        "command": "python benchmarks/vision_fashion_mnist.py " + " ".join(sys.argv[1:]),
        "runs": runs,
        "total_minutes": round((time.perf_counter() - start) / 60, 1),
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "notes": "One OpenMP thread and one data-loading worker per run, runs one after the other; a 1-minute load "
                 "average well above 2 (see load_average_before_after) means other jobs shared the 2 cores.",
        "machine": runs[0]["machine"],
    }
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    Path(args.results).with_suffix(".md").write_text(table(runs) + "\n", encoding="utf-8")
    print(table(runs))
    print(f"\nwrote {args.results}; logs, plots and models under {args.output_dir}")


if __name__ == "__main__":
    main()
