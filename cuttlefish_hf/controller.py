"""``Cuttlefish``: the measure -> decide -> switch loop that every integration calls.

Framework-neutral: a plain PyTorch or Accelerate loop calls :meth:`Cuttlefish.step_end` after each optimizer
step and :meth:`Cuttlefish.epoch_end` after each epoch; the Trainer callback does the same from its events.

Example (a custom loop)::

    controller = Cuttlefish(model, CuttlefishConfig(), total_steps=len(loader) * epochs,
                            steps_per_epoch=len(loader))
    controller.begin(optimizer, scheduler)
    for epoch in range(epochs):
        for batch in loader:
            ...; optimizer.step(); scheduler.step(); step += 1
            if controller.step_end(step, optimizer, scheduler):
                model = accelerator.prepare(accelerator.unwrap_model(model))  # re-wrap DDP, if any
        if controller.epoch_end(step, optimizer, scheduler):
            model = accelerator.prepare(accelerator.unwrap_model(model))
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .activation_aware import (ActivationStats, decide_ranks_activation_aware, detect_pretrained,
                               factorize_activation_aware_)
from .config import CuttlefishConfig
from .layers import FactorizedLayer, dense_matrix, dense_shape, full_rank, is_linear
from .logging_utils import get_logger
from .optim import attach_frobenius_decay, attach_rewarmup, replace_parameters_
from .profiling import ProfileReport, profile_layers
from .rank_rules import RankDecision, break_even_rank, decide_ranks, rank_from_singular_values
from .stable_rank import StableRankMeter, check_finite, stable_ranks
from .surgery import FactorizationReport, factorization_report, factorize_, unwrap_compiled
from .targeting import block_indices, find_targets, matches
from .tracker import StableRankTracker

__all__ = ["Cuttlefish", "SwitchResult"]

SPEED_REPORT_STEPS = 20  # low-rank steps timed before the controller says whether the switch paid

logger = get_logger(__name__)


@dataclass
class SwitchResult:
    """What the switch changed, for loops that need to rebuild something (e.g. a DDP wrapper)."""

    step: int
    report: FactorizationReport
    decisions: list[RankDecision]
    new_parameters: list[nn.Parameter] = field(default_factory=list)
    removed_parameters: list[nn.Parameter] = field(default_factory=list)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


def _from_rank_zero(value: Any) -> Any:
    """Rank 0's ``value`` on every process (identity outside distributed runs)."""
    if not _distributed():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


