"""Choose which ``nn.Linear`` / ``Conv1D`` / ``nn.Conv2d`` modules of a model get factorized.

``target_modules="auto"`` is a structural rule that does not depend on any one
library's module names: a Linear layer, or a Conv2d with a kernel larger than 1x1
and ``groups == 1``, that lives inside a repeated block (an element of an
``nn.ModuleList`` / ``nn.Sequential``, e.g. ``bert.encoder.layer.0``, ``blocks.3``,
``layer2.1``), unless one of its name components is a never-target component
(embeddings, patch embeddings, pooler, classifier, heads) or its weight is shared with
another module (see :func:`shared_weights`).

An explicit ``target_modules`` follows PEFT semantics (see :func:`matches`). :func:`layer_kind` tells
attention from feed-forward layers by their names, for rules that treat them differently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from .layers import FactorizedLayer, dense_shape, is_factorizable


# Name components that are never auto-targeted, even inside a repeated block
# (each regex must re.fullmatch one '.'-separated component of the module name).
_NEVER_TARGET = (
    r".*embed.*",  # embeddings, patch_embed, patch_embeddings, pos_embed, ...
    r"pooler",
    r"classifier",
    r"(.*_)?heads?",  # head, heads, lm_head, cls_head, ...
    r"pre_logits",
)

_NUM_CANDIDATES_SHOWN = 8

_ATTENTION_PARTS = ("attention", "attn", "self_attn", "query", "key", "value", "qkv", "q_proj", "k_proj", "v_proj",
                    "o_proj", "out_proj", "c_attn", "q_lin", "k_lin", "v_lin", "out_lin")
_FFN_PARTS = ("intermediate", "output", "mlp", "ffn", "feed_forward", "fc1", "fc2", "c_fc", "c_proj", "up_proj",
              "down_proj", "gate_proj", "wi", "wo", "wi_0", "wi_1", "lin1", "lin2", "dense_h_to_4h", "dense_4h_to_h")


def layer_kind(name: str) -> str:
    """``"attention"``, ``"ffn"`` or ``"other"`` from a module name's components (BERT, RoBERTa, ViT, GPT-2,
    LLaMA, T5, DistilBERT, ... naming). An attention name wins: ``attention.output.dense`` is attention."""
    parts = name.lower().split(".")
    if any(part in _ATTENTION_PARTS for part in parts):
        return "attention"
    if any(part in _FFN_PARTS for part in parts):
        return "ffn"
    return "other"


def matches(name: str, patterns: str | list[str]) -> bool:
    """PEFT semantics: a ``str`` is a regex that must ``re.fullmatch`` the full
    module name; a list matches an entry exactly or as a ``'.'``-suffix."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def shared_weights(model: nn.Module) -> dict[str, list[str]]:
    """``{Linear/Conv2d name: other module names holding its weight}`` for every layer whose weight is shared.

    Sharing is a weight tied to another module (an LM head tied to the word embeddings, ALBERT-style
    tying) or one module registered under several names; every name of such a module is a key.
    """
    owners: dict[int, list[str]] = {}
    for param_name, param in model.named_parameters(remove_duplicate=False):
        module_name = param_name.rpartition(".")[0]
        owners.setdefault(id(param), []).append(module_name or param_name)  # a root parameter: its own name
    shared: dict[str, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name and is_factorizable(module):
            others = [o for o in dict.fromkeys(owners.get(id(module.weight), ())) if o != name]
            if others:
                shared[name] = others
    return shared


def shared_weight_error(name: str, shared: dict[str, list[str]]) -> ValueError:
    """The error for factorizing ``name``, a key of :func:`shared_weights` (one message for every caller)."""
    others = shared[name]
    # Only Linear/Conv2d sharers could be targets too; suggesting to exclude an embedding would be noise.
    exclude = [name, *(o for o in others if o in shared)]
    return ValueError(
        f"{name!r} shares its weight with {', '.join(map(repr, others))} (tied weights, or one module registered "
        "under several names); factorizing it would untie them and add parameters. Leave it out of the plan, "
        f"e.g. with exclude_modules={exclude!r}."
    )


def _shared_reason(name: str, shared: dict[str, list[str]]) -> str:
    return f"shares its weight with {', '.join(map(repr, shared[name]))}"


def _block_prefix(name: str, modules: dict[str, nn.Module]) -> str | None:
    """Name of the outermost repeated block containing ``name`` (``None`` if none).

    A repeated block is an element of an ``nn.ModuleList`` / ``nn.Sequential`` that
    strictly contains the module (a Linear that *is* a list element is not inside one).
    """
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        parent = ".".join(parts[:i])
        if part.isdigit() and isinstance(modules[parent], (nn.ModuleList, nn.Sequential)):
            return ".".join(parts[: i + 1])
    return None


def block_indices(model: nn.Module, names: list[str]) -> dict[str, int]:
    """For each target name, the 0-based ordinal of the repeated block it lives in
    (blocks counted in order of first appearance in ``model.named_modules()``).

    Raises ``ValueError`` for a name that is not inside any repeated block.
    """
    modules = dict(model.named_modules())
    ordinals: dict[str, int] = {}
    for module_name in modules:
        prefix = _block_prefix(module_name, modules) if module_name else None
        if prefix is not None and prefix not in ordinals:
            ordinals[prefix] = len(ordinals)
    result: dict[str, int] = {}
    for name in names:
        if name not in modules:
            raise ValueError(f"block_indices: {name!r} is not a module of {type(model).__name__}.")
        prefix = _block_prefix(name, modules)
        if prefix is None:
            raise ValueError(
                f"block_indices: {name!r} is not inside a repeated block (an element of an "
                "nn.ModuleList/nn.Sequential), so it has no block index; do not keep blocks "
                "full-rank by index for models or targets without repeated blocks."
            )
        result[name] = ordinals[prefix]
    return result


def _is_auto(target_modules: str | list[str] | None) -> bool:
    return target_modules is None or target_modules == "auto"


def _skip_reason(
    name: str,
    module: nn.Module,
    modules: dict[str, nn.Module],
    target_modules: str | list[str] | None,
    exclude_modules: str | list[str] | None,
    shared: dict[str, list[str]],
) -> str | None:
    """Why the Linear/Conv2d ``name`` is not targeted, or ``None`` if it is (``shared``: :func:`shared_weights`)."""
    if exclude_modules is not None and matches(name, exclude_modules):
        return "excluded by exclude_modules"
    if isinstance(module, FactorizedLayer):  # factorized earlier (e.g. a resumed run): still a target
        return None if _is_auto(target_modules) or matches(name, target_modules) else "not matched by target_modules"
    is_conv = isinstance(module, nn.Conv2d)
    if not _is_auto(target_modules):
        if not matches(name, target_modules):
            return "not matched by target_modules"
        if is_conv and module.groups != 1:
            return f"grouped conv (groups={module.groups})"
        return _shared_reason(name, shared) if name in shared else None
    for part in name.split("."):
        if any(re.fullmatch(p, part) for p in _NEVER_TARGET):
            return f"never-target component {part!r}"
    if _block_prefix(name, modules) is None:
        return "outside a repeated block"
    if name in shared:  # e.g. a Linear reused by several blocks: factorizing it would untie it
        return _shared_reason(name, shared)
    if is_conv and tuple(module.kernel_size) == (1, 1):
        return "1x1 conv"
    if is_conv and module.groups != 1:
        return f"grouped conv (groups={module.groups})"
    return None


@dataclass(repr=False)
class TargetReport:
    """Which Linear/Conv2d layers were targeted, and why the others were not: ``matched`` and ``skipped`` hold the
    names; ``str()`` and ``repr()`` are the table (so a REPL or notebook shows it, and ``print`` prints it)."""

    matched: list[str]
    skipped: dict[str, str]  # candidate layer name -> reason it was not targeted
    layers: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (type, shape)

    def __str__(self) -> str:
        names = list(self.layers) or [*self.matched, *self.skipped]
        header = ("module", "type", "shape", "targeted", "reason")
        rows = [
            (
                name,
                *self.layers.get(name, ("", "")),
                "no" if name in self.skipped else "yes",
                self.skipped.get(name, ""),
            )
            for name in names
        ]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
        lines.append(f"{len(self.matched)} of {len(names)} Linear/Conv2d layers targeted")
        return "\n".join(lines)

    def __repr__(self) -> str:  # the table, not the fields: what a REPL or notebook cell shows
        return str(self)


def describe_targets(
    model: nn.Module,
    target_modules: str | list[str] | None = "auto",
    exclude_modules: str | list[str] | None = None,
) -> TargetReport:
    """Classify every ``nn.Linear`` / ``nn.Conv2d`` of ``model`` as targeted or skipped (with
    a reason). Unlike :func:`find_targets` it does not raise when nothing matches.

    Returns a :class:`TargetReport`; a REPL or notebook shows it as a table, a script prints it::

        >>> print(describe_targets(BertModel(BertConfig(num_hidden_layers=1))))
        module                                  type    shape     targeted  reason
        encoder.layer.0.attention.self.query    Linear  768x768   yes
        ...
        pooler.dense                            Linear  768x768   no        never-target component 'pooler'
        6 of 7 Linear/Conv2d layers targeted
    """
    modules = dict(model.named_modules())
    shared = shared_weights(model)
    report = TargetReport(matched=[], skipped={})
    inside_factorized = tuple(f"{name}." for name, m in modules.items() if isinstance(m, FactorizedLayer))
    for name, module in modules.items():
        if not name or not (is_factorizable(module) or isinstance(module, FactorizedLayer)) or \
                name.startswith(inside_factorized):
            continue
        report.layers[name] = (type(module).__name__, "x".join(str(d) for d in dense_shape(module)))
        reason = _skip_reason(name, module, modules, target_modules, exclude_modules, shared)
        if reason is None:
            report.matched.append(name)
        else:
            report.skipped[name] = reason
    return report


def _check_explicit_matches(
    model: nn.Module, target_modules: str | list[str], exclude_modules: str | list[str] | None
) -> None:
    """Raise if an explicit ``target_modules`` hits a module that cannot be factorized."""
    fix = "narrow target_modules or add the module to exclude_modules"
    shared = shared_weights(model)
    # Every name of a module registered twice: target_modules may name only its second one.
    for name, module in model.named_modules(remove_duplicate=False):
        if not name or not matches(name, target_modules):
            continue
        if exclude_modules is not None and matches(name, exclude_modules):
            continue
        if not is_factorizable(module):
            raise ValueError(
                f"target_modules={target_modules!r} matched {name!r} ({type(module).__name__}), but "
                f"only nn.Linear, transformers' Conv1D and nn.Conv2d can be factorized; {fix}."
            )
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            raise ValueError(
                f"target_modules={target_modules!r} matched {name!r}, a grouped/depthwise Conv2d "
                f"(groups={module.groups}) that cannot be factorized; {fix}."
            )
        if name in shared:
            raise shared_weight_error(name, shared)


def _no_match_error(
    model: nn.Module,
    report: TargetReport,
    target_modules: str | list[str] | None,
    exclude_modules: str | list[str] | None,
) -> ValueError:
    candidates = list(report.layers)
    if not candidates:
        return ValueError(f"{type(model).__name__} has no nn.Linear, Conv1D or nn.Conv2d module to factorize.")
    if _is_auto(target_modules):
        searched = (
            "target_modules='auto' (Linear, or Conv2d larger than 1x1, inside an nn.ModuleList/nn.Sequential block)"
        )
    else:
        searched = f"target_modules={target_modules!r}"
    if exclude_modules is not None:
        searched += f" with exclude_modules={exclude_modules!r}"
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in candidates})
    shown = ", ".join(candidates[:_NUM_CANDIDATES_SHOWN])
    more = f", ... ({len(candidates)} in total)" if len(candidates) > _NUM_CANDIDATES_SHOWN else ""
    return ValueError(
        f"{searched} matched no module of {type(model).__name__}. Linear/Conv2d candidates: {shown}{more}. "
        f"Pass target_modules as a list of names or '.'-suffixes (e.g. {suffixes[:_NUM_CANDIDATES_SHOWN]}) "
        "or as a regex that re.fullmatches the full module name."
    )


