"""Seconds one Cuttlefish switch takes on BERT-base's encoder (72 matrices), by rank rule, on this machine.

The switch as training makes it, at a measurement point that reaches the warm-up bound (``step_end``): the meter
measures, then the switch decides the ranks (a rule that reads spectra takes the singular values of every matrix;
fixed_ratio and kind_fractions take none and report the meter's stable ranks), builds the factors (one truncated
decomposition per layer, ``layers.truncated_svd``) and swaps the layers. Random-init weights, no downloads.

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


# --tiny: a 2-layer, 64-wide BERT, for smoke tests
TINY = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)


def one_switch(rule: str, seed: int, tiny: bool = False) -> dict[str, float]:
    torch.manual_seed(seed)
    model = BertModel(BertConfig(**(TINY if tiny else {})), add_pooling_layer=False)
    config = CuttlefishConfig(rank_rule=rule, init="svd", rank_ratio=0.25, measure_every_steps=50,
                              max_warmup_fraction=0.5, skip_first_blocks=0)
    controller = Cuttlefish(model, config, total_steps=100)
    start = time.perf_counter()
    controller.begin()  # srank(W_0) of every target: the singular values of each
    begin_seconds = time.perf_counter() - start
    start = time.perf_counter()
    result = controller.step_end(50)
    step_end_seconds = time.perf_counter() - start
    assert result is not None and controller.switch_step == 50
    return {"begin_seconds": begin_seconds, "switch_seconds": controller.timings.surgery_seconds,
            "measure_seconds": controller.timings.measure_seconds, "step_end_seconds": step_end_seconds,
            "layers": len(result.report.layers)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", nargs="+", default=["fixed_ratio", "stable_rank"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide BERT instead (smoke tests)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--output", default=str(RESULTS / "switch_cost_bert-base_cpu.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = {rule: [one_switch(rule, seed, args.tiny) for seed in range(args.repeats)] for rule in args.rules}
    summary = {rule: {key: statistics.median(r[key] for r in rows) for key in rows[0]} for rule, rows in runs.items()}
    for rule, row in summary.items():
        print(f"{rule:>20}: switch {row['switch_seconds']:.2f} s (after the measurement's "
              f"{row['measure_seconds']:.2f} s; begin took {row['begin_seconds']:.2f} s), {row['layers']:.0f} "
              "layers factorized")
    record = {"model": f"bert{' (tiny: ' + str(TINY) + ')' if args.tiny else '-base'} encoder (random init), "
                       "rank_ratio 0.25, init svd",
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
