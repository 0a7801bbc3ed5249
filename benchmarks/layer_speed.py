"""Dense vs factorized Linear forward+backward over BERT-base and DeiT-small shapes, against the FLOP ideal.

Times each shape dense and at ranks 1/8, 1/4 and 1/2 of full rank with the library's own profiler
(``cuttlefish_hf.profiling``: warm-up, medians, CUDA-synchronized), side by side in one process, and reports the
measured speedup divided by the FLOP-ideal one, ``m*n / (r*(m+n))``.

    python benchmarks/layer_speed.py                                # CPU, fp32
    python benchmarks/layer_speed.py --device cuda --dtype bf16     # a GPU (benchmarks/gpu_check.sh)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform

import torch
from torch import nn

from cuttlefish_hf.profiling import profile_layers

# (name, out_features, in_features): attention and FFN matrices of BERT-base (768) and DeiT-small (384).
SHAPES = [
    ("bert-base attn 768x768", 768, 768),
    ("bert-base ffn-in 3072x768", 3072, 768),
    ("bert-base ffn-out 768x3072", 768, 3072),
    ("deit-small qkv 1152x384", 1152, 384),
    ("deit-small proj 384x384", 384, 384),
    ("deit-small fc1 1536x384", 1536, 384),
    ("deit-small fc2 384x1536", 384, 1536),
]
RANK_FRACTIONS = (0.125, 0.25, 0.5)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--tokens", type=int, default=None, help="rows per batch (default: 2048 CPU, 16384 GPU)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    tokens = args.tokens or (2048 if device.type == "cpu" else 16384)
    layers = nn.ModuleDict({str(i): nn.Linear(n, m) for i, (_, m, n) in enumerate(SHAPES)})
    rows = []
    for fraction in RANK_FRACTIONS:
        ranks = {str(i): max(1, round(fraction * min(m, n))) for i, (_, m, n) in enumerate(SHAPES)}
        report = profile_layers(layers, ranks, tokens_per_batch=tokens, dtype=DTYPES[args.dtype], device=device,
                                repeats=args.repeats, cache={})
        for timing, (label, m, n) in zip(report.layers, SHAPES):
            ideal = m * n / (timing.rank * (m + n))
            rows.append({"layer": label, "out": m, "in": n, "rank": timing.rank, "rank_fraction": fraction,
                         "tokens": tokens, "dense_ms": timing.dense_ms, "factorized_ms": timing.factorized_ms,
                         "speedup": timing.speedup, "flop_ideal_speedup": ideal,
                         "fraction_of_ideal": timing.speedup / ideal})
    result = {"device": str(device), "dtype": args.dtype, "rows": rows, "machine": machine(device)}
    write_results(args.output or os.path.join(os.path.dirname(__file__), "results",
                                              f"layer_speed_{device.type}_{args.dtype}.json"), result, markdown(rows))
    return rows


def write_results(output: str, result: dict, table: str) -> None:
    """The JSON at ``output``, the markdown table beside it (``.md``), and the table printed."""
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
    with open(output.removesuffix(".json") + ".md", "w", encoding="utf-8") as handle:
        handle.write(table + "\n")
    print(table)


def markdown(rows: list[dict]) -> str:
    lines = ["| layer | rank | dense ms | factorized ms | speedup | FLOP-ideal | measured / ideal |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['layer']} | {row['rank']} | {row['dense_ms']:.2f} | {row['factorized_ms']:.2f} | "
                     f"{row['speedup']:.2f}x | {row['flop_ideal_speedup']:.2f}x | {row['fraction_of_ideal']:.2f} |")
    ratios = [row["fraction_of_ideal"] for row in rows]
    lines.append(f"\nGeometric mean of measured / ideal: {math.exp(sum(map(math.log, ratios)) / len(ratios)):.2f}")
    return "\n".join(lines)


def machine(device: torch.device) -> dict:
    info = {"cpu_cores": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


if __name__ == "__main__":
    main()
