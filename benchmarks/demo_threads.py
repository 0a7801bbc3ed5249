"""Demo training steps with 2 torch threads vs the count the CLI chooses, on an idle and on a loaded machine.

The demo's dense training step (the 96-wide, 4-block ViT on scikit-learn's digits, batch 64, AdamW; 23 steps make
an epoch) is timed in this process with 1 and with 2 intra-op threads, alternating, ``--repeats`` times, in two
conditions: ``idle`` (nothing started by this script) and ``loaded`` (``--busy`` processes spinning
``while True: pass``, each ending by itself after at most ``--busy-seconds`` and killed when the condition ends).
At the start of each condition ``cuttlefish_hf.cli.main.choose_threads`` (no ``--threads``, no
``OMP_NUM_THREADS``) says what the CLI would pick. A trial stops after an epoch or after ``--cap`` seconds,
whichever comes first (oversubscribed steps can take seconds each); seconds per epoch are extrapolated from the
steps done. Other processes on a shared machine add noise: medians over the repeats are reported, with every
trial (and the CPUs' worth of other work just before it) and the load averages kept in the JSON. ``--cli`` also
times ``cuttlefish-hf demo --epochs 2`` end to end, once per condition, with the default choice and with
``--threads 2`` (stopped after ``--cli-timeout`` s).

    python benchmarks/demo_threads.py            # writes benchmarks/results/demo_threads_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

from cuttlefish_hf import __version__
from cuttlefish_hf.cli.demo import digits_loaders, small_vit
from cuttlefish_hf.cli.main import busy_cores_now, choose_threads, usable_cores

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SPIN = "import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"


def load_now() -> dict:
    busy = busy_cores_now()
    return {"loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
            "busy_cores_now": None if busy is None else round(busy, 2)}


def time_steps(threads: int, model, optimizer, batches, cap: float) -> dict:
    """Seconds per demo training step at ``threads`` intra-op threads: 2 warm-up steps, then up to one epoch."""
    torch.set_num_threads(threads)
    others = busy_cores_now(0.2)  # what else kept the CPUs busy as the trial began (this process sleeps)
    loss_fn = nn.CrossEntropyLoss()

    def step(images, labels):
        loss = loss_fn(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for images, labels in batches[:2]:
        step(images, labels)
    start, done = time.perf_counter(), 0
    for images, labels in batches:
        step(images, labels)
        done += 1
        if time.perf_counter() - start > cap:
            break
    seconds = time.perf_counter() - start
    return {"threads": threads, "steps": done, "seconds": seconds, "step_seconds": seconds / done,
            "epoch_seconds": seconds / done * len(batches), "capped": done < len(batches),
            "others_busy_cores_before": None if others is None else round(others, 2)}


def time_cli(extra: list[str], timeout: float, output_dir: str) -> dict:
    """``cuttlefish-hf demo --epochs 2`` in a subprocess without OMP_NUM_THREADS: wall seconds and its thread log."""
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    command = [sys.executable, "-m", "cuttlefish_hf.cli.main", "demo", "--epochs", "2", "--output-dir", output_dir,
               *extra]
    shown = ["cuttlefish-hf", "demo", "--epochs", "2", "--output-dir", "TMPDIR", *extra]  # no absolute paths
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as expired:
        stderr = expired.stderr.decode() if isinstance(expired.stderr, bytes) else (expired.stderr or "")
        log = [line for line in stderr.splitlines() if "torch thread" in line]
        return {"argv": shown, "wall_seconds": None, "timed_out_after": timeout,
                "thread_log": log[0] if log else None}
    log = [line for line in done.stderr.splitlines() if "torch thread" in line]
    return {"argv": shown, "returncode": done.returncode,
            "wall_seconds": time.perf_counter() - start, "thread_log": log[0] if log else None}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--busy", type=int, default=2, help="spinning processes in the loaded condition")
    parser.add_argument("--busy-seconds", type=float, default=900, help="each spinner ends by itself after this")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds between starting spinners and timing")
    parser.add_argument("--cap", type=float, default=15.0, help="stop a trial after this many seconds")
    parser.add_argument("--cli", action="store_true", help="also time `cuttlefish-hf demo --epochs 2` end to end")
    parser.add_argument("--cli-timeout", type=float, default=120.0)
    parser.add_argument("--output", default=os.path.join("benchmarks", "results", "demo_threads_cpu.json"))
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    train_loader, _ = digits_loaders(64, 0)
    batches = list(train_loader)
    model = small_vit(96, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    conditions = {}
    for condition in ("idle", "loaded"):
        spinners = []
        try:
            if condition == "loaded":
                spinners = [subprocess.Popen([sys.executable, "-c", SPIN.format(seconds=args.busy_seconds)])
                            for _ in range(args.busy)]
                time.sleep(args.settle)
            chosen, why = choose_threads(None, environ={})
            record = {"busy_processes": len(spinners), "chosen_threads": chosen, "chosen_because": why,
                      "load_at_start": load_now(), "trials": []}
            for repeat in range(args.repeats):
                for threads in ((1, 2) if repeat % 2 == 0 else (2, 1)):
                    trial = time_steps(threads, model, optimizer, batches, args.cap)
                    record["trials"].append(trial)
                    print(condition, repeat, threads, f"{trial['epoch_seconds']:.2f} s/epoch", file=sys.stderr)
            if args.cli:
                with tempfile.TemporaryDirectory() as out:
                    record["cli"] = [time_cli([], args.cli_timeout, out),
                                     time_cli(["--threads", "2"], args.cli_timeout, out)]
            record["load_at_end"] = load_now()
        finally:
            for spinner in spinners:
                spinner.kill()
                spinner.wait()
        medians = {threads: statistics.median(t["epoch_seconds"] for t in record["trials"] if t["threads"] == threads)
                   for threads in (1, 2)}
        record["median_epoch_seconds"] = {str(k): round(v, 3) for k, v in medians.items()}
        record["median_epoch_seconds_chosen"] = round(medians[chosen], 3)
        record["speedup_chosen_vs_2_threads"] = round(medians[2] / medians[chosen], 2)
        conditions[condition] = record

    result = {
        "what": "demo dense training step (ViT width 96, depth 4, batch 64, 23 steps/epoch), seconds per epoch",
        "command": "python benchmarks/demo_threads.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "note": ("medians over repeats; the machine is shared with other people's test runs, so the idle "
                 "condition is not strictly idle (see load_at_start / load_at_end)"),
        "conditions": conditions,
        "machine": {"usable_cores": usable_cores(), "cpu_count": os.cpu_count(), "cpu": cpu_name(),
                    "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "cuttlefish_hf": __version__,
                    "torch_parallel_info": torch.__config__.parallel_info().splitlines()[:6]},
    }
    os.makedirs(os.path.dirname(os.path.join(ROOT, args.output)), exist_ok=True)
    with open(os.path.join(ROOT, args.output), "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
    print(json.dumps({name: {key: record[key] for key in ("chosen_threads", "median_epoch_seconds",
                                                          "speedup_chosen_vs_2_threads")}
                      for name, record in conditions.items()}, indent=2))
    return result


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


if __name__ == "__main__":
    main()
