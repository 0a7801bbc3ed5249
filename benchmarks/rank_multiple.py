"""Does rounding ranks up to a multiple of 8, 16 or 64 pay on this device and dtype? (``rank_multiple``)

A rule picks ranks such as 97 or 193; tensor cores and vectorized CPU kernels may run an aligned rank faster
even though it computes more. For each BERT-base / DeiT-small shape (``layer_speed.SHAPES``) and a few unaligned
ranks ``base + 1, base + 3, base + 5, base + 7`` (``base`` a multiple of 64 near a quarter of full rank), the
factorized layer's forward+backward is timed at the rank and at the rank rounded up to each multiple, with the
library's profiler (medians of paired repeats). A multiple pays when the rounded layer is faster than the
unaligned one: the geometric mean of ``time(rank) / time(rounded)`` above 1.

    python benchmarks/rank_multiple.py                                  # CPU, fp32
    python benchmarks/rank_multiple.py --device cuda --dtype bf16       # a GPU (benchmarks/gpu_check.sh)
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch
from torch import nn

from cuttlefish_hf.profiling import profile_layers
from cuttlefish_hf.rank_rules import round_rank

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layer_speed import DTYPES, SHAPES, machine, write_results  # noqa: E402  (the same shapes as the layer speed grid)

MULTIPLES = (8, 16, 64)
OFFSETS = (1, 3, 5, 7)


def base_rank(m: int, n: int) -> int:
    """A multiple of 64 near a quarter of the full rank."""
    return max(64, 64 * round(min(m, n) / 4 / 64))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--tokens", type=int, default=None, help="rows per batch (default: 2048 CPU, 16384 GPU)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--shapes", type=int, default=len(SHAPES), help="the first N shapes (smoke tests)")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    tokens = args.tokens or (2048 if device.type == "cpu" else 16384)
    shapes = SHAPES[:args.shapes]
    layers = nn.ModuleDict({str(i): nn.Linear(n, m) for i, (_, m, n) in enumerate(shapes)})
    pairs = {(i, multiple): [(base_rank(m, n) + offset, round_rank(base_rank(m, n) + offset, multiple, m, n))
                             for offset in OFFSETS]
             for i, (_, m, n) in enumerate(shapes) for multiple in MULTIPLES}  # (unaligned rank, rounded)
    wanted = dict.fromkeys((str(i), rank) for (i, _), ranks in pairs.items() for pair in ranks for rank in pair)
    factorized_ms = {}
    for layer, rank in wanted:  # one rank per call: profile_layers times each layer once per call
        report = profile_layers(layers, {layer: rank}, tokens_per_batch=tokens, dtype=DTYPES[args.dtype],
                                device=device, repeats=args.repeats, cache={})
        factorized_ms[(layer, rank)] = report.layers[0].factorized_ms
    rows = []
    for (i, multiple), ranks in pairs.items():
        label = shapes[i][0]
        gains = [factorized_ms[(str(i), rank)] / factorized_ms[(str(i), rounded)] for rank, rounded in ranks]
        rows.append({"layer": label, "multiple": multiple, "ranks": [rank for rank, _ in ranks],
                     "rounded": [rounded for _, rounded in ranks],
                     "unaligned_ms": [factorized_ms[(str(i), rank)] for rank, _ in ranks],
                     "rounded_ms": [factorized_ms[(str(i), rounded)] for _, rounded in ranks],
                     "speedup_of_rounding": geometric_mean(gains),
                     "extra_parameters": geometric_mean([rounded / rank for rank, rounded in ranks]) - 1})
    verdict = {multiple: geometric_mean([r["speedup_of_rounding"] for r in rows if r["multiple"] == multiple])
               for multiple in MULTIPLES}
    result = {"device": str(device), "dtype": args.dtype, "tokens": tokens, "rows": rows,
              "speedup_of_rounding": verdict, "pays": [m for m, speedup in verdict.items() if speedup > 1],
              "machine": machine(device),
              "command": "python benchmarks/rank_multiple.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    write_results(args.output or os.path.join(os.path.dirname(__file__), "results",
                                              f"rank_multiple_{device.type}_{args.dtype}.json"), result,
                  markdown(result))
    return result


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(map(math.log, values)) / len(values))


def markdown(result: dict) -> str:
    lines = ["| layer | multiple | ranks -> rounded | unaligned ms | rounded ms | speedup of rounding | extra params |",
             "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        ranks = ", ".join(f"{r}->{q}" for r, q in zip(row["ranks"], row["rounded"]))
        lines.append(f"| {row['layer']} | {row['multiple']} | {ranks} | "
                     f"{' '.join(f'{t:.2f}' for t in row['unaligned_ms'])} | "
                     f"{' '.join(f'{t:.2f}' for t in row['rounded_ms'])} | {row['speedup_of_rounding']:.2f}x | "
                     f"{row['extra_parameters']:+.0%} |")
    verdict = ", ".join(f"{m}: {s:.2f}x" for m, s in result["speedup_of_rounding"].items())
    lines.append(f"\n{result['device']} {result['dtype']}, {result['tokens']} rows: speed-up of rounding up "
                 f"(geometric mean over shapes) {verdict}; pays: {result['pays'] or 'none'}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