class Cuttlefish:
    """Runs Cuttlefish (or Pufferfish / SI&FD) on ``model``.

    Args:
        model: the unwrapped model (not a DDP wrapper).
        config: the method's settings.
        total_steps: planned optimizer steps, for ``max_warmup_fraction`` and Pufferfish's fixed warm-up.
        steps_per_epoch: optimizer steps per epoch, to turn per-epoch measurement into a step count.
        exclude_factors_from_weight_decay: put factors in a ``weight_decay=0`` optimizer group when
            Frobenius decay is on (integrations that rebuild optimizers themselves may turn this off).
    """

    def __init__(self, model: nn.Module, config: CuttlefishConfig, *, total_steps: int | None = None,
                 steps_per_epoch: int | None = None, exclude_factors_from_weight_decay: bool = True) -> None:
        self.model = unwrap_compiled(model)
        model = self.model
        self.config = config
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.exclude_factors_from_weight_decay = exclude_factors_from_weight_decay
        self.targets = self._select_targets()
        modules = dict(model.named_modules())
        self.full_ranks = {name: full_rank(modules[name]) for name in self.targets}
        self.meter = StableRankMeter(n_iter=config.power_iterations, seed=config.power_iteration_seed)
        self.tracker = StableRankTracker(
            self.full_ranks, window=config.window, eps_relative=config.eps_relative, ema_decay=config.ema_decay,
            min_measurements=config.min_warmup_measurements)
        self.measured_steps: list[int] = []
        self.init_stable_ranks: dict[str, float] | None = None
        self.rank_rule: str | None = None  # resolved from config.rank_rule at begin(); see rank_rule_reason
        self.rank_rule_reason = ""
        self.activations: ActivationStats | None = None  # input statistics for rank_rule="activation_aware"
        self.switch_step: int | None = None
        self.report: FactorizationReport | None = None
        self.decisions: list[RankDecision] = []
        self.measure_seconds = 0.0
        self.statistics_seconds = 0.0  # in the activation-aware rule's input hooks (host time)
        self.surgery_seconds = 0.0
        self.profile_report: ProfileReport | None = None  # skip_first_blocks="auto": the timings (rank 0)
        self.profile_seconds = 0.0
        # wall seconds between consecutive step_end calls, full-rank and low-rank (their medians are reported)
        self.step_intervals: dict[str, list[float]] = {"dense": [], "low_rank": []}
        self._last_step_end: float | None = None
        self._speed_reported = False
        self._hooks: list = []
        self.log_level = logging.INFO  # integrations whose users see only warnings raise this
        self.factorized_before_training = False
        if any(isinstance(module, FactorizedLayer) for module in model.modules()):
            self._adopt_factorized_model()

    # -- setup ----------------------------------------------------------------------------------------
    def _select_targets(self) -> list[str]:
        config = self.config
        targets = find_targets(self.model, config.target_modules, config.exclude_modules)
        skip = config.resolved_skip_first_blocks
        if skip != "auto" and skip:  # "auto" keeps layers dense at the switch, by timing them
            try:
                blocks = block_indices(self.model, targets)
            except ValueError as error:
                raise ValueError(f"skip_first_blocks={skip} (mode={config.mode!r}) keeps blocks full-rank by index, "
                                 f"but {error} Set skip_first_blocks=0 or narrow target_modules.") from None
            targets = [name for name in targets if blocks.get(name, skip) >= skip]
        if not targets:
            raise ValueError(f"No layer left to factorize after keeping the first {skip} blocks full-rank; "
                             "lower skip_first_blocks or widen target_modules.")
        return targets

    def _measurement_period(self) -> int | None:
        return self.config.measure_every_steps or self.steps_per_epoch

    def _forced_switch_step(self) -> int | None:
        """The step at which the switch happens whatever the ranks do (Pufferfish's fixed warm-up, or
        Cuttlefish's ``max_warmup_fraction``); None when unknown or never."""
        if self.total_steps is None or self.config.mode == "si_fd":
            return None
        fraction = self.config.fixed_warmup_fraction if self.config.mode == "pufferfish" else \
            self.config.max_warmup_fraction
        return math.ceil(fraction * self.total_steps)

    def _adopt_factorized_model(self) -> None:
        """A model that already holds factorized layers (e.g. the output of an earlier run) trains on as
        switched: no second switch; its factors get Frobenius decay once :meth:`begin` sees the optimizer."""
        self.factorized_before_training = True
        self.switch_step = 0
        self.report = factorization_report(self.model)
        self.rank_rule = "none"
        self.rank_rule_reason = "the model was already factorized when training began"

    def _weights(self) -> dict[str, torch.Tensor]:
        """Each target's ``(out, in*k*k)`` matrix (a view; a Conv1D's weight is stored transposed)."""
        modules = dict(self.model.named_modules())
        return {name: dense_matrix(modules[name]) for name in self.targets}

    @property
    def decided(self) -> bool:
        """The switch point has passed: nothing is measured any more (the model may have stayed dense)."""
        return self.switch_step is not None

    @property
    def switched(self) -> bool:
        """The model trains with factorized layers."""
        return self.decided and bool(self.report and self.report.layers)

    def begin(self, optimizer=None, scheduler=None) -> SwitchResult | None:
        """Call once before training: snapshots ``srank(W_0)``, resolves the rank rule (starting the input
        statistics the activation-aware rule needs); SI&FD mode switches here (step 0). A model factorized
        before training gets its factors' Frobenius decay (and a weight-decay-free group) here instead."""
        if self.decided:
            if self.factorized_before_training:
                logger.log(self.log_level, "Cuttlefish: the model already holds %d factorized layers; training goes "
                           "on at their ranks (no second switch; dense layers stay dense).", len(self.report.layers))
                if optimizer is not None:
                    self._adopt_factors(optimizer, scheduler)
            return None
        self._warn_about_schedule()
        self._resolve_rank_rule()
        self._start_activation_stats()
        if self.config.mode == "si_fd":
            return self.switch(0, optimizer, scheduler)
        return None

    def _resolve_rank_rule(self) -> None:
        """Snapshot ``srank(W_0)`` (once) and turn ``config.rank_rule`` into :attr:`rank_rule` (once)."""
        if self.init_stable_ranks is None:
            weights = self._weights()
            check_finite(weights, "training")
            self.init_stable_ranks = dict(zip(weights, stable_ranks(list(weights.values()))))
        if self.rank_rule is not None:
            return
        config = self.config
        if config.resolved_rank_rule != "auto":
            self.rank_rule = config.resolved_rank_rule
            self.rank_rule_reason = "set in the config" if config.mode == "cuttlefish" else \
                f"{config.mode} mode uses a fixed rank ratio"
        else:
            modules = dict(self.model.named_modules())
            shapes = {name: dense_shape(modules[name]) for name in self.targets}
            check = detect_pretrained(self.init_stable_ranks, shapes)
            self.rank_rule = "activation_aware" if check.pretrained else "scaled_stable_rank"
            self.rank_rule_reason = f"rank_rule='auto' and the {check.reason}"
        logger.log(self.log_level, "Cuttlefish will choose ranks with the %s rule (%s).", self.rank_rule,
                   self.rank_rule_reason)

    def _start_activation_stats(self) -> None:
        """Hook the Linear targets to record their inputs' second moments (activation-aware rule only)."""
        if self.rank_rule != "activation_aware" or self.decided or self.activations is not None:
            return
        modules = dict(self.model.named_modules())
        linear = [name for name in self.targets if is_linear(modules[name])]
        self.activations = ActivationStats(max_tokens=self.config.activation_tokens).start(self.model, linear)

    def _activation_covariances(self) -> dict[str, torch.Tensor]:
        """The recorded input covariances (summed over processes), ``{}`` unless the rule needs them."""
        if self.rank_rule != "activation_aware":
            return {}
        stats = self.activations
        if stats is not None:
            stats.all_reduce_()  # collective: every process is in switch() together
        covariances = {} if stats is None else {name: stats.covariance(name) for name in stats.names
                                                 if stats.count(name) > 0}
        if not covariances:
            logger.warning("Cuttlefish recorded no layer inputs before the switch (call begin() before training); "
                           "the activation-aware rule falls back to plain SVD factors.")
        return covariances

    def _warn_about_schedule(self) -> None:
        """Say once, at train begin, when the configured bounds cannot all be met by this run's length, or
        when a fixed rank ratio already tells that no layer will be factorized."""
        config, total, forced = self.config, self.total_steps, self._forced_switch_step()
        if config.resolved_rank_rule == "fixed_ratio" and not self._fixed_ratio_saves():
            logger.warning("Cuttlefish: at rank_ratio=%g no target layer's factors would hold fewer parameters than "
                           "the dense weight, so nothing will be factorized; lower rank_ratio.", config.rank_ratio)
        if config.mode == "si_fd":
            return
        if total is None:
            bound = "fixed_warmup_fraction" if config.mode == "pufferfish" else "max_warmup_fraction"
            logger.warning("Cuttlefish does not know the run's total steps, so %s cannot be applied%s; pass "
                           "total_steps to Cuttlefish(...).", bound,
                           " and the model never switches" if config.mode == "pufferfish" else "")
            return
        if forced >= total:
            logger.warning("Cuttlefish: the %s bound falls at step %d of %d, where no step is left to train at low "
                           "rank: %s. Lower it.", "fixed_warmup_fraction" if config.mode == "pufferfish" else
                           "max_warmup_fraction", forced, total, "the model stays dense" if config.mode == "pufferfish"
                           else "the model stays dense unless the ranks settle earlier")
            return
        period = self._measurement_period()
        if config.mode != "cuttlefish" or not period:
            return
        fit = forced // period  # a measurement due at the bound's step is taken before the switch
        if fit < config.min_warmup_measurements:
            logger.warning(
                "Cuttlefish: only %d stable-rank measurement(s) fit before max_warmup_fraction=%g (step %d of %d), "
                "fewer than min_warmup_measurements=%d; it will switch at step %d with %d. Measure more often "
                "(measure_every_steps=%d) or raise max_warmup_fraction.", fit, config.max_warmup_fraction, forced,
                total, config.min_warmup_measurements, forced, fit, max(1, forced // config.min_warmup_measurements))

    def _fixed_ratio_saves(self) -> bool:
        """Whether any target's fixed-ratio rank (or ``rank_pattern`` rank) is below its break-even rank."""
        modules = dict(self.model.named_modules())
        overrides = self._rank_overrides()
        for name in self.targets:
            shape = dense_shape(modules[name])
            m, n = shape[0], math.prod(shape[1:])
            # The fixed-ratio rule reads only how many singular values there are.
            rank = overrides.get(name) or rank_from_singular_values(
                torch.empty(min(m, n)), "fixed_ratio", ratio=self.config.rank_ratio, min_rank=self.config.min_rank)
            if rank < break_even_rank(m, n):
                return True
        return False

    def _adopt_factors(self, optimizer, scheduler) -> None:
        """Give a model factorized before training what the switch gives new factors: no L2 weight decay
        while Frobenius decay is on, and the Frobenius-decay (and re-warm-up) hooks."""
        factors = [p for module in self._factorized_modules().values() for p in
                   (module.first.weight, module.second.weight) if p.requires_grad]
        decay = self.config.resolved_frobenius_decay
        if decay > 0 and self.exclude_factors_from_weight_decay:
            replace_parameters_(optimizer, self.model, {p: [p] for p in factors}, scheduler=scheduler,
                                zero_weight_decay=True)
        self.attach_hooks(optimizer)

    # -- the loop -------------------------------------------------------------------------------------
    def measure(self) -> dict[str, float]:
        """Measure every target's stable rank now (batched power iteration) and record it."""
        start = time.perf_counter()
        ranks = self.meter.measure(self._weights())
        self.measure_seconds += time.perf_counter() - start
        return ranks

    def _steps_left(self, step: int) -> bool:
        """Whether training goes on after ``step``: a switch at the last step would leave an untrained model."""
        return self.total_steps is None or step < self.total_steps

    def _bound_reached(self, step: int) -> bool:
        forced = self._forced_switch_step()
        return forced is not None and step >= forced and self._steps_left(step)

    def _on_measurement_point(self, step: int, optimizer, scheduler) -> SwitchResult | None:
        if self.decided:
            return None
        if self.init_stable_ranks is None:
            self.begin()
        self.tracker.update(self.measure())
        self.measured_steps.append(step)
        settled = self.config.mode == "cuttlefish" and _from_rank_zero(self.tracker.should_switch())
        if settled and not self._steps_left(step):
            logger.warning("Cuttlefish: the stable ranks settled only at the last step (%d); no step is left to "
                           "train at low rank, so the model stays dense.", step)
        if self._bound_reached(step) or (settled and self._steps_left(step)):
            return self.switch(step, optimizer, scheduler)
        if self.activations is not None:
            self.activations.reset()  # the switch uses the statistics of the period just before it
        return None

    def step_end(self, step: int, optimizer=None, scheduler=None) -> SwitchResult | None:
        """Call after each optimizer step (``step`` = optimizer steps done). Returns the switch, if it happened."""
        now = time.perf_counter()
        if self._last_step_end is not None:
            self.step_intervals["low_rank" if self.switched else "dense"].append(now - self._last_step_end)
        try:
            return self._step_end(step, optimizer, scheduler)
        finally:
            self._last_step_end = time.perf_counter()  # the next interval excludes measuring and the switch

    def _step_end(self, step: int, optimizer, scheduler) -> SwitchResult | None:
        if self.decided:
            if not self._speed_reported and len(self.step_intervals["low_rank"]) >= SPEED_REPORT_STEPS:
                self.report_speed()
            return None
        if self.config.measure_every_steps and step % self.config.measure_every_steps == 0:
            return self._on_measurement_point(step, optimizer, scheduler)
        # Per-epoch measuring: an epoch's last step waits for epoch_end, which measures and then switches.
        epoch_measurement_follows = not self.config.measure_every_steps and self.steps_per_epoch and \
            step % self.steps_per_epoch == 0
        if self._bound_reached(step) and not epoch_measurement_follows:  # the same step on every process
            return self.switch(step, optimizer, scheduler)
        return None

    def epoch_end(self, step: int, optimizer=None, scheduler=None) -> SwitchResult | None:
        """Call after each epoch. Measures when measuring per epoch; returns the switch, if it happened."""
        if self.decided or self.config.measure_every_steps:
            return None
        return self._on_measurement_point(step, optimizer, scheduler)

    # -- the switch -----------------------------------------------------------------------------------
    def decide(self, covariances: dict[str, torch.Tensor] | None = None) -> list[RankDecision]:
        """Each target's rank under :attr:`rank_rule`, from exact singular values (rank 0's under DDP).

        ``covariances``: the layers' input covariances for the activation-aware rule (default: recorded ones).
        """
        config = self.config
        self._resolve_rank_rule()
        overrides = self._rank_overrides()
        if self.rank_rule == "activation_aware":
            decisions = decide_ranks_activation_aware(
                self._weights(), self._activation_covariances() if covariances is None else covariances,
                "fraction", kind_fractions=config.activation_fractions, min_rank=config.min_rank,
                rank_overrides=overrides)
        else:
            decisions = decide_ranks(
                self._weights(), self.rank_rule, init_stable_ranks=self.init_stable_ranks,
                xi_reference=config.xi_reference, energy=config.energy_threshold, ratio=config.rank_ratio,
                min_rank=config.min_rank, rank_overrides=overrides)
        return _from_rank_zero(decisions)

    def _rank_overrides(self) -> dict[str, int]:
        """``{target: rank}`` fixed by ``config.rank_pattern``."""
        overrides = {}
        for name in self.targets:
            for pattern, rank in self.config.rank_pattern.items():
                if matches(name, [pattern]) or matches(name, pattern):
                    overrides[name] = rank
        return overrides

    def switch(self, step: int, optimizer=None, scheduler=None) -> SwitchResult:
        """Factorize now: decide ranks, swap the layers, and update ``optimizer`` without losing state.

        When no layer is worth factorizing the model stays dense (with a warning) and nothing is measured
        any more; :attr:`switched` stays False."""
        if self.decided:
            raise RuntimeError("Cuttlefish already made its switch decision for this model.")
        start = time.perf_counter()
        self._resolve_rank_rule()
        covariances = self._activation_covariances()
        self.decisions = self.decide(covariances)
        if self.config.resolved_skip_first_blocks == "auto":
            self.decisions = self._keep_slow_layers_dense(self.decisions)
        plan = {d.name: d.rank for d in self.decisions if d.factorize}
        modules = dict(self.model.named_modules())
        old = {name: modules[name].weight for name in plan}
        if self.activations is not None:
            self.activations.stop()
            self.statistics_seconds += self.activations.seconds
            self.activations = None
        stable = {d.name: d.stable_rank for d in self.decisions}
        if covariances:
            self.report = factorize_activation_aware_(self.model, plan, covariances, stable_ranks=stable,
                                                      extra_bn=self.config.resolved_extra_bn)
        else:
            self.report = factorize_(self.model, plan, extra_bn=self.config.resolved_extra_bn, stable_ranks=stable)
        self.switch_step = step
        # Nothing factorized: no optimizer change, no Frobenius decay or re-warm-up hooks on a dense model.
        result = self._finish_switch(step, optimizer, scheduler, old) if plan else \
            SwitchResult(step, self.report, self.decisions)
        self.surgery_seconds = time.perf_counter() - start
        epoch = f" (epoch {step / self.steps_per_epoch:.2f})" if self.steps_per_epoch else ""
        if not plan:
            kept = "profiling found none faster" if self.profile_report else "no rank saves parameters"
            logger.warning("Cuttlefish decided at step %d%s not to factorize: of %d target layers, %s (%s rule: %s). "
                           "Training goes on dense; lower rank_ratio / activation_fractions, or widen "
                           "target_modules.", step, epoch, len(self.decisions), kept, self.rank_rule,
                           self.rank_rule_reason)
            return result
        logger.log(self.log_level, "Cuttlefish switched to low rank at step %d%s after %d measurements (%s mode, %s "
                   "rule: %s); measuring took %.2fs in all, the switch %.2fs (profiling %.2fs of it).\n%s", step,
                   epoch, len(self.measured_steps), self.config.mode, self.rank_rule, self.rank_rule_reason,
                   self.measure_seconds, self.surgery_seconds, self.profile_seconds, self.report)
        return result

    def _keep_slow_layers_dense(self, decisions: list[RankDecision]) -> list[RankDecision]:
        """``skip_first_blocks="auto"``: time the planned layers (rank 0 only, under DDP) and mark the ones
        whose factorization is not faster by ``profile_margin`` as staying dense."""
        config = self.config
        keep = None
        if not _distributed() or torch.distributed.get_rank() == 0:
            self.profile_report = profile_layers(
                self.model, {d.name: d.rank for d in decisions if d.factorize},
                tokens_per_batch=config.profile_tokens_per_batch, margin=config.profile_margin,
                dtype=getattr(torch, config.profile_dtype) if config.profile_dtype else None,
                extra_bn=config.resolved_extra_bn)
            self.profile_seconds = self.profile_report.seconds
            logger.log(self.log_level, "Cuttlefish timed the planned layers (skip_first_blocks='auto'):\n%s",
                       self.profile_report)
            keep = self.profile_report.keep_dense
        keep = set(_from_rank_zero(keep))
        return [dataclasses.replace(d, factorize=False) if d.name in keep else d for d in decisions]

    def _factorized_modules(self) -> dict[str, FactorizedLayer]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, FactorizedLayer)}

    def _finish_switch(self, step: int, optimizer, scheduler, old: dict[str, nn.Parameter]) -> SwitchResult:
        factorized = self._factorized_modules()
        replacements = {old[name]: [factorized[name].first.weight, factorized[name].second.weight] for name in old}
        replacements = {p: [q for q in new if q.requires_grad] for p, new in replacements.items()}
        decay = self.config.resolved_frobenius_decay
        if optimizer is not None:
            replace_parameters_(optimizer, self.model, replacements, scheduler=scheduler,
                                zero_weight_decay=decay > 0 and self.exclude_factors_from_weight_decay)
            self.attach_hooks(optimizer)
        new_parameters = [p for params in replacements.values() for p in params]
        return SwitchResult(step, self.report, self.decisions, new_parameters, list(replacements))

    def attach_hooks(self, optimizer, step: int | None = None) -> None:
        """Attach Frobenius decay (and the optional re-warm-up) to ``optimizer``; after a resume pass the
        optimizer steps done (``step``) so the re-warm-up continues where it stopped."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        decay = self.config.resolved_frobenius_decay
        if decay > 0:
            self._hooks.append(attach_frobenius_decay(optimizer, self._factorized_modules().values(), decay))
        if self.config.rewarmup_steps:
            done = 0 if step is None or self.switch_step is None else step - self.switch_step
            self._hooks.extend(attach_rewarmup(optimizer, self.config.rewarmup_steps, done=done))

    # -- reporting and checkpoints ----------------------------------------------------------------------
    def step_times(self) -> dict[str, float | None]:
        """Median wall seconds per training step before and after the switch (from the ``step_end`` calls of
        this process; evaluation or checkpoint steps are outliers the median ignores), their ratio, and the
        FLOP-ideal speedup of the factorized layers (their dense over factorized parameter counts)."""
        dense, low_rank = (statistics.median(v) if v else None for v in self.step_intervals.values())
        report = self.report
        return {"dense_step_seconds": dense, "low_rank_step_seconds": low_rank,
                "step_speedup": dense / low_rank if dense and low_rank else None,
                "targeted_flop_ideal_speedup": report.target_params_before / report.target_params_after
                if report and report.target_params_after else None}

    def report_speed(self) -> None:
        """Say (once) whether the switch paid: the low-rank steps' median time against the dense phase's and
        the FLOP ideal, with a warning naming the likely cause when low rank is slower. ``step_end`` calls it
        after :data:`SPEED_REPORT_STEPS` low-rank steps; integrations call it at train end for shorter runs."""
        times = self.step_times()
        if self._speed_reported or not self.switched or not times["step_speedup"] or \
                len(self.step_intervals["dense"]) < 3 or len(self.step_intervals["low_rank"]) < 3:
            return
        self._speed_reported = True
        speedup, ideal = times["step_speedup"], times["targeted_flop_ideal_speedup"]
        said = (f"Cuttlefish: low-rank steps take {times['low_rank_step_seconds'] * 1e3:.1f} ms against "
                f"{times['dense_step_seconds'] * 1e3:.1f} ms dense (medians): {speedup:.2f}x")
        if speedup >= 1:
            logger.log(self.log_level, "%s faster (FLOP ideal of the factorized layers: %.2fx).", said, ideal)
            return
        logger.warning("%s, SLOWER than dense (FLOP ideal of the factorized layers: %.2fx). Likely causes: %s",
                       said, ideal, "; ".join(self._slowness_causes(times["low_rank_step_seconds"])))

    def _slowness_causes(self, low_rank_seconds: float) -> list[str]:
        report, causes = self.report, []
        on_gpu = any(p.is_cuda for p in self.model.parameters())
        if on_gpu and low_rank_seconds < 0.1:
            causes.append("host-bound steps (short GPU steps where kernel launches, not FLOPs, set the time: compile "
                          "the model, e.g. TrainingArguments(torch_compile=True), or use larger batches)")
        fractions = sorted(layer.rank / min(layer.shape[0], math.prod(layer.shape[1:])) for layer in report.layers)
        if fractions[len(fractions) // 2] < 1 / 8:
            causes.append(f"thin ranks (median rank {fractions[len(fractions) // 2]:.2f}x the full rank: products "
                          "this thin run far below the device's peak)")
        causes.append("too little work per matrix product (small batch x sequence length): skip_first_blocks='auto' "
                      "times each layer and keeps dense the ones factorizing does not speed up")
        return causes

    def summary(self) -> dict[str, Any]:
        """A JSON-ready summary: switch point, plan, parameter counts, step times and time spent."""
        report = self.report
        return {
            **self.step_times(),
            "mode": self.config.mode,
            "rank_rule": self.rank_rule or self.config.resolved_rank_rule,
            "rank_rule_reason": self.rank_rule_reason,
            "switch_step": self.switch_step,
            "switch_epoch": None if self.switch_step is None or not self.steps_per_epoch
            else self.switch_step / self.steps_per_epoch,
            "measurements": len(self.measured_steps),
            "plan": report.plan if report else {},
            "xi_reference": {d.name: d.xi_reference for d in self.decisions if d.xi_reference},
            "model_params_before": report.model_params_before if report else None,
            "model_params_after": report.model_params_after if report else None,
            "target_params_before": report.target_params_before if report else None,
            "target_params_after": report.target_params_after if report else None,
            "measure_seconds": self.measure_seconds,
            "statistics_seconds": self.statistics_seconds,
            "surgery_seconds": self.surgery_seconds,
            "profile_seconds": self.profile_seconds,
            "profile_kept_dense": self.profile_report.keep_dense if self.profile_report else [],
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "tracker": self.tracker.state_dict(),
            "measured_steps": list(self.measured_steps),
            "init_stable_ranks": self.init_stable_ranks,
            "rank_rule": self.rank_rule,
            "rank_rule_reason": self.rank_rule_reason,
            "switch_step": self.switch_step,
            "factorized_before_training": self.factorized_before_training,
            "report": self.report.to_dict() if self.report else None,
            "measure_seconds": self.measure_seconds,
            "statistics_seconds": self.statistics_seconds,
            "surgery_seconds": self.surgery_seconds,
            "profile_seconds": self.profile_seconds,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore progress. After the switch, the model must already hold the factorized layers."""
        self.tracker.load_state_dict(state["tracker"])
        self.measured_steps = list(state["measured_steps"])
        self.init_stable_ranks = state["init_stable_ranks"]
        self.rank_rule = state.get("rank_rule")  # absent from checkpoints of older versions: resolved again
        self.rank_rule_reason = state.get("rank_rule_reason", "")
        self.measure_seconds = state["measure_seconds"]
        self.surgery_seconds = state["surgery_seconds"]
        self.statistics_seconds = state.get("statistics_seconds", 0.0)
        self.profile_seconds = state.get("profile_seconds", 0.0)  # absent from checkpoints of older versions
        self.switch_step = state["switch_step"]
        self.factorized_before_training = state.get("factorized_before_training", False)
        self.report = None if state["report"] is None else FactorizationReport.from_dict(state["report"])
        present = {n: m.rank for n, m in self._factorized_modules().items()}
        if present != (self.report.plan if self.report else {}):
            raise ValueError("The model's factorized layers do not match the saved Cuttlefish plan; load the "
                             "checkpoint's weights into the model before restoring the controller.")
        if not self.decided and self.init_stable_ranks is not None:  # resumed in the warm-up: go on as begin()
            self._resolve_rank_rule()
            # Input statistics restart empty; restore the period's with load_statistics_state (checkpoints that
            # the Trainer integration writes hold them).
            self._start_activation_stats()

    @property
    def period_start(self) -> int:
        """The step where the current measurement period (and its input statistics) began."""
        return self.measured_steps[-1] if self.measured_steps else 0

    def statistics_state(self) -> dict[str, Any] | None:
        """This process's input statistics of the current period (activation-aware rule), or None."""
        if self.activations is None:
            return None
        return {"period_start": self.period_start, **self.activations.state_dict()}

    def load_statistics_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`statistics_state` after :meth:`load_state_dict`, so a resume in the middle of a period
        switches with the same factors as an uninterrupted run."""
        if self.activations is None:
            raise ValueError("No input statistics are being recorded (not the activation-aware rule, or after "
                             "the switch); there is nothing to restore them into.")
        if state["period_start"] != self.period_start:
            raise ValueError(f"The saved input statistics belong to the period from step {state['period_start']}, "
                             f"but the restored controller's period began at step {self.period_start}.")
        self.activations.load_state_dict(state)
