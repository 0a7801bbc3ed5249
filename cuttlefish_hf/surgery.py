"""Model surgery: swap dense layers for factorized ones in place (``factorize_``) and back (``merge_``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .inits import FactorInit, make_init
from .layers import (FactorizedLayer, FactorizedLinear, dense_matrix, dense_shape,
                     factorized_from, factorized_like, is_factorizable)
from .stable_rank import check_finite
from .targeting import shared_weight_error, shared_weights

__all__ = ["LayerReport", "FactorizationReport", "factorize_", "merge_", "factorized_plan", "factorization_report",
           "count_parameters", "register_plan_recorder", "unwrap_compiled"]

# Called with the model after every factorize_ / merge_: the Hub layer registers the function that records the
# plan in a transformers model's config, so that no save_pretrained can leave the plan behind.
_plan_recorders: list[Callable[[nn.Module], None]] = []


def register_plan_recorder(recorder: Callable[[nn.Module], None]) -> None:
    """Have ``recorder(model)`` called after every change of a model's factorized layers (once per function)."""
    if recorder not in _plan_recorders:
        _plan_recorders.append(recorder)


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module inside a ``torch.compile`` wrapper (whose names all start with ``_orig_mod.``), else ``model``."""
    return getattr(model, "_orig_mod", model)


def count_parameters(module: nn.Module) -> int:
    """Number of distinct parameters (shared tensors counted once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


@dataclass
class LayerReport:
    """What happened to one layer."""

    name: str
    shape: tuple[int, ...]
    rank: int
    params_before: int
    params_after: int
    stable_rank: float | None = None


@dataclass
class FactorizationReport:
    """Per-layer results of :func:`factorize_`; ``print(report)`` shows a table with totals."""

    layers: list[LayerReport] = field(default_factory=list)
    model_params_before: int = 0
    model_params_after: int = 0

    @property
    def plan(self) -> dict[str, int]:
        return {layer.name: layer.rank for layer in self.layers}

    @property
    def target_params_before(self) -> int:
        return sum(layer.params_before for layer in self.layers)

    @property
    def target_params_after(self) -> int:
        return sum(layer.params_after for layer in self.layers)

    def to_dict(self) -> dict:
        return {
            "layers": [vars(layer) | {"shape": list(layer.shape)} for layer in self.layers],
            "model_params_before": self.model_params_before,
            "model_params_after": self.model_params_after,
            "target_params_before": self.target_params_before,
            "target_params_after": self.target_params_after,
        }

    @classmethod
    def from_dict(cls, data: dict) -> FactorizationReport:
        layers = [LayerReport(**{**layer, "shape": tuple(layer["shape"])}) for layer in data["layers"]]
        return cls(layers, data["model_params_before"], data["model_params_after"])

    def __str__(self) -> str:
        rows = [("layer", "shape", "stable rank", "rank", "params before", "params after")]
        for layer in self.layers:
            srank = "" if layer.stable_rank is None else f"{layer.stable_rank:.1f}"
            rows.append((layer.name, "x".join(map(str, layer.shape)), srank, str(layer.rank),
                         f"{layer.params_before:,}", f"{layer.params_after:,}"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                           enumerate(zip(row, widths))) for row in rows]
        lines.insert(1, "-" * len(lines[0]))
        ratio = self.model_params_before / max(self.model_params_after, 1)
        lines.append(f"factorized layers: {self.target_params_before:,} -> {self.target_params_after:,} params; "
                     f"model: {self.model_params_before:,} -> {self.model_params_after:,} params ({ratio:.2f}x smaller)")
        return "\n".join(lines)


def _check_plan(model: nn.Module, plan: Mapping[str, int]) -> dict[str, nn.Module]:
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", "cuttlefish")
    if str(getattr(method, "value", method)) != "cuttlefish":
        raise ValueError(f"The model is quantized ({method}); factorize a model loaded without quantization.")
    # Every name of a module registered twice, so that its second name is refused as shared, not unknown.
    modules = dict(model.named_modules(remove_duplicate=False))
    unknown = [name for name in plan if name not in modules]
    if unknown:
        raise ValueError(f"The plan names modules this model does not have: {unknown[:5]}. Was it made for "
                         "another architecture?")
    inside = [name for name in plan if any(isinstance(modules.get(parent), FactorizedLayer)
                                           for parent in _ancestors(name))]
    if inside:
        raise ValueError(f"The plan names layers inside already factorized layers: {inside[:5]}; a layer is "
                         "factorized once (merge_ it first to change its rank).")
    shared = shared_weights(model)
    for name, rank in plan.items():
        module = modules[name]
        if not is_factorizable(module):
            raise ValueError(f"Plan entry {name!r} is a {type(module).__name__}; only nn.Linear, transformers' "
                             "Conv1D and nn.Conv2d can be factorized.")
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            raise ValueError(f"Plan entry {name!r} is a grouped Conv2d (groups={module.groups}), which cannot be "
                             "factorized; leave it out of the plan (e.g. with `exclude_modules`).")
        if name in shared:  # replacing one holder of a shared weight would silently untie the others
            raise shared_weight_error(name, shared)
        full_rank = min(module.weight.shape[0], module.weight[0].numel())
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full_rank:
            raise ValueError(f"Rank {rank!r} for {name!r} does not fit its {dense_shape(module)} weight: "
                             f"it must be an int in [1, {full_rank}].")
    return {name: modules[name] for name in plan}


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


@torch.no_grad()
def factorize_(
    model: nn.Module,
    plan: Mapping[str, int],
    *,
    extra_bn: bool = False,
    init: str | FactorInit = "svd",
    stable_ranks: Mapping[str, float] | None = None,
) -> FactorizationReport:
    """Replace each ``{module name: rank}`` of ``plan`` with its low-rank factorization, in place.

    ``init`` is how the factors start: a name of :data:`cuttlefish_hf.inits.INITS` that needs nothing recorded
    (``"svd"``, the truncated SVD of the dense weight, by default), a function ``(name, matrix, rank) ->
    (first, second)`` such as :func:`cuttlefish_hf.inits.make_init` builds, or ``"empty"``: only the
    architecture, for loading factorized weights into it afterwards.
    The whole plan is checked before any module is touched. A ``torch.compile`` wrapper is looked through
    (plan names with or without ``_orig_mod.``); a transformers model gets the plan recorded in its config, so
    ``model.save_pretrained`` saves it.

    Example:
        >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        >>> report = factorize_(model, {"0": 8})
        >>> report.layers[0].params_after
        1088
    """
    if isinstance(init, str) and init != "empty":
        init = make_init(init)
    if not isinstance(plan, Mapping):
        raise ValueError(f"plan must map module names to ranks, e.g. {{'encoder.layer.0.output.dense': 64}}; got "
                         f"{type(plan).__name__} {plan!r:.80}.")
    if model is not unwrap_compiled(model):
        model = unwrap_compiled(model)
        plan = {name.removeprefix("_orig_mod."): rank for name, rank in plan.items()}
    modules = _check_plan(model, plan)
    if init != "empty":  # before any module is touched; "empty" reads no weights, so NaN ones do not matter
        check_finite({name: module.weight for name, module in modules.items()})
    report = FactorizationReport(model_params_before=count_parameters(model))
    for name, module in modules.items():
        factors = None if init == "empty" else init(name, dense_matrix(module), plan[name])
        new = factorized_like(module, plan[name], extra_bn=extra_bn) if factors is None else \
            factorized_from(module, plan[name], factors, extra_bn=extra_bn)
        _set_submodule(model, name, new)
        report.layers.append(LayerReport(
            name=name, shape=dense_shape(module), rank=plan[name],
            params_before=count_parameters(module), params_after=count_parameters(new),
            stable_rank=None if stable_ranks is None else stable_ranks.get(name)))
    report.model_params_after = count_parameters(model)
    _record_plan(model)
    return report


def _record_plan(model: nn.Module) -> None:
    for recorder in _plan_recorders:
        recorder(model)


def factorized_plan(model: nn.Module) -> dict[str, int]:
    """``{module name: rank}`` of the factorized layers a model holds now."""
    return {name: m.rank for name, m in model.named_modules() if isinstance(m, FactorizedLayer)}


@torch.no_grad()
def merge_(model: nn.Module) -> int:
    """Fold every factorized layer back into the dense layer it replaced; returns how many."""
    model = unwrap_compiled(model)
    factorized = [(name, m) for name, m in model.named_modules() if isinstance(m, FactorizedLayer)]
    # Check everything first so a failure leaves the model untouched rather than half merged.
    with_bn = [name for name, m in factorized if not isinstance(m.middle, nn.Identity)]
    if with_bn:
        raise ValueError(f"Factorized layers with an extra BatchNorm cannot be merged into one dense layer: "
                         f"{with_bn[:5]}.")
    for name, module in factorized:
        dense = module.to_linear() if isinstance(module, FactorizedLinear) else module.to_conv()
        _set_submodule(model, name, dense)
    if factorized:
        _record_plan(model)
    return len(factorized)


def factorization_report(model: nn.Module) -> FactorizationReport:
    """The :class:`FactorizationReport` of the factorized layers a model holds now (without stable ranks)."""
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, FactorizedLayer):
            shape = dense_shape(module)
            bias = module.second.bias
            before = math.prod(shape) + (bias.numel() if bias is not None else 0)
            layers.append(LayerReport(name, shape, module.rank, before, count_parameters(module)))
    after = count_parameters(model)
    before = after + sum(layer.params_before - layer.params_after for layer in layers)
    return FactorizationReport(layers, before, after)
