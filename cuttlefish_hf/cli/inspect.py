"""Show each candidate layer of a model: shape, stable rank, the rank every rule would pick, and what it saves.

Example:
    cuttlefish-hf inspect bert-base-uncased --plot bert_ranks.png
    cuttlefish-hf inspect timm:vit_small_patch16_224

MODEL is a local folder or Hub id (transformers, or timm when config.json has timm's ``architecture``; factorized
checkpoints saved by cuttlefish_hf included), or ``timm:NAME`` for a timm model built with random weights.
This module also holds the model loading the other subcommands share.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import transformers
from torch import nn

from .. import hub
from ..layers import FactorizedLayer, dense_shape
from ..rank_rules import RANK_RULES, break_even_rank, rank_from_singular_values, xi_for
from ..stable_rank import singular_values
from ..surgery import count_parameters
from ..targeting import find_targets

HELP = "per-layer shape, stable rank, rank under each rule, parameter and FLOP savings"

_HUB_ID = re.compile(r"(hf-hub:)?\w[\w.-]*(/\w[\w.-]*)?")


# -- loading MODEL (shared with the profile and merge subcommands) ------------------------------------------------
def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"depth\": 2}}', got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser, name: str = "model") -> None:
    parser.add_argument(name, metavar=name.upper(), help=(
        "a local folder or Hub id (transformers, or timm when its config.json has 'architecture'), or timm:NAME "
        "for a timm model with random weights (offline)"))
    parser.add_argument("--model-kwargs", type=_json_object, default=None, metavar="JSON", help=(
        "keyword arguments for timm.create_model with timm:NAME, e.g. '{\"depth\": 2, \"img_size\": 64}'"))


def _config_json(spec: str) -> dict[str, Any]:
    """config.json of a local folder, or fetched from the Hub."""
    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{spec} has no config.json, so it is not a saved transformers or timm model.")
        return json.loads((path / "config.json").read_text(encoding="utf-8"))
    if path.exists() or not _HUB_ID.fullmatch(spec):
        raise ValueError(f"{spec}: no such folder (and not a Hub id such as 'owner/name'); pass a model folder, a "
                         "Hub id or timm:NAME.")
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(spec.removeprefix("hf-hub:"), "config.json")).read_text())
    except Exception as error:  # offline, unknown repository, no access: all end the same way for the user
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{spec} is not a local folder and its config.json could not be fetched from the Hub "
                         f"({first_line}); pass a model folder or timm:NAME.") from None


def load_model(spec: str, model_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """A transformers or timm model (factorized checkpoints restored) from a folder, Hub id or ``timm:NAME``."""
    if spec.startswith("timm:"):
        import timm

        name = spec.removeprefix("timm:")
        if not timm.is_model(name):
            raise ValueError(f"timm has no model {name!r}; list them with timm.list_models('*{name[:4]}*').")
        try:
            return timm.create_model(name, pretrained=False, **(model_kwargs or {}))
        except TypeError as error:
            raise ValueError(f"--model-kwargs do not fit timm model {name!r}: {error}") from None
    if model_kwargs:
        raise ValueError("--model-kwargs only applies to timm:NAME models.")
    config = _config_json(spec)
    try:
        if "architecture" in config:  # timm's layout
            return hub.load_timm(spec)
        architectures = config.get("architectures") or []
        model_class = getattr(transformers, architectures[0], None) if architectures else None
        return hub.from_pretrained(model_class or transformers.AutoModel, spec)
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise ValueError(f"could not load {spec}: {error}") from None


# -- the table -------------------------------------------------------------------------------------------------
@dataclass
class LayerInfo:
    """One candidate layer: its matrix shape, stable rank, current rank and the rank under each rule."""

    name: str
    shape: tuple[int, ...]  # the dense weight's shape
    stable_rank: float
    rank_now: int | None  # the factorized rank, None for a dense layer
    ranks: dict[str, int]  # rule -> rank
    factorize: dict[str, bool]  # rule -> does that rank save parameters

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


def inspect_layers(model: nn.Module, *, energy: float = 0.9, ratio: float = 0.25) -> list[LayerInfo]:
    """Exact spectra of every auto-targeted layer (factorized ones read through their merged weight), ranked by
    every rule of :data:`RANK_RULES` (``scaled_stable_rank`` with ``xi_reference="auto"``)."""
    modules = dict(model.named_modules())
    names = find_targets(model)
    weights = [modules[n].merged_weight() if isinstance(modules[n], FactorizedLayer) else modules[n].weight
               for n in names]
    infos = []
    for name, weight, values in zip(names, weights, singular_values(weights)):
        values = values.cpu()
        matrix = (weight.shape[0], weight[0].numel())
        squares = values.double().square()
        srank = float(squares.sum() / squares[0].clamp_min(1e-300))
        xi, _ = xi_for(matrix, srank, "auto")
        ranks = {rule: rank_from_singular_values(values, rule, xi=xi, energy=energy, ratio=ratio)
                 for rule in RANK_RULES}
        module = modules[name]
        infos.append(LayerInfo(name, dense_shape(module), srank,
                               module.rank if isinstance(module, FactorizedLayer) else None, ranks,
                               {rule: rank < break_even_rank(*matrix) for rule, rank in ranks.items()}))
    return infos


def format_table(infos: list[LayerInfo], model: nn.Module, rule: str) -> str:
    rows = [("layer", "shape", "stable rank", "full", "now", *RANK_RULES, "params dense", f"params at {rule}",
             "FLOPs/token saved")]
    saved_params = saved_flops = 0
    for info in infos:
        rank = info.ranks[rule] if info.factorize[rule] else None
        dense, low = info.params(None), info.params(rank)
        saved_params, saved_flops = saved_params + dense - low, saved_flops + 2 * (dense - low)
        rows.append((info.name, "x".join(map(str, info.shape)), f"{info.stable_rank:.1f}", str(info.full_rank),
                     "dense" if info.rank_now is None else str(info.rank_now),
                     *(f"{info.ranks[r]}{'' if info.factorize[r] else '*'}" for r in RANK_RULES),
                     f"{dense:,}", f"{low:,}", f"{2 * (dense - low):,}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    dense_total = sum(info.params(None) for info in infos)
    factorized = sum(info.factorize[rule] for info in infos)
    model_now = count_parameters(model)  # a factorized model holds fewer than dense_total in its targets
    model_at_rule = model_now - sum(info.params(info.rank_now) for info in infos) + dense_total - saved_params
    lines += [
        "* this rank saves no parameters (rank >= m*n/(m+n)): the layer stays dense",
        "FLOPs per token: 2 x multiply-adds per input row (Linear) or output position (conv), forward only",
        f"{len(infos)} layers, {factorized} factorized at the {rule} ranks: {dense_total:,} -> "
        f"{dense_total - saved_params:,} weight parameters (dense -> {rule}); model now {model_now:,}, at the "
        f"{rule} ranks {model_at_rule:,}; {saved_flops:,} FLOPs per token saved against dense",
    ]
    return "\n".join(lines)


def plot_layers(infos: list[LayerInfo], path: str | Path) -> Path:
    """PNG of stable rank / full rank per layer, with each rule's rank / full rank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = range(len(infos))
    figure, axis = plt.subplots(figsize=(max(6.0, 0.25 * len(infos)), 4.5))
    axis.bar(index, [i.stable_rank / i.full_rank for i in infos], color="lightgray", label="stable rank")
    for rule, marker in zip(RANK_RULES, "ovsd"):
        axis.plot(index, [i.ranks[rule] / i.full_rank for i in infos], marker, markersize=4, label=rule)
    axis.set_xticks(list(index), [i.name for i in infos], rotation=90, fontsize=5)
    axis.set_ylabel("/ full rank")
    axis.set_ylim(0, 1.05)
    axis.set_title("Stable rank and chosen rank per layer")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--rule", choices=RANK_RULES, default="scaled_stable_rank",
                        help="the rule whose ranks give the parameter and FLOP columns (default: scaled_stable_rank)")
    parser.add_argument("--energy", type=float, default=0.9, help="energy rule's threshold (default: 0.9)")
    parser.add_argument("--rank-ratio", type=float, default=0.25, help="fixed_ratio rule's ratio (default: 0.25)")
    parser.add_argument("--plot", metavar="PATH", help="also write a PNG of stable rank / full rank per layer")


def run(args: argparse.Namespace) -> int:
    if not 0 < args.energy <= 1 or not 0 < args.rank_ratio <= 1:
        raise ValueError(f"--energy and --rank-ratio must be in (0, 1], got {args.energy} and {args.rank_ratio}.")
    model = load_model(args.model, args.model_kwargs)
    infos = inspect_layers(model, energy=args.energy, ratio=args.rank_ratio)
    print(format_table(infos, model, args.rule))
    if args.plot:
        print(f"wrote {plot_layers(infos, args.plot)}")
    return 0
