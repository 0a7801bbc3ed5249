"""``Cuttlefish``: the measure -> decide -> switch loop that every integration calls.

A small state machine: ``begin`` resolves the method once (:func:`~cuttlefish_hf.planning.resolve_method`),
``step_end`` / ``epoch_end`` measure stable ranks at the measurement points until the tracker says they
settled or a warm-up bound is reached, and ``switch`` applies :func:`~cuttlefish_hf.planning.plan_switch`'s
decisions with the chosen factor init, keeping the optimizer's state. Deciding is pure (``planning``); here
live the model, the optimizer, DDP agreement and the :class:`~cuttlefish_hf.timings.Timings` record. (The
module is longer than the house's ~400 lines because the state machine and the checkpoint of its state - what
a resume must restore exactly - are kept in one place.)

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

import logging
import math
import time
from dataclasses import astuple, dataclass, field
from typing import Any

import torch
from torch import nn

from .compilation import graphs_compiled
from .config import LEGACY_RANK_RULES, CuttlefishConfig
from .inits import make_init
from .layers import FactorizedLayer, dense_matrix, dense_shape, full_rank, is_linear
from .logging_utils import get_logger
from .optim import attach_frobenius_decay, attach_rewarmup, attach_step_scale, replace_parameters_
from .planning import (Method, forced_switch_step, keep_dense, plan_switch, resolve_method, schedule_warnings,
                       select_targets)
from .profiling import ProfileReport, profile_layers
from .rank_rules import RANK_RULES, RankDecision
from .stable_rank import StableRankMeter, check_finite, stable_ranks
from .statistics import ActivationStats
from .surgery import FactorizationReport, factorization_report, factorize_, unwrap_compiled
from .timings import Timings
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
        model: the unwrapped model (not a DDP wrapper; a ``torch.compile`` wrapper is looked through).
        config: the method's settings.
        total_steps: planned optimizer steps, for ``max_warmup_fraction`` and Pufferfish's fixed warm-up.
        steps_per_epoch: optimizer steps per epoch, to turn per-epoch measurement into a step count.
        exclude_factors_from_weight_decay: put factors in a ``weight_decay=0`` optimizer group when
            Frobenius decay is on (integrations that rebuild optimizers themselves may turn this off).
    """

    def __init__(self, model: nn.Module, config: CuttlefishConfig, *, total_steps: int | None = None,
                 steps_per_epoch: int | None = None, exclude_factors_from_weight_decay: bool = True) -> None:
        self.model = unwrap_compiled(model)
        self.config = config
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.exclude_factors_from_weight_decay = exclude_factors_from_weight_decay
        self.targets = select_targets(self.model, config)
        modules = dict(self.model.named_modules())
        self.full_ranks = {name: full_rank(modules[name]) for name in self.targets}
        self.meter = StableRankMeter(n_iter=config.power_iterations, seed=config.power_iteration_seed)
        self.tracker = StableRankTracker(
            self.full_ranks, window=config.window, eps_relative=config.eps_relative, ema_decay=config.ema_decay,
            min_measurements=config.min_warmup_measurements)
        self.measured_steps: list[int] = []
        self.init_stable_ranks: dict[str, float] | None = None
        self.method: Method | None = None  # resolved once, at begin()
        self.activations: ActivationStats | None = None  # input statistics for the whitened init
        self._steps_to_record: int | None = None  # fixed warm-up: steps recorded before the switch
        self.switch_step: int | None = None
        self.report: FactorizationReport | None = None
        self.decisions: list[RankDecision] = []
        self.profile_report: ProfileReport | None = None  # skip_first_blocks="auto": the timings (rank 0)
        self.timings = Timings()
        self._last_step_end: float | None = None
        self._speed_reported = False
        self._hooks: list = []
        self._graphs_at = {"start": graphs_compiled(), "switch": None}  # torch.compile's count, per phase
        self.log_level = logging.INFO  # integrations whose users see only warnings raise this
        self.factorized_before_training = any(isinstance(m, FactorizedLayer) for m in self.model.modules())
        if self.factorized_before_training:  # trains on as switched: no second switch
            self.switch_step = 0
            self.report = factorization_report(self.model)
            scale = config.resolved_factor_lr_scale
            self.method = Method("none", "none", "none", "the model was already factorized when training began",
                                 factor_lr_scale=1.0 if scale == "auto" else scale)

    # -- what the config names ------------------------------------------------------------------------
    def _measurement_period(self) -> int | None:
        return self.config.measure_every_steps or self.steps_per_epoch

    def _weights(self) -> dict[str, torch.Tensor]:
        """Each target's ``(out, in*k*k)`` matrix (a view; a Conv1D's weight is stored transposed)."""
        modules = dict(self.model.named_modules())
        return {name: dense_matrix(modules[name]) for name in self.targets}

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        modules = dict(self.model.named_modules())
        return {name: dense_shape(modules[name]) for name in self.targets}

    @property
    def rank_rule(self) -> str | None:
        return self.method.rank_rule if self.method else None

    @property
    def rank_rule_reason(self) -> str:
        return self.method.reason if self.method else ""

    @property
    def decided(self) -> bool:
        """The switch point has passed: nothing is measured any more (the model may have stayed dense)."""
        return self.switch_step is not None

    @property
    def switched(self) -> bool:
        """The model trains with factorized layers."""
        return self.decided and bool(self.report and self.report.layers)

    # -- the states -----------------------------------------------------------------------------------
    def begin(self, optimizer=None, scheduler=None) -> SwitchResult | None:
        """Call once before training: snapshots ``srank(W_0)``, resolves the method (starting the input
        statistics the whitened init needs); SI&FD mode switches here (step 0). A model factorized before
        training gets its factors' Frobenius decay (and a weight-decay-free group) here instead."""
        if self.decided:
            if self.factorized_before_training:
                logger.log(self.log_level, "Cuttlefish: the model already holds %d factorized layers; training goes "
                           "on at their ranks (no second switch; dense layers stay dense).", len(self.report.layers))
                if optimizer is not None:
                    self._adopt_factors(optimizer, scheduler)
            return None
        self._resolve_method()
        warnings = schedule_warnings(self.config, total_steps=self.total_steps, forced_step=self._forced_step(),
                                     measurement_period=self._measurement_period(), shapes=self._shapes(),
                                     warmup=self.method.warmup)
        for message in warnings:
            logger.warning(message)
        self._start_recording()
        if self.config.mode == "si_fd":
            return self.switch(0, optimizer, scheduler)
        return None

    def _resolve_method(self) -> None:
        """Snapshot ``srank(W_0)`` and resolve the method, once."""
        if self.init_stable_ranks is None:
            weights = self._weights()
            check_finite(weights, "training")
            self.init_stable_ranks = dict(zip(weights, stable_ranks(list(weights.values()))))
        if self.method is None:
            self.method = resolve_method(self.config, self.init_stable_ranks, self._shapes())
            when = {"fixed": f"after fixed_warmup_fraction={self.config.fixed_warmup_fraction:g} of the steps",
                    "stable_ranks": "once the stable ranks settle"}[self.method.warmup]
            scale = self.method.factor_lr_scale
            logger.log(self.log_level, "Cuttlefish will switch %s, choose ranks with the %s rule and start the "
                       "factors from the %s init%s (%s).", when if self.config.mode == "cuttlefish" else
                       f"as {self.config.mode} mode does", self.method.rank_rule, self.method.init,
                       f", their steps scaled by {scale:g}" if scale != 1 else "", self.method.reason)

    def _start_recording(self) -> None:
        """Hook the Linear targets to record their inputs' second moments, if the init needs them."""
        if self.method.records_inputs and not self.decided and self.activations is None:
            stats = ActivationStats(max_tokens=self.config.activation_tokens)
            self.activations = stats.start(self.model, self._linear_targets())

    def _linear_targets(self) -> list[str]:
        modules = dict(self.model.named_modules())
        return [name for name in self.targets if is_linear(modules[name])]

    def _adopt_factors(self, optimizer, scheduler) -> None:
        """Give a model factorized before training what the switch gives new factors: no L2 weight decay
        while Frobenius decay is on, and the Frobenius-decay (and re-warm-up) hooks."""
        if self.config.resolved_frobenius_decay > 0 and self.exclude_factors_from_weight_decay:
            replace_parameters_(optimizer, self.model, {p: [p] for p in self._trainable_factors()},
                                scheduler=scheduler, zero_weight_decay=True)
        self.attach_hooks(optimizer)

    def measure(self) -> dict[str, float]:
        """Measure every target's stable rank now (batched power iteration) and record it."""
        start = time.perf_counter()
        ranks = self.meter.measure(self._weights())
        self.timings.measure_seconds += time.perf_counter() - start
        return ranks

    def _steps_left(self, step: int) -> bool:
        """Whether training goes on after ``step``: a switch at the last step would leave an untrained model."""
        return self.total_steps is None or step < self.total_steps

    def _forced_step(self) -> int | None:
        return forced_switch_step(self.config, self.total_steps, self.method.warmup if self.method else "stable_ranks")

    def _bound_reached(self, step: int) -> bool:
        forced = self._forced_step()
        return forced is not None and step >= forced and self._steps_left(step)

    def _on_measurement_point(self, step: int, optimizer, scheduler) -> SwitchResult | None:
        if self.decided:
            return None
        if self.init_stable_ranks is None:
            self.begin()
        stable_ranks_now = self.measure()
        self.tracker.update(stable_ranks_now)
        self.measured_steps.append(step)
        settled = self.config.mode == "cuttlefish" and _from_rank_zero(self.tracker.should_switch())
        if settled and not self._steps_left(step):
            logger.warning("Cuttlefish: the stable ranks settled only at the last step (%d); no step is left to "
                           "train at low rank, so the model stays dense.", step)
        if self._bound_reached(step) or (settled and self._steps_left(step)):
            return self.switch(step, optimizer, scheduler, stable_ranks_now=stable_ranks_now)
        if self.activations is not None:
            self.activations.reset()  # the switch uses the statistics of the period just before it
        return None

    def step_end(self, step: int, optimizer=None, scheduler=None) -> SwitchResult | None:
        """Call after each optimizer step (``step`` = optimizer steps done). Returns the switch, if it happened."""
        now = time.perf_counter()
        if self._last_step_end is not None:
            self.timings.step_intervals["low_rank" if self.switched else "dense"].append(now - self._last_step_end)
        try:
            return self._step_end(step, optimizer, scheduler)
        finally:
            self._last_step_end = time.perf_counter()  # the next interval excludes measuring and the switch

    @property
    def _fixed_warmup(self) -> bool:
        """``warmup="fixed"``: the switch comes at the bound, with no stable-rank measurements before it."""
        return self.method is not None and self.method.warmup == "fixed" and self.config.mode == "cuttlefish"

    def _rearm_statistics(self, step: int) -> None:
        """Fixed warm-up: the first step's inputs tell how many steps ``activation_tokens`` take (``k``, one
        spare); recording then pauses until ``k`` steps before the switch, so the whitened init sees the inputs
        of the model it factorizes and the products run on ``k + 1`` steps only. Idempotent (resumes)."""
        stats, forced = self.activations, self._forced_step()
        if stats is None or forced is None:
            return
        if self._steps_to_record is None:
            self._steps_to_record = math.ceil(self.config.activation_tokens / max(stats.fewest_tokens, 1)) + 1
        wanted = step >= forced - self._steps_to_record
        if wanted != stats.collecting:
            stats.stop().reset()
            if wanted:
                stats.start(self.model, self._linear_targets())

    def _step_end(self, step: int, optimizer, scheduler) -> SwitchResult | None:
        if self.decided:
            if not self._speed_reported and len(self.timings.step_intervals["low_rank"]) >= SPEED_REPORT_STEPS:
                self.report_speed()
            return None
        if self._fixed_warmup:
            self._rearm_statistics(step)
            return self.switch(step, optimizer, scheduler) if self._bound_reached(step) else None
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
        if self.decided or self.config.measure_every_steps or self._fixed_warmup:
            return None
        return self._on_measurement_point(step, optimizer, scheduler)

    # -- the switch -----------------------------------------------------------------------------------
    def decide(self, *, stable_ranks_now: dict[str, float] | None = None) -> list[RankDecision]:
        """Each target's rank under the resolved rank rule, from the weights now (rank 0's under DDP). Rules
        that read no spectrum take no SVD: the report's stable ranks are ``stable_ranks_now`` (the meter's, when
        it has just measured these weights), those at train begin after a fixed warm-up (which measures nothing;
        a measurement for the report alone cost 0.3-0.5% of the MiniLM fine-tune), else a new measurement."""
        self._resolve_method()
        weights = self._weights()
        check_finite(weights, "choosing ranks")
        measured = None
        if not RANK_RULES[self.method.rank_rule].reads_spectrum:
            if stable_ranks_now is None and self._fixed_warmup:
                stable_ranks_now = self.init_stable_ranks
            measured = self.measure() if stable_ranks_now is None else stable_ranks_now
        return _from_rank_zero(plan_switch(weights, self.config, self.method,
                                           init_stable_ranks=self.init_stable_ranks, measured_stable_ranks=measured))

    def _recorded_covariances(self) -> dict[str, torch.Tensor]:
        """The recorded input covariances, summed over processes (collective: every process switches together);
        stops the recording."""
        if not self.method.records_inputs:
            return {}
        stats, self.activations = self.activations, None
        covariances = {}
        if stats is not None:
            stats.stop()
            stats.all_reduce_()
            self.timings.statistics_seconds += stats.seconds
            covariances = {name: stats.covariance(name) for name in stats.names if stats.count(name) > 0}
        if not covariances:
            logger.warning("Cuttlefish recorded no layer inputs before the switch (call begin() before training); "
                           "the whitened init falls back to plain SVD factors.")
        return covariances

    def switch(self, step: int, optimizer=None, scheduler=None, *,
               stable_ranks_now: dict[str, float] | None = None) -> SwitchResult:
        """Factorize now: decide ranks, swap the layers, and update ``optimizer`` without losing state
        (``stable_ranks_now``: see :meth:`decide`).

        When no layer is worth factorizing the model stays dense (with a warning) and nothing is measured
        any more; :attr:`switched` stays False."""
        if self.decided:
            raise RuntimeError("Cuttlefish already made its switch decision for this model.")
        start = time.perf_counter()
        self._resolve_method()
        covariances = self._recorded_covariances()  # before profiling runs layers
        self.decisions = self.decide(stable_ranks_now=stable_ranks_now)
        if self.config.resolved_skip_first_blocks == "auto":
            self.decisions = keep_dense(self.decisions, self._slow_layers(self.decisions))
        plan = {d.name: d.rank for d in self.decisions if d.factorize}
        old = {name: self.model.get_submodule(name).weight for name in plan}
        init = make_init(self.method.init, covariances=covariances)
        self.report = factorize_(self.model, plan, init=init, extra_bn=self.config.resolved_extra_bn,
                                 stable_ranks={d.name: d.stable_rank for d in self.decisions})
        self.switch_step = step
        self._graphs_at["switch"] = graphs_compiled()
        # Nothing factorized: no optimizer change, no Frobenius decay or re-warm-up hooks on a dense model.
        result = self._swap_in_optimizer(step, optimizer, scheduler, old) if plan else \
            SwitchResult(step, self.report, self.decisions)
        self.timings.surgery_seconds = time.perf_counter() - start
        self._log_switch(step, plan)
        return result

    def _slow_layers(self, decisions: list[RankDecision]) -> list[str]:
        """``skip_first_blocks="auto"``: time the planned layers (rank 0 only, under DDP; compiled when
        torch.compile compiled graphs since ``begin``); the ones whose factorization is not faster by
        ``profile_margin``."""
        config = self.config
        slow = None
        if not _distributed() or torch.distributed.get_rank() == 0:
            self.profile_report = profile_layers(
                self.model, {d.name: d.rank for d in decisions if d.factorize},
                tokens_per_batch=config.profile_tokens_per_batch, margin=config.profile_margin,
                dtype=getattr(torch, config.profile_dtype) if config.profile_dtype else None,
                extra_bn=config.resolved_extra_bn, compiled=graphs_compiled() > self._graphs_at["start"])
            self.timings.profile_seconds = self.profile_report.seconds
            logger.log(self.log_level, "Cuttlefish timed the planned layers (skip_first_blocks='auto'):\n%s",
                       self.profile_report)
            if self.profile_report.faults:
                logger.warning("Cuttlefish: %d layers timed faster than their FLOP ideal (%s); the keep-dense "
                               "decisions rest on noisy timings. Profile on a quiet machine, or set "
                               "skip_first_blocks to a number.", len(self.profile_report.faults),
                               ", ".join(self.profile_report.faults[:3]))
            slow = self.profile_report.keep_dense
        return _from_rank_zero(slow)

    def _log_switch(self, step: int, plan: dict[str, int]) -> None:
        epoch = f" (epoch {step / self.steps_per_epoch:.2f})" if self.steps_per_epoch else ""
        if not plan:
            kept = "profiling found none faster" if self.profile_report else "no rank saves parameters"
            logger.warning("Cuttlefish decided at step %d%s not to factorize: of %d target layers, %s (%s rule: %s). "
                           "Training goes on dense; lower rank_ratio / kind_fractions, or widen target_modules.",
                           step, epoch, len(self.decisions), kept, self.rank_rule, self.rank_rule_reason)
            return
        t = self.timings
        after = f"after {len(self.measured_steps)} measurements"
        if self._fixed_warmup:
            after = "(warmup='fixed'; the table's stable ranks are those at train begin)" \
                if not RANK_RULES[self.method.rank_rule].reads_spectrum else "(warmup='fixed')"
        logger.log(self.log_level, "Cuttlefish switched to low rank at step %d%s %s (%s mode, %s rule, %s init: %s); "
                   "measuring took %.2fs in all, the switch %.2fs (profiling %.2fs of it).\n%s",
                   step, epoch, after, self.config.mode, self.rank_rule, self.method.init,
                   self.rank_rule_reason, t.measure_seconds, t.surgery_seconds, t.profile_seconds, self.report)

    def _factorized_modules(self) -> dict[str, FactorizedLayer]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, FactorizedLayer)}

    def _trainable_factors(self) -> list[nn.Parameter]:
        return [p for module in self._factorized_modules().values() for p in
                (module.first.weight, module.second.weight) if p.requires_grad]

    def _swap_in_optimizer(self, step: int, optimizer, scheduler, old: dict[str, nn.Parameter]) -> SwitchResult:
        factorized = self._factorized_modules()
        replacements = {old[name]: [q for q in (factorized[name].first.weight, factorized[name].second.weight)
                                    if q.requires_grad] for name in old}
        if optimizer is not None:
            replace_parameters_(optimizer, self.model, replacements, scheduler=scheduler,
                                zero_weight_decay=self.config.resolved_frobenius_decay > 0
                                and self.exclude_factors_from_weight_decay)
            self.attach_hooks(optimizer)
        new_parameters = [p for params in replacements.values() for p in params]
        return SwitchResult(step, self.report, self.decisions, new_parameters, list(replacements))

    def attach_hooks(self, optimizer, step: int | None = None) -> None:
        """Attach Frobenius decay (and the optional re-warm-up and factor step scale) to ``optimizer``; after a
        resume pass the optimizer steps done (``step``) so the re-warm-up continues where it stopped."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        decay = self.config.resolved_frobenius_decay
        if decay > 0:
            self._hooks.append(attach_frobenius_decay(optimizer, self._factorized_modules().values(), decay))
        if self.config.rewarmup_steps:
            done = 0 if step is None or self.switch_step is None else step - self.switch_step
            self._hooks.extend(attach_rewarmup(optimizer, self.config.rewarmup_steps, done=done))
        if self.method.factor_lr_scale != 1:
            self._hooks.extend(attach_step_scale(optimizer, self._trainable_factors(), self.method.factor_lr_scale))

    # -- reporting and checkpoints ----------------------------------------------------------------------
    def step_times(self) -> dict[str, float | None]:
        """See :meth:`cuttlefish_hf.timings.Timings.step_times`."""
        return self.timings.step_times(self.report)

    def report_speed(self) -> None:
        """Say (once) whether the switch paid: the low-rank steps' median time against the dense phase's and
        the FLOP ideal, with a warning naming the likely cause when low rank is slower. ``step_end`` calls it
        after :data:`SPEED_REPORT_STEPS` low-rank steps; integrations call it at train end for shorter runs."""
        if self._speed_reported or not self.switched:
            return
        verdict = self.timings.speed_verdict(self.report, on_gpu=any(p.is_cuda for p in self.model.parameters()))
        if verdict is None:
            return
        self._speed_reported = True
        faster, message = verdict
        recompiled = self.compiled_graphs()["low_rank"]
        if recompiled:
            message = f"{message.rstrip('.')}. torch.compile compiled {recompiled} graph(s) since the switch (the " \
                      "factorized model's)."
        logger.log(self.log_level if faster else logging.WARNING, message)

    def compiled_graphs(self) -> dict[str, int | None]:
        """Graphs ``torch.compile`` compiled in this process before and since the switch (0 without compile;
        evaluation graphs included; after a resume, counted from the resume)."""
        start, switch, now = self._graphs_at["start"], self._graphs_at["switch"], graphs_compiled()
        return {"dense": (now if switch is None else switch) - start,
                "low_rank": None if switch is None else now - switch}

    def summary(self) -> dict[str, Any]:
        """A JSON-ready summary: switch point, plan, parameter counts, step times and time spent."""
        report = self.report
        return {
            **self.step_times(),
            "mode": self.config.mode,
            "rank_rule": self.rank_rule or self.config.resolved_rank_rule,
            "init": self.method.init if self.method else self.config.resolved_init,
            "warmup": self.method.warmup if self.method else self.config.warmup,
            "factor_lr_scale": self.method.factor_lr_scale if self.method else self.config.factor_lr_scale,
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
            **self.timings.state_dict(),
            "profile_kept_dense": self.profile_report.keep_dense if self.profile_report else [],
            **{f"compiled_graphs_{phase}": count for phase, count in self.compiled_graphs().items()},
        }

    def state_dict(self) -> dict[str, Any]:
        method = self.method
        return {
            "tracker": self.tracker.state_dict(),
            "measured_steps": list(self.measured_steps),
            "init_stable_ranks": self.init_stable_ranks,
            "method": None if method is None else list(astuple(method)),
            "switch_step": self.switch_step,
            "steps_to_record": self._steps_to_record,
            "recording_paused": self.activations is not None and not self.activations.collecting,
            "factorized_before_training": self.factorized_before_training,
            "report": self.report.to_dict() if self.report else None,
            **self.timings.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore progress. After the switch, the model must already hold the factorized layers."""
        self.tracker.load_state_dict(state["tracker"])
        self.measured_steps = list(state["measured_steps"])
        self.init_stable_ranks = state["init_stable_ranks"]
        # Checkpoints of 0.1 saved only the rule ("activation_aware" meant the whitened init too).
        legacy = state.get("rank_rule")
        if state.get("method"):
            self.method = Method(*state["method"])
        elif legacy:
            rule, init = LEGACY_RANK_RULES.get(legacy, (legacy, "svd"))
            self.method = Method(rule, init, self.config.xi_reference, state.get("rank_rule_reason", ""))
        self.timings.load_state_dict(state)
        self.switch_step = state["switch_step"]
        if self.switch_step is not None:  # resumed after the switch: every graph from here is a low-rank one
            self._graphs_at["switch"] = self._graphs_at["start"]
        self._steps_to_record = state.get("steps_to_record")
        self.factorized_before_training = state.get("factorized_before_training", False)
        self.report = None if state["report"] is None else FactorizationReport.from_dict(state["report"])
        present = {n: m.rank for n, m in self._factorized_modules().items()}
        if present != (self.report.plan if self.report else {}):
            raise ValueError("The model's factorized layers do not match the saved Cuttlefish plan; load the "
                             "checkpoint's weights into the model before restoring the controller.")
        if not self.decided and self.init_stable_ranks is not None:  # resumed in the warm-up: go on as begin()
            # Input statistics restart empty; restore the period's with load_statistics_state (checkpoints that
            # the Trainer integration writes hold them).
            self._resolve_method()
            self._start_recording()
            if state.get("recording_paused") and self.activations is not None:  # fixed warm-up, before its window
                self.activations.stop()

    @property
    def period_start(self) -> int:
        """The step where the current measurement period (and its input statistics) began."""
        return self.measured_steps[-1] if self.measured_steps else 0

    def statistics_state(self) -> dict[str, Any] | None:
        """This process's input statistics of the current period (whitened init), or None."""
        if self.activations is None:
            return None
        return {"period_start": self.period_start, **self.activations.state_dict()}

    def load_statistics_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`statistics_state` after :meth:`load_state_dict`, so a resume in the middle of a period
        switches with the same factors as an uninterrupted run."""
        if self.activations is None:
            raise ValueError("No input statistics are being recorded (not the whitened init, or after the "
                             "switch); there is nothing to restore them into.")
        if state["period_start"] != self.period_start:
            raise ValueError(f"The saved input statistics belong to the period from step {state['period_start']}, "
                             f"but the restored controller's period began at step {self.period_start}.")
        self.activations.load_state_dict(state)
