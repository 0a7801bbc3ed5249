"""Stable-rank curves with the switch marked."""

from __future__ import annotations

import os

__all__ = ["plot_stable_ranks"]


def plot_stable_ranks(history: dict[str, list[float]], steps: list[int], path: str | os.PathLike,
                      switch_step: int | None = None, full_ranks: dict[str, int] | None = None,
                      title: str = "Stable rank during full-rank warm-up") -> str:
    """Write a PNG of each layer's stable rank (relative to its full rank when given) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5))
    for name, values in history.items():
        scale = full_ranks[name] if full_ranks else 1
        axis.plot(steps[: len(values)], [v / scale for v in values], linewidth=1, alpha=0.8,
                  label=name if len(history) <= 12 else None)
    if switch_step is not None:
        axis.axvline(switch_step, color="black", linestyle="--", linewidth=1.5, label=f"switch (step {switch_step})")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("stable rank / full rank" if full_ranks else "stable rank")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=6, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return str(path)
