"""Planning: measurements + config -> decisions. Pure functions, one call each, no model or optimizer state.

* :func:`select_targets` and :func:`forced_switch_step` (at construction): what the config names.
* :func:`resolve_method` (at train begin): which rank rule, which factor init and which ``xi`` reference, from
  the config and - for ``"auto"`` - one :func:`detect_pretrained` verdict on the whole model.
* :func:`plan_switch` (at the switch): every target's :class:`~cuttlefish_hf.rank_rules.RankDecision`.
* :func:`schedule_warnings` (at train begin): what the run's length makes impossible, said before compute.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from .config import PRETRAINED_FACTOR_LR_SCALE, CuttlefishConfig
from .rank_rules import (PRETRAINED_SRANK_FRACTION, RankDecision, break_even_rank, decide_ranks,
                         random_matrix_stable_rank, rank_from_singular_values)
from .targeting import block_indices, find_targets, matches

__all__ = ["Method", "PretrainedCheck", "detect_pretrained", "fixed_ratio_saves", "forced_switch_step", "keep_dense",
           "plan_switch", "rank_overrides", "resolve_method", "schedule_warnings", "select_targets",
           "switches_at_a_fixed_step"]


def select_targets(model: nn.Module, config: CuttlefishConfig) -> list[str]:
    """The layers to factorize: ``target_modules`` minus ``exclude_modules`` and the first
    ``skip_first_blocks`` repeated blocks (``"auto"`` keeps layers dense at the switch instead, by timing)."""
    targets = find_targets(model, config.target_modules, config.exclude_modules)
    skip = config.resolved_skip_first_blocks
    if skip != "auto" and skip:
        try:
            blocks = block_indices(model, targets)
        except ValueError as error:
            raise ValueError(f"skip_first_blocks={skip} (mode={config.mode!r}) keeps blocks full-rank by index, "
                             f"but {error} Set skip_first_blocks=0 or narrow target_modules.") from None
        targets = [name for name in targets if blocks.get(name, skip) >= skip]
    if not targets:
        raise ValueError(f"No layer left to factorize after keeping the first {skip} blocks full-rank; "
                         "lower skip_first_blocks or widen target_modules.")
    return targets


def switches_at_a_fixed_step(config: CuttlefishConfig, warmup: str = "stable_ranks") -> bool:
    """Pufferfish, and Cuttlefish with ``warmup="fixed"``: the switch comes after ``fixed_warmup_fraction``."""
    return config.mode == "pufferfish" or (config.mode == "cuttlefish" and warmup == "fixed")


def forced_switch_step(config: CuttlefishConfig, total_steps: int | None, warmup: str = "stable_ranks") -> int | None:
    """The step at which the switch happens whatever the ranks do (the fixed warm-up of Pufferfish and of
    ``warmup="fixed"``, or Cuttlefish's ``max_warmup_fraction``); None when unknown or never (SI&FD switches at
    step 0)."""
    if total_steps is None or config.mode == "si_fd":
        return None
    fixed = switches_at_a_fixed_step(config, warmup)
    return math.ceil((config.fixed_warmup_fraction if fixed else config.max_warmup_fraction) * total_steps)


@dataclass
class PretrainedCheck:
    """Whether the targets look pretrained, from their stable ranks at train begin."""

    pretrained: bool
    low_layers: int          # targets whose srank(W_0) < threshold * srank(random matrix of that shape)
    layers: int
    median_ratio: float      # median of srank(W_0) / srank(random)
    threshold: float

    @property
    def reason(self) -> str:
        verdict = "pretrained" if self.pretrained else "randomly initialized (training from scratch)"
        return (f"weights look {verdict}: {self.low_layers} of {self.layers} target layers have a stable rank at "
                f"train begin below {self.threshold:g}x that of a random matrix of the same shape (median ratio "
                f"{self.median_ratio:.2f})")


def detect_pretrained(init_stable_ranks: Mapping[str, float], shapes: Mapping[str, Sequence[int]], *,
                      threshold: float = PRETRAINED_SRANK_FRACTION, min_fraction: float = 0.5) -> PretrainedCheck:
    """``pretrained`` when at least ``min_fraction`` of the targets have ``srank(W_0)`` below ``threshold``
    times a same-shape Gaussian matrix's (random inits sit near 1, pretrained transformer matrices at 0.05-0.5).

    ``init_stable_ranks`` must be measured at train begin, before any update (training from scratch lowers
    stable ranks too); ``shapes`` are ``{name: (out, in*k*k)}`` or weight shapes.
    """
    ratios = [srank / random_matrix_stable_rank(shapes[name][0], math.prod(shapes[name][1:]))
              for name, srank in init_stable_ranks.items()]
    if not ratios:
        return PretrainedCheck(False, 0, 0, float("nan"), threshold)
    low = sum(1 for r in ratios if r < threshold)
    median = sorted(ratios)[len(ratios) // 2]
    return PretrainedCheck(low >= min_fraction * len(ratios), low, len(ratios), median, threshold)


@dataclass(frozen=True)
class Method:
    """What :func:`resolve_method` decided once, at train begin."""

    rank_rule: str
    init: str
    xi_reference: str
    reason: str
    warmup: str = "stable_ranks"  # 0.1 / early 0.2 checkpoints saved the first four fields only
    factor_lr_scale: float = 1.0   # checkpoints before factor_lr_scale trained with 1

    @property
    def records_inputs(self) -> bool:
        """Whether the switch needs the layers' input statistics."""
        return self.init == "whitened"


