"""Show each candidate layer of a model: shape, stable rank, the rank training would pick, and what it saves.

Example:
    cuttlefish-hf inspect bert-base-uncased --plot bert_ranks.png
    cuttlefish-hf inspect timm:vit_small_patch16_224 --wide --rule energy

By default the ranks are those of the rule training would use (``rank_rule="auto"``: ``kind_fractions`` for
weights that look pretrained, ``scaled_stable_rank`` for a model trained from scratch; the first line says which
and why) and the table fits 120 columns; ``--wide`` adds every rule's rank. A factorized layer is never given a
larger rank than it has.

MODEL is a local folder or Hub id (transformers, or timm when config.json has timm's ``architecture``; factorized
checkpoints saved by cuttlefish_hf included), or ``timm:NAME`` for a timm model built with random weights.
"""

from __future__ import annotations

import argparse
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import CONFIG_RANK_RULES, CuttlefishConfig
from ..controller import Cuttlefish
from ..layers import FactorizedLayer, dense_shape
from ..plotting import short_names
from ..rank_rules import RANK_RULES, break_even_rank, decide_ranks
from ..stable_rank import singular_values, spectrum_stable_rank
from ..surgery import count_parameters
from ..tables import render_table
from ..targeting import find_targets
from .arguments import add_model_arguments, load_model

HELP = "per-layer shape, stable rank, the rank training would pick, parameter and FLOP savings"

# -- the table -------------------------------------------------------------------------------------------------
WIDTH = 120  # the table's width without --wide
TABLE_RULES = tuple(RANK_RULES)  # the rank columns of --wide


@dataclass
class LayerInfo:
    """One candidate layer: its matrix shape, stable rank, current rank and the rank under each rule."""

    name: str
    shape: tuple[int, ...]  # the dense weight's shape
    stable_rank: float
    rank_now: int | None  # the factorized rank, None for a dense layer
    ranks: dict[str, int]  # rule -> rank (never above rank_now)
    factorize: dict[str, bool]  # rule -> factorized at that rank (False: it saves no parameters, stays dense)

    @property
    def matrix(self) -> tuple[int, int]:
        return self.shape[0], math.prod(self.shape[1:])

    @property
    def full_rank(self) -> int:
        return min(self.matrix)

    def params(self, rank: int | None) -> int:
        """Weight parameters dense (``rank=None``) or as factors of ``rank``."""
        m, n = self.matrix
        return m * n if rank is None else rank * (m + n)

    def propose(self, rule: str, rank: int) -> None:
        """Record ``rule``'s rank. A factorized layer keeps at most its current rank: its merged weight has no
        more directions than that, so a larger rank would only add parameters (and it stays factorized)."""
        if self.rank_now is not None:
            rank = min(rank, self.rank_now)
        self.ranks[rule] = rank
        self.factorize[rule] = self.rank_now is not None or rank < break_even_rank(*self.matrix)

    def rank_at(self, rule: str) -> int | None:
        """The layer's rank under ``rule``, None when it is (or stays) dense; ``rule="none"``: as it is now."""
        if rule == "none":
            return self.rank_now
        return self.ranks[rule] if self.factorize[rule] else None


