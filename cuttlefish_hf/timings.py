"""The controller's timings record: seconds spent measuring, recording inputs, switching and profiling, the
training steps' wall intervals before and after the switch, and the verdict on whether the switch paid."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from .surgery import FactorizationReport

__all__ = ["Timings"]


@dataclass
class Timings:
    measure_seconds: float = 0.0     # stable-rank measurements
    statistics_seconds: float = 0.0  # the whitened init's input hooks (host time)
    surgery_seconds: float = 0.0     # the switch, profiling included
    profile_seconds: float = 0.0     # skip_first_blocks="auto" timing the planned layers
    # Wall seconds between consecutive step_end calls, full-rank and low-rank (their medians are reported).
    step_intervals: dict[str, list[float]] = field(default_factory=lambda: {"dense": [], "low_rank": []})

    def step_times(self, report: FactorizationReport | None) -> dict[str, float | None]:
        """Median wall seconds per step before and after the switch (evaluation or checkpoint steps are
        outliers the median ignores), their ratio, and the factorized layers' FLOP-ideal speedup (their dense
        over factorized parameter counts)."""
        dense, low_rank = (statistics.median(v) if v else None for v in self.step_intervals.values())
        return {"dense_step_seconds": dense, "low_rank_step_seconds": low_rank,
                "step_speedup": dense / low_rank if dense and low_rank else None,
                "targeted_flop_ideal_speedup": report.target_params_before / report.target_params_after
                if report and report.target_params_after else None}

    def speed_verdict(self, report: FactorizationReport, *, on_gpu: bool) -> tuple[bool, str] | None:
        """``(faster, message)`` once both phases have 3+ steps, else None; a slower low-rank phase's message
        names the likely causes."""
        times = self.step_times(report)
        if not times["step_speedup"] or min(len(v) for v in self.step_intervals.values()) < 3:
            return None
        speedup, ideal, low_rank = times["step_speedup"], times["targeted_flop_ideal_speedup"], \
            times["low_rank_step_seconds"]
        said = (f"Cuttlefish: low-rank steps take {low_rank * 1e3:.1f} ms against "
                f"{times['dense_step_seconds'] * 1e3:.1f} ms dense (medians): {speedup:.2f}x")
        if speedup >= 1:
            return True, f"{said} faster (FLOP ideal of the factorized layers: {ideal:.2f}x)."
        causes = "; ".join(_slowness_causes(report, low_rank, on_gpu))
        return False, f"{said}, SLOWER than dense (FLOP ideal of the factorized layers: {ideal:.2f}x). " \
                      f"Likely causes: {causes}"

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "step_intervals"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in self.state_dict():
            setattr(self, name, state.get(name, 0.0))  # absent from checkpoints of older versions


def _slowness_causes(report: FactorizationReport, low_rank_seconds: float, on_gpu: bool) -> list[str]:
    causes = []
    if on_gpu and low_rank_seconds < 0.1:
        causes.append("host-bound steps (short GPU steps where kernel launches, not FLOPs, set the time: compile "
                      "the model, e.g. TrainingArguments(torch_compile=True), or use larger batches)")
    fractions = sorted(layer.rank / min(layer.shape[0], math.prod(layer.shape[1:])) for layer in report.layers)
    if fractions[len(fractions) // 2] < 1 / 8:
        causes.append(f"thin ranks (median rank {fractions[len(fractions) // 2]:.2f}x the full rank: products "
                      "this thin run far below the device's peak)")
    unaligned = sum(layer.rank % 8 != 0 for layer in report.layers)
    if 2 * unaligned > len(report.layers):
        causes.append(f"unaligned ranks ({unaligned} of {len(report.layers)} not a multiple of 8: rank_multiple=8 "
                      "rounds them up, which ran factorized layers 1.08x faster on a CPU for 2-3% more parameters)")
    causes.append("too little work per matrix product (small batch x sequence length): skip_first_blocks='auto' "
                  "times each layer and keeps dense the ones factorizing does not speed up")
    return causes
