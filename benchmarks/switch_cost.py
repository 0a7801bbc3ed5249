"""Seconds one Cuttlefish switch takes on BERT-base's encoder (72 matrices), by rank rule, on this machine.

The switch at a measurement point (the meter just ran, as in training): deciding the ranks (a rule that reads
spectra takes an exact SVD of every matrix; fixed_ratio and kind_fractions take none), then building the factors
(one truncated decomposition per layer) and swapping the layers. Random-init weights, no downloads.

    python benchmarks/switch_cost.py                       # fixed_ratio 1/4 (the #14 target) and stable_rank
    python benchmarks/switch_cost.py --rules fixed_ratio --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import BertConfig, BertModel

from cuttlefish_hf import Cuttlefish, CuttlefishConfig

RESULTS = Path(__file__).resolve().parent / "results"


def one_switch(rule: str, seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    model = BertModel(BertConfig(), add_pooling_layer=False)
    controller = Cuttlefish(model, CuttlefishConfig(rank_rule=rule, init="svd", rank_ratio=0.25), total_steps=100)
    controller.begin()
    controller.measure()  # a measurement point: the meter's vectors are warm, as at a switch in training
    measured = controller.timings.measure_seconds
    start = time.perf_counter()
    decisions = controller.decide()
    decide_seconds = time.perf_counter() - start
    start = time.perf_counter()
    result = controller.switch(step=50)
    switch_seconds = time.perf_counter() - start
    return {"decide_seconds": decide_seconds, "switch_seconds": switch_seconds,
            "factorize_seconds": switch_seconds - decide_seconds, "measure_seconds_before": measured,
            "layers": len(result.report.layers), "decided_layers": len(decisions)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", nargs="+", default=["fixed_ratio", "stable_rank"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--output", default=str(RESULTS / "switch_cost_bert-base_cpu.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = {rule: [one_switch(rule, seed) for seed in range(args.repeats)] for rule in args.rules}
    summary = {rule: {key: statistics.median(r[key] for r in rows) for key in rows[0]} for rule, rows in runs.items()}
    for rule, row in summary.items():
        print(f"{rule:>20}: switch {row['switch_seconds']:.2f} s (deciding {row['decide_seconds']:.2f} s, "
              f"factors and swap {row['factorize_seconds']:.2f} s), {row['layers']:.0f} layers factorized")
    record = {"model": "bert-base encoder (BertConfig() defaults, random init), rank_ratio 0.25, init svd",
              "median_of": args.repeats, "summary": summary, "runs": runs,
              "command": "python benchmarks/switch_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "load_average": os.getloadavg()},
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__}}
    Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {os.path.relpath(args.output)}")
    return record


if __name__ == "__main__":
    main()