def _dense_weights(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Each layer's dense weight (a factorized layer's merged one)."""
    modules = dict(model.named_modules())
    return {name: modules[name].merged_weight() if isinstance(modules[name], FactorizedLayer) else modules[name].weight
            for name in names}


def inspect_layers(model: nn.Module, *, energy: float = 0.9, ratio: float = 0.25) -> list[LayerInfo]:
    """Exact spectra of every auto-targeted layer (factorized ones read through their merged weight), ranked by
    every rule of :data:`RANK_RULES` (``scaled_stable_rank`` with ``xi_reference="auto"``, ``kind_fractions``
    with the default fractions)."""
    modules = dict(model.named_modules())
    weights = _dense_weights(model, find_targets(model))
    spectra = dict(zip(weights, singular_values(list(weights.values()), normalized=True)))
    stable = {name: spectrum_stable_rank(values) for name, values in spectra.items()}
    infos = {name: LayerInfo(name, dense_shape(modules[name]), stable[name],
                             modules[name].rank if isinstance(modules[name], FactorizedLayer) else None, {}, {})
             for name in weights}
    for rule in RANK_RULES:
        for decision in decide_ranks(weights, rule, init_stable_ranks=stable, energy=energy, ratio=ratio,
                                     spectra=spectra):
            infos[decision.name].propose(rule, decision.rank)
    return list(infos.values())


def training_rule(model: nn.Module, infos: list[LayerInfo], rule: str = "auto", *, energy: float = 0.9,
                  ratio: float = 0.25) -> tuple[str, str]:
    """The rank rule training with ``CuttlefishConfig(rank_rule=rule)`` would use on ``model``, and why.

    The controller decides (``"auto"``: ``kind_fractions`` when the weights look pretrained, else
    ``scaled_stable_rank``) and its ranks become that rule's in ``infos``. ``"none"``: the model is already
    factorized, and training keeps its ranks.
    """
    controller = Cuttlefish(model, CuttlefishConfig(rank_rule=rule, energy_threshold=energy, rank_ratio=ratio))
    if controller.factorized_before_training:
        return "none", controller.rank_rule_reason
    # The exact srank(W_0) that inspect_layers just computed: spares the controller a second pass of SVDs.
    controller.init_stable_ranks = {info.name: info.stable_rank for info in infos}
    by_name = {info.name: info for info in infos}
    for decision in controller.decide():  # ranks need no input statistics (the whitened factors would)
        by_name[decision.name].propose(controller.rank_rule, decision.rank)
    return controller.rank_rule, controller.rank_rule_reason


def format_table(infos: list[LayerInfo], model: nn.Module, rule: str, *, wide: bool = False) -> str:
    """One row per layer and a summary, ``rule``'s ranks in the ``rank`` and ``params at rank`` columns.

    It fits :data:`WIDTH` columns: layer names without their common prefix (cut in the middle if still too long),
    one rank column. ``wide=True``: full names, every rule's rank, parameters dense and FLOPs saved.
    """
    rules = [r for r in TABLE_RULES if r in infos[0].ranks] if wide else []
    names = {info.name: info.name for info in infos} if wide else short_names([info.name for info in infos])
    header = ("layer", "shape", "stable rank", "full", "now", *rules, "rank", *(("params dense",) if wide else ()),
              "params now", "params at rank", *(("FLOPs/token saved",) if wide else ()))

    def rank_cell(info: LayerInfo, rule: str) -> str:
        if rule == "none":
            return "dense" if info.rank_now is None else str(info.rank_now)
        return f"{info.ranks[rule]}{'' if info.factorize[rule] else '*'}"

    rows = []
    for info in infos:
        dense, at = info.params(None), info.params(info.rank_at(rule))
        rows.append((names[info.name], "x".join(map(str, info.shape)), f"{info.stable_rank:.1f}", str(info.full_rank),
                     rank_cell(info, "none"), *(rank_cell(info, r) for r in rules), rank_cell(info, rule),
                     *((f"{dense:,}",) if wide else ()), f"{info.params(info.rank_now):,}", f"{at:,}",
                     *((f"{2 * (dense - at):,}",) if wide else ())))
    table = render_table(header, rows, max_width=None if wide else WIDTH)  # too wide: names are cut in the middle

    now_total = sum(info.params(info.rank_now) for info in infos)
    at_total = sum(info.params(info.rank_at(rule)) for info in infos)
    dense_total = sum(info.params(None) for info in infos)
    model_now = count_parameters(model)  # a factorized model holds fewer than dense_total in its targets
    notes = []
    if not wide:
        prefix = infos[0].name[: len(infos[0].name) - len(names[infos[0].name])]
        notes.append((f"Layer names without their common prefix {prefix!r}; --wide" if prefix else "--wide") +
                     " shows full names, every rule's rank, parameters dense and FLOPs saved.")
    if any(not info.factorize[r] for info in infos for r in {*rules, rule} - {"none"}):
        notes.append("* this rank saves no parameters (rank >= m*n/(m+n)): the layer stays dense.")
    factorized = sum(info.rank_at(rule) is not None for info in infos)
    notes.append(f"{len(infos)} layers, {factorized} factorized at these ranks: {now_total:,} weight parameters now "
                 f"-> {at_total:,} ({dense_total:,} dense); model {model_now:,} -> {model_now - now_total + at_total:,}.")
    notes.append(f"FLOPs per token saved against dense: {2 * (dense_total - at_total):,} (forward: 2 x multiply-adds "
                 "per Linear input row or conv output position).")
    return "\n".join([table, *(textwrap.fill(note, WIDTH) for note in notes)])


def rule_line(rule: str, reason: str, requested: str) -> str:
    """The sentence above the table: which rule gives the ranks, and why."""
    if rule == "none":
        text = (f"Ranks as training would keep them: {reason} (no second switch; dense layers stay dense). "
                "--rule RULE shows a rule's ranks, never above a current rank.")
    elif requested == "auto":
        text = f"Ranks by the {rule} rule, the one training would use: {reason}; --rule picks another."
    else:
        text = f"Ranks by the {rule} rule (--rule {rule})."
        if reason.startswith("the model was already factorized"):
            text += (" A factorized layer never gets more than its current rank here; training would keep this model "
                     "as it is (no second switch).")
    if rule == "scaled_stable_rank" and requested == "auto":
        text += (" On the weights at train begin it gives about the full rank: at the switch it follows the stable "
                 "ranks reached by then.")
    if rule == "kind_fractions":
        text += (" This rule keeps a share of each layer's parameters by kind (CuttlefishConfig.kind_fractions); "
                 "for pretrained weights training starts the factors from input statistics (init='whitened').")
    return textwrap.fill(text, WIDTH)


def plot_layers(infos: list[LayerInfo], path: str | Path) -> Path:
    """PNG of stable rank / full rank per layer, with each rule's rank / full rank."""
    from matplotlib.figure import Figure

    index = range(len(infos))
    figure = Figure(figsize=(max(6.0, 0.25 * len(infos)), 4.5), layout="constrained")
    axis = figure.add_subplot()
    axis.bar(index, [i.stable_rank / i.full_rank for i in infos], color="lightgray", label="stable rank")
    for rule, marker in zip(TABLE_RULES, "ovsd^"):
        if rule in infos[0].ranks:
            axis.plot(index, [i.ranks[rule] / i.full_rank for i in infos], marker, markersize=4, label=rule)
    axis.set_xticks(list(index), list(short_names([i.name for i in infos]).values()), rotation=90, fontsize=5)
    axis.set_ylabel("/ full rank")
    axis.set_ylim(0, 1.05)
    axis.set_title("Stable rank and chosen rank per layer")
    axis.legend(fontsize=7)
    figure.savefig(path, dpi=120)
    return Path(path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--rule", choices=CONFIG_RANK_RULES, default="auto", help=(
        "the rule whose ranks give the rank and parameter columns (default: auto, the rule training would use: "
        "kind_fractions for pretrained-looking weights, else scaled_stable_rank)"))
    parser.add_argument("--wide", action="store_true", help=(
        "every column: full layer names, each rule's rank, parameters dense, FLOPs saved (default: fit 120 "
        "columns)"))
    parser.add_argument("--energy", type=float, default=0.9, help="energy rule's threshold (default: 0.9)")
    parser.add_argument("--rank-ratio", type=float, default=0.25, help="fixed_ratio rule's ratio (default: 0.25)")
    parser.add_argument("--plot", metavar="PATH", help="also write a PNG of stable rank / full rank per layer")


def run(args: argparse.Namespace) -> int:
    if not 0 < args.energy <= 1 or not 0 < args.rank_ratio <= 1:
        raise ValueError(f"--energy and --rank-ratio must be in (0, 1], got {args.energy} and {args.rank_ratio}.")
    model = load_model(args.model, args.model_kwargs)
    infos = inspect_layers(model, energy=args.energy, ratio=args.rank_ratio)
    requested = CuttlefishConfig(rank_rule=args.rule).rank_rule  # 0.1's "activation_aware" is "kind_fractions"
    rule, reason = training_rule(model, infos, requested, energy=args.energy, ratio=args.rank_ratio)
    if rule == "none" and requested != "auto":  # a factorized model: the requested rule's ranks, capped
        rule = requested
    print(rule_line(rule, reason, args.rule))
    print(format_table(infos, model, rule, wide=args.wide))
    if args.plot:
        print(f"wrote {plot_layers(infos, args.plot)}")
    return 0
