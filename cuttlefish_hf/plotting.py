"""Stable rank during the full-rank warm-up: per layer (a heatmap) and per kind of layer (curves), switch marked.

Example:
    >>> plot_stable_ranks(controller.tracker.history, controller.measured_steps, "stable_ranks.png",
    ...                   controller.switch_step, controller.full_ranks)
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from .targeting import layer_kind

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["KIND_COLOURS", "plot_kind", "plot_stable_ranks", "short_names", "stable_rank_figure"]

logger = logging.getLogger(__name__)

KIND_COLOURS = {"attention": "tab:blue", "FFN": "tab:orange", "conv": "tab:green", "other": "tab:gray"}
_MAX_FONT, _MIN_FONT = 9.0, 6.0  # y tick labels: 9 pt up to ~18 layers, 6 pt from ~28 on (150 layers stay legible)


def plot_kind(name: str) -> str:
    """The kind a layer is drawn as: ``"attention"``, ``"FFN"`` (``layer_kind``'s names), ``"conv"`` for a name
    with a ``conv`` component (ResNet's ``layer1.0.conv1``), else ``"other"``."""
    kind = layer_kind(name)
    if kind != "other":
        return "FFN" if kind == "ffn" else kind
    return "conv" if any("conv" in part for part in name.lower().split(".")) else "other"


def short_names(names: Sequence[str]) -> dict[str, str]:
    """``{name: name without the dotted prefix all names share}``: ``bert.encoder.layer.0.attention.self.query``
    becomes ``0.attention.self.query``. Each keeps at least its last component; a single name stays whole."""
    parts = [name.split(".") for name in names]
    common = 0
    if len(parts) > 1:
        for components in zip(*parts):
            if len(set(components)) > 1:
                break
            common += 1
    common = min([common, *(len(p) - 1 for p in parts)])
    return {name: ".".join(p[common:]) for name, p in zip(names, parts)}


def _font_size(layers: int) -> float:
    return max(_MIN_FONT, min(_MAX_FONT, 165 / max(layers, 1)))


def _relative(history: Mapping[str, Sequence[float]], count: int,
              full_ranks: Mapping[str, int] | None) -> dict[str, list[float]]:
    """Each layer's first ``count`` values (divided by its full rank when given), NaN where it has none."""
    return {name: [v / (full_ranks[name] if full_ranks else 1) for v in values[:count]]
            + [math.nan] * (count - len(values[:count])) for name, values in history.items()}


def stable_rank_figure(history: Mapping[str, Sequence[float]], steps: Sequence[int], switch_step: int | None = None,
                       full_ranks: Mapping[str, int] | None = None,
                       title: str = "Stable rank during full-rank warm-up") -> Figure:
    """A matplotlib ``Figure`` of ``history`` (``{layer: stable rank at each of steps}``).

    Two measurements or more: a heatmap (axes labelled ``"heatmap"``: one row per layer, named without their
    common prefix and coloured by kind, one column per measurement, colorbar) above the curves (``"curves"``: one
    thin line per layer and a bold mean per kind, one colour per kind); a dashed line marks ``switch_step`` in
    both. One measurement: bars per layer (``"bars"``). None: a figure that says so (``"empty"``).
    Values are relative to ``full_ranks`` when given. No pyplot: nothing global changes (safe in notebooks).
    """
    from matplotlib.figure import Figure  # matplotlib loads only when a figure is drawn

    count = min(len(steps), max((len(v) for v in history.values()), default=0))
    values = _relative(history, count, full_ranks)
    what = "stable rank / full rank" if full_ranks else "stable rank"
    switch = "" if switch_step is None else f"switch at step {switch_step}"
    if count == 0 or not history:
        figure = Figure(figsize=(7, 2.2), layout="constrained")
        axis = figure.add_subplot(label="empty")
        axis.set_axis_off()
        axis.text(0.5, 0.5, "No stable-rank measurements" + (f": {switch}, before the first one" if switch else
                  " (none taken yet)"), ha="center", va="center", fontsize=11)
        figure.suptitle(title)
        return figure
    names = list(values)
    labels = short_names(names)
    kinds = {name: plot_kind(name) for name in names}
    font = _font_size(len(names))
    rows_height = len(names) * font * 1.7 / 72  # inches: a row is a little taller than its label
    if count == 1:
        figure = Figure(figsize=(9, max(3.0, rows_height + 1.6)), layout="constrained")
        axis = figure.add_subplot(label="bars")
        _bars(axis, names, labels, kinds, [values[n][0] for n in names], font)
        axis.set_xlabel(what)
        axis.set_title(f"One measurement, at step {steps[0]}" + (f"; {switch}" if switch else ""), fontsize=10)
    else:
        heat_height = max(2.5, rows_height)
        figure = Figure(figsize=(10, heat_height + 5.2), layout="constrained")
        heat, curves = figure.subplots(2, 1, height_ratios=[heat_height, 4.0])
        heat.set_label("heatmap")
        curves.set_label("curves")
        _heatmap(figure, heat, names, labels, kinds, values, list(steps[:count]), what, font)
        _curves(curves, names, kinds, values, list(steps[:count]), what)
        for axis in (heat, curves):
            if switch_step is not None:
                axis.axvline(switch_step, color="black", linestyle="--", linewidth=1.5,
                             label=f"switch (step {switch_step})")
            axis.set_xlabel("optimizer step")
        curves.legend(fontsize=8, loc="best")
        right = max(steps[count - 1], switch_step if switch_step is not None else -math.inf)
        pad = 0.02 * (right - heat.get_xlim()[0])
        for axis in (heat, curves):
            axis.set_xlim(heat.get_xlim()[0], right + pad)
    figure.suptitle(title)
    return figure


def _tick_labels(axis, names: list[str], labels: dict[str, str], kinds: dict[str, str], font: float) -> None:
    axis.set_yticks(range(len(names)), [labels[n] for n in names], fontsize=font)
    for tick, name in zip(axis.get_yticklabels(), names):
        tick.set_color(KIND_COLOURS[kinds[name]])  # the heatmap's rows in the colours of the curves below
    axis.set_ylim(len(names) - 0.5, -0.5)  # the first layer on top


def _kind_legend(axis, kinds: dict[str, str], **extra) -> None:
    from matplotlib.patches import Patch

    present = [k for k in KIND_COLOURS if k in kinds.values()]
    counts = {k: sum(1 for v in kinds.values() if v == k) for k in present}
    handles = [Patch(color=KIND_COLOURS[k], label=f"{k} ({counts[k]})") for k in present]
    axis.legend(handles=handles, fontsize=8, **extra)


def _bars(axis, names, labels, kinds, values, font) -> None:
    axis.barh(range(len(names)), values, color=[KIND_COLOURS[kinds[n]] for n in names], height=0.8)
    _tick_labels(axis, names, labels, kinds, font)
    axis.grid(axis="x", alpha=0.3)
    _kind_legend(axis, kinds, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: bars fill the axes


def _heatmap(figure, axis, names, labels, kinds, values, steps, what, font) -> None:
    # Column i covers the training between measurements i-1 and i: the last column ends at the last measurement.
    edges = [2 * steps[0] - steps[1], *steps]
    image = axis.pcolormesh(edges, [i - 0.5 for i in range(len(names) + 1)], [values[n] for n in names],
                            cmap="viridis", vmin=0)
    # On top, not beside: the heatmap keeps the width of the curves below, so their step axes line up.
    figure.colorbar(image, ax=axis, label=f"{what}  (a row per layer, names coloured by kind; a column per "
                    "measurement)", location="top", fraction=0.05, aspect=40, pad=0.01)
    _tick_labels(axis, names, labels, kinds, font)
    # A white line between repeated blocks (where the leading name component changes) groups each block's rows.
    blocks = [labels[n].split(".")[0] for n in names]
    if 1 < len(set(blocks)) < len(names):
        for row in range(1, len(names)):
            if blocks[row] != blocks[row - 1]:
                axis.axhline(row - 0.5, color="white", linewidth=0.6)


def _curves(axis, names, kinds, values, steps, what) -> None:
    for kind, colour in KIND_COLOURS.items():
        members = [n for n in names if kinds[n] == kind]
        if not members:
            continue
        for name in members:
            axis.plot(steps, values[name], color=colour, linewidth=0.7, alpha=0.3)
        mean = [math.fsum(values[n][i] for n in members) / len(members) for i in range(len(steps))]
        axis.plot(steps, mean, color=colour, linewidth=2.6, marker="o", markersize=3,
                  label=f"{kind}: mean of {len(members)} layers")
    axis.set_ylabel(what)
    axis.set_ylim(bottom=0)
    axis.grid(alpha=0.3)
    axis.set_title("by kind: thin lines one layer each, bold the kind's mean", fontsize=10)


def plot_stable_ranks(history: Mapping[str, Sequence[float]], steps: Sequence[int], path: str | os.PathLike,
                      switch_step: int | None = None, full_ranks: Mapping[str, int] | None = None,
                      title: str = "Stable rank during full-rank warm-up") -> str:
    """Write :func:`stable_rank_figure` as a PNG at ``path`` (always: with no measurement it says so); returns
    ``path``."""
    figure = stable_rank_figure(history, steps, switch_step, full_ranks, title)
    figure.savefig(path, dpi=120)
    if not any(history.values()):
        logger.info("No stable-rank measurements to plot; %s says so.", path)
    return str(path)