def find_targets(
    model: nn.Module,
    target_modules: str | list[str] | None = "auto",
    exclude_modules: str | list[str] | None = None,
) -> list[str]:
    """Names (in ``model.named_modules()`` order) of the nn.Linear / nn.Conv2d modules to factorize.

    ``target_modules`` is ``"auto"``/``None`` (structural rule, see module docstring), a regex
    that must ``re.fullmatch`` the full name, or a list of names / ``'.'``-suffixes.
    ``exclude_modules`` uses the same semantics and wins over ``target_modules``.

    Example::

        >>> model = BertForSequenceClassification(BertConfig(num_hidden_layers=2))
        >>> find_targets(model, ["query", "value"])
        ['bert.encoder.layer.0.attention.self.query', 'bert.encoder.layer.0.attention.self.value',
         'bert.encoder.layer.1.attention.self.query', 'bert.encoder.layer.1.attention.self.value']

    Raises ``ValueError`` if nothing matches (listing candidate names), or if an explicit
    ``target_modules`` matches a module that is not Linear/Conv2d, is a grouped Conv2d or shares
    its weight (see :func:`shared_weights`; ``"auto"`` skips such layers).
    """
    if not _is_auto(target_modules):
        _check_explicit_matches(model, target_modules, exclude_modules)
    report = describe_targets(model, target_modules, exclude_modules)
    if not report.matched:
        raise _no_match_error(model, report, target_modules, exclude_modules)
    return report.matched