def resolve_method(config: CuttlefishConfig, init_stable_ranks: Mapping[str, float],
                   shapes: Mapping[str, Sequence[int]]) -> Method:
    """Turn the config's ``"auto"`` choices into names, with one pretrained verdict for all of them."""
    rule, init, xi_reference = config.resolved_rank_rule, config.resolved_init, config.xi_reference
    warmup = config.warmup if config.mode == "cuttlefish" else "stable_ranks"  # the baselines' is fixed
    scale = config.resolved_factor_lr_scale
    xi_matters = rule in ("auto", "scaled_stable_rank")
    if "auto" not in (rule, init, warmup, scale) and not (xi_matters and xi_reference == "auto"):
        reason = "set in the config" if config.mode == "cuttlefish" else f"{config.mode} mode uses a fixed rank ratio"
        return Method(rule, init, xi_reference, reason, warmup, scale)
    check = detect_pretrained(init_stable_ranks, shapes)
    auto = [name for name, value in (("rank_rule", rule), ("init", init), ("warmup", warmup),
                                     ("factor_lr_scale", scale)) if value == "auto"]
    if rule == "auto":
        rule = "kind_fractions" if check.pretrained else "scaled_stable_rank"
    if init == "auto":
        init = "whitened" if check.pretrained else "svd"
    if warmup == "auto":
        warmup = "fixed" if check.pretrained else "stable_ranks"
    if xi_reference == "auto":
        xi_reference = "random_matrix" if check.pretrained else "init"
    if scale == "auto":
        scale = PRETRAINED_FACTOR_LR_SCALE if check.pretrained else 1.0
    said = " and ".join(f"{name}='auto'" for name in auto) or "xi_reference='auto'"
    return Method(rule, init, xi_reference, f"{said} and the {check.reason}", warmup, scale)


def rank_overrides(targets: Sequence[str], rank_pattern: Mapping[str, int]) -> dict[str, int]:
    """``{target: rank}`` fixed by ``rank_pattern`` (regex or name suffix -> rank; the last match wins)."""
    overrides = {}
    for name in targets:
        for pattern, rank in rank_pattern.items():
            if matches(name, [pattern]) or matches(name, pattern):
                overrides[name] = rank
    return overrides


