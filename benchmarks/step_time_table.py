"""Collect every ``benchmarks/results/step_time_*.json`` into one markdown table (``step_time.md``).

    python benchmarks/step_time_table.py
"""

from __future__ import annotations

import glob
import json
import os

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def row(result: dict) -> str:
    machine = result["machine"]
    device = machine.get("gpu") or f"CPU ({machine['cpu_cores']} cores)"
    profile = result.get("step_profile") or result.get("kernel_profile", {})  # the name before CPU profiles

    def per_step(key: str, digits: int) -> str:
        return " / ".join(f"{profile[k][key]:.{digits}f}" for k in ("dense", "low_rank")
                          if key in profile.get(k, {})) or "-"

    def optional(key: str, form: str) -> str:
        return form.format(result[key]) if key in result else "-"

    mode = "compiled" if result.get("compiled") else "eager"
    return (f"| {result['model']} | {device} | {result['dtype']} | {mode} | {result['batch_size']} "
            f"({result['tokens_per_batch']:,} tokens) | {1000 * result['dense_step_s']:.1f} | "
            f"{1000 * result['low_rank_step_s']:.1f} | {result['step_speedup']:.2f}x | "
            f"{result['targeted_layers_flop_ideal_speedup']:.2f}x | "
            f"{result['step_speedup'] / result['targeted_layers_flop_ideal_speedup']:.2f} | "
            f"{optional('matmul_fraction_of_ideal', '{:.2f}')} | {optional('rest_speedup', '{:.2f}x')} | "
            f"{per_step('device_busy_ms_per_step', 1)} | {per_step('kernels_per_step', 0)} | "
            f"{result['measurement_overhead_pct']:.1f}% |")


def main() -> str:
    lines = ["| model | device | dtype | mode | batch | dense step ms | low-rank step ms | speedup | FLOP-ideal "
             "(targeted layers) | measured / ideal | matrix products' speedup / ideal | rest of the step's "
             "speedup | device busy ms dense / low-rank | kernels per step dense / low-rank | measuring % of "
             "run |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    paths = sorted(glob.glob(os.path.join(RESULTS, "step_time_*.json")))
    lines += [row(json.load(open(path, encoding="utf-8"))) for path in paths]
    table = "\n".join(lines)
    with open(os.path.join(RESULTS, "step_time.md"), "w", encoding="utf-8") as handle:
        handle.write(table + "\n")
    print(table)
    return table


if __name__ == "__main__":
    main()