def plan_switch(weights: Mapping[str, torch.Tensor], config: CuttlefishConfig, method: Method, *,
                init_stable_ranks: Mapping[str, float] | None = None,
                measured_stable_ranks: Mapping[str, float] | None = None) -> list[RankDecision]:
    """Each target's rank under ``method.rank_rule`` from its ``(out, in*k*k)`` matrix ``weights[name]``,
    ``rank_pattern`` applied; ``decision.factorize`` says whether it saves parameters. ``measured_stable_ranks``
    spare the rules that read no spectrum an SVD of every weight for the report."""
    return decide_ranks(weights, method.rank_rule, init_stable_ranks=init_stable_ranks,
                        xi_reference=method.xi_reference, energy=config.energy_threshold, ratio=config.rank_ratio,
                        kind_fractions=config.kind_fractions, min_rank=config.min_rank,
                        rank_multiple=config.rank_multiple, measured_stable_ranks=measured_stable_ranks,
                        rank_overrides=rank_overrides(list(weights), config.rank_pattern))


def keep_dense(decisions: Sequence[RankDecision], names: Sequence[str]) -> list[RankDecision]:
    """The decisions with the named layers left full-rank (e.g. those profiling found no faster factorized)."""
    names = set(names)
    return [replace(d, factorize=False) if d.name in names else d for d in decisions]


def fixed_ratio_saves(config: CuttlefishConfig, shapes: Mapping[str, Sequence[int]]) -> bool:
    """Whether any target's fixed-ratio rank (or ``rank_pattern`` rank) is below its break-even rank."""
    overrides = rank_overrides(list(shapes), config.rank_pattern)
    for name, shape in shapes.items():
        m, n = shape[0], math.prod(shape[1:])
        # The fixed-ratio rule reads only how many singular values there are.
        rank = overrides.get(name) or rank_from_singular_values(
            torch.empty(min(m, n)), "fixed_ratio", ratio=config.rank_ratio, min_rank=config.min_rank)
        if min(rank, min(m, n)) < break_even_rank(m, n):
            return True
    return False


def schedule_warnings(config: CuttlefishConfig, *, total_steps: int | None, forced_step: int | None,
                      measurement_period: int | None, shapes: Mapping[str, Sequence[int]],
                      warmup: str = "stable_ranks") -> list[str]:
    """What the configured bounds cannot do in a run of ``total_steps``, or that a fixed rank ratio already
    factorizes nothing: messages for the user, at train begin."""
    said = []
    if config.resolved_rank_rule == "fixed_ratio" and not fixed_ratio_saves(config, shapes):
        said.append(f"Cuttlefish: at rank_ratio={config.rank_ratio:g} no target layer's factors would hold fewer "
                    "parameters than the dense weight, so nothing will be factorized; lower rank_ratio.")
    if config.mode == "si_fd":
        return said
    fixed = switches_at_a_fixed_step(config, warmup)
    bound = "fixed_warmup_fraction" if fixed else "max_warmup_fraction"
    if total_steps is None:
        never = " and the model never switches" if fixed else ""
        return [*said, f"Cuttlefish does not know the run's total steps, so {bound} cannot be applied{never}; pass "
                       "total_steps to Cuttlefish(...)."]
    if forced_step >= total_steps:
        stays = "the model stays dense" if fixed else "the model stays dense unless the ranks settle earlier"
        return [*said, f"Cuttlefish: the {bound} bound falls at step {forced_step} of {total_steps}, where no step "
                       f"is left to train at low rank: {stays}. Lower it."]
    if fixed or not measurement_period:
        return said
    fit = forced_step // measurement_period  # a measurement due at the bound's step is taken before the switch
    if fit < config.min_warmup_measurements:
        said.append(
            f"Cuttlefish: only {fit} stable-rank measurement(s) fit before max_warmup_fraction="
            f"{config.max_warmup_fraction:g} (step {forced_step} of {total_steps}), fewer than "
            f"min_warmup_measurements={config.min_warmup_measurements}; it will switch at step {forced_step} with "
            f"{fit}. Measure more often (measure_every_steps={max(1, forced_step // config.min_warmup_measurements)})"
            " or raise max_warmup_fraction.")
    return said
