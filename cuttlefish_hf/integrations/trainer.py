"""Hugging Face ``Trainer`` integration: ``CuttlefishCallback`` and ``CuttlefishTrainer``.

``Trainer(callbacks=[CuttlefishCallback(config)])`` runs Cuttlefish in a single process. ``CuttlefishTrainer``
is the entry point for everything else: it adds the callback, re-wraps the model for DDP after the switch
(``Trainer`` keeps the wrapped model in a local variable of its loop, so a callback alone cannot), and keeps
factors out of L2 weight decay in the optimizer it builds, so checkpoints saved after the switch resume.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import torch
from accelerate.utils import DynamoBackend
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState, PrinterCallback, ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..config import CuttlefishConfig
from ..controller import Cuttlefish, SwitchResult
from ..hub.card import write_model_card
from ..hub.remote_code import write_remote_code
from ..layers import FactorizedLayer
from ..logging_utils import get_logger
from ..serialization import factorize_for_state_dict_
from ..surgery import factorized_plan, unwrap_compiled

__all__ = ["CuttlefishCallback", "CuttlefishTrainer"]

logger = get_logger(__name__)

STATISTICS_NAME = "cuttlefish_statistics-rank{rank}.pt"


def _log_measurement(trainer: Trainer, controller: Cuttlefish) -> None:
    """Log a measurement: two summary scalars everywhere, per-layer curves only to ``report_to`` integrations.

    The per-layer values (one ``cuttlefish/stable_rank/<layer>`` scalar each) skip the console printers so a
    72-layer model does not flood the terminal, and stay out of ``state.log_history``.
    """
    tracker = controller.tracker
    latest = {name: values[-1] for name, values in tracker.history.items()}
    fraction = sum(value / tracker.full_ranks[name] for name, value in latest.items()) / len(latest)
    due = trainer.control.should_log  # Trainer.log clears it: keep the loss log this step may owe
    # Trainer's own log, not an override: subclasses such as TRL's flush the metrics they accumulate there.
    Trainer.log(trainer, {"cuttlefish/stable_rank_fraction": fraction,
                          "cuttlefish/unstable_layers": len(tracker.unstable_layers())})
    trainer.control.should_log = due
    per_layer = {f"cuttlefish/stable_rank/{name}": value for name, value in latest.items()}
    for callback in trainer.callback_handler.callbacks:
        if not isinstance(callback, (ProgressCallback, PrinterCallback)):
            callback.on_log(trainer.args, trainer.state, trainer.control, logs=per_layer)


def _calling_trainer(callback: TrainerCallback) -> Trainer | None:
    """The ``Trainer`` whose loop is running ``callback``'s event, found up the call stack.

    Events carry no reference to the Trainer, and a callback cannot log without it: ``report_to`` integrations
    sit before the user's callbacks, so values added to ``on_log``'s ``logs`` would reach them too late.
    """
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        handler = getattr(candidate, "callback_handler", None)
        if isinstance(candidate, Trainer) and handler and any(cb is callback for cb in handler.callbacks):
            return candidate
        frame = frame.f_back
    return None


class CuttlefishCallback(TrainerCallback, ExportableState):
    """Runs the :class:`~cuttlefish_hf.controller.Cuttlefish` controller during ``Trainer.train()``: switches the
    model to low rank when the stable ranks settle (or, for pretrained weights, after a fixed fraction of the steps).

    Example:
        >>> trainer = Trainer(model, args, train_dataset=data, callbacks=[CuttlefishCallback(CuttlefishConfig())])
        >>> trainer.train()  # doctest: +SKIP
    """

    def __init__(self, config: CuttlefishConfig | dict | None = None, saved_controller_state: dict | None = None):
        self.config = CuttlefishConfig.from_dict(config) if isinstance(config, dict) else config or CuttlefishConfig()
        self.saved_controller_state = saved_controller_state
        self.controller: Cuttlefish | None = None
        self.trainer: CuttlefishTrainer | None = None  # set by CuttlefishTrainer
        self._logging_trainer: Trainer | None = None  # the Trainer running this callback, plain or not
        self._args = None
        self._hooked_models: set[int] = set()
        self.resume_folder: str | None = None  # set by CuttlefishTrainer when it resumes from a checkpoint

    # -- checkpoints ------------------------------------------------------------------------------------
    def state(self) -> dict:
        controller_state = self.controller.state_dict() if self.controller else self.saved_controller_state
        return {"args": {"config": self.config.to_dict()},
                "attributes": {"saved_controller_state": controller_state}}

    def _restore_from(self, state) -> dict | None:
        if self.saved_controller_state is not None or state.global_step == 0:
            return self.saved_controller_state
        saved = state.stateful_callbacks.get(type(self).__name__)
        saved = saved[0] if isinstance(saved, list) else saved
        return (saved or {}).get("attributes", {}).get("saved_controller_state")

    def _install_load_hook(self, model: nn.Module) -> None:
        """Let ``model.load_state_dict`` rebuild the factorized layers a checkpoint holds (Trainer resume)."""
        if id(model) in self._hooked_models:
            return
        self._hooked_models.add(id(model))

        def hook(module, state_dict, prefix, *_):
            if prefix == "" and factorize_for_state_dict_(module, state_dict, extra_bn=self.config.resolved_extra_bn):
                self._check_resume_supported()

        model.register_load_state_dict_pre_hook(hook)

    def _check_resume_supported(self) -> None:
        self._refuse_factors_under_weight_decay("This checkpoint was saved after the Cuttlefish switch")

    def _refuse_factors_under_weight_decay(self, situation: str) -> None:
        """A plain ``Trainer`` builds its optimizer with factors under L2 weight decay, which Frobenius decay
        replaces; only CuttlefishTrainer builds it the way the switch leaves it."""
        args = self._args
        if self.trainer is None and args is not None and args.weight_decay > 0 and \
                self.config.resolved_frobenius_decay > 0:
            raise ValueError(f"{situation}, with weight_decay > 0 and Frobenius decay on: train it with "
                             "CuttlefishTrainer(..., cuttlefish_config=config), which builds the optimizer with the "
                             "factors outside L2 weight decay (or set weight_decay=0).")

    def _statistics_file(self, folder: str) -> str:
        rank = torch.distributed.get_rank() if torch.distributed.is_available() and \
            torch.distributed.is_initialized() else 0
        return os.path.join(folder, STATISTICS_NAME.format(rank=rank))

    def on_save(self, args, state, control, **kwargs):
        # The activation-aware rule's input statistics are tensors (too large for trainer_state.json): each
        # process writes its own next to the checkpoint, so a resume in the middle of a period is exact.
        statistics = self.controller.statistics_state() if self.controller else None
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if statistics is not None and os.path.isdir(folder):
            torch.save(statistics, self._statistics_file(folder))

    def _restore_statistics(self, args, state) -> None:
        controller = self.controller
        if controller.activations is None or state.global_step == controller.period_start:
            return  # nothing recorded in this period yet: restarting the statistics loses nothing
        folders = [self.resume_folder, args.resume_from_checkpoint,
                   os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")]
        files = [self._statistics_file(f) for f in folders if isinstance(f, str) and os.path.isdir(f)]
        found = next((f for f in files if os.path.isfile(f)), None)
        if found is None:
            logger.warning("Cuttlefish resumed at step %d, in the middle of a measurement period (from step %d), "
                           "without that period's input statistics (%s not in the checkpoint): the activation-aware "
                           "rule records them again from here, so the factors at the switch may differ from an "
                           "uninterrupted run's.", state.global_step, controller.period_start,
                           STATISTICS_NAME.format(rank=0))
            return
        controller.load_statistics_state(torch.load(found, weights_only=True))
        logger.info("Cuttlefish restored the input statistics recorded since step %d from %s.",
                    controller.period_start, found)

    # -- events -----------------------------------------------------------------------------------------
    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._args = args
        if model is not None:
            self._install_load_hook(model)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None,
                       train_dataloader=None, **kwargs):
        self._args = args
        self._check_setup(args)
        self._logging_trainer = self.trainer or _calling_trainer(self)
        steps_per_epoch = None
        if train_dataloader is not None and state.num_train_epochs:
            steps_per_epoch = max(1, round(state.max_steps / state.num_train_epochs))
        self.controller = Cuttlefish(model, self.config, total_steps=state.max_steps,
                                     steps_per_epoch=steps_per_epoch,
                                     exclude_factors_from_weight_decay=True)
        self.controller.log_level = logging.WARNING  # Trainer shows warnings by default; the summary matters
        saved = self._restore_from(state)
        if saved is not None:
            self.controller.load_state_dict(saved)
            if self.controller.switched:
                self.controller.attach_hooks(optimizer, state.global_step)
            logger.info("Cuttlefish state restored from the checkpoint (%d measurements, switched: %s).",
                        len(self.controller.measured_steps), self.controller.switched)
            self._restore_statistics(args, state)
            return
        if self.controller.factorized_before_training:
            self._refuse_factors_under_weight_decay("The model holds factorized layers")
        self._after_switch(self.controller.begin(optimizer, lr_scheduler))

    def _check_setup(self, args) -> None:
        if args.fsdp:
            raise ValueError("Cuttlefish does not support FSDP yet: train without --fsdp (DDP works with "
                             "CuttlefishTrainer).")
        if args.deepspeed:
            raise ValueError("Cuttlefish does not support DeepSpeed yet: train without --deepspeed (DDP works "
                             "with CuttlefishTrainer).")
        if args.world_size > 1 and self.trainer is None:
            raise ValueError("Multi-process training needs the model re-wrapped after the switch: use "
                             "CuttlefishTrainer(..., cuttlefish_config=config) instead of Trainer(callbacks=[...]).")

    def on_step_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        measured = len(self.controller.measured_steps)
        self._after_switch(self.controller.step_end(state.global_step, optimizer, lr_scheduler))
        self._after_measurement(measured)

    def on_train_end(self, args, state, control, **kwargs):
        if self.controller is not None:
            self.controller.report_speed()  # runs shorter than SPEED_REPORT_STEPS low-rank steps

    def on_epoch_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        measured = len(self.controller.measured_steps)
        self._after_switch(self.controller.epoch_end(state.global_step, optimizer, lr_scheduler))
        self._after_measurement(measured)

    def _after_measurement(self, measured_before: int) -> None:
        if self._logging_trainer is not None and len(self.controller.measured_steps) > measured_before:
            _log_measurement(self._logging_trainer, self.controller)

    def _after_switch(self, result: SwitchResult | None) -> None:
        if result is None:
            return
        if self.trainer is not None:
            self.trainer.cuttlefish_switched(result)


class CuttlefishTrainer(Trainer):
    """A ``Trainer`` with Cuttlefish built in; the one entry point for DDP runs and resumed checkpoints.

    Example:
        >>> trainer = CuttlefishTrainer(model=model, args=args, train_dataset=data,
        ...                             cuttlefish_config=CuttlefishConfig())  # doctest: +SKIP
    """

    def __init__(self, *args, cuttlefish_config: CuttlefishConfig | None = None, **kwargs):
        self.cuttlefish = CuttlefishCallback(cuttlefish_config)
        self.cuttlefish.trainer = self
        self._cuttlefish_wrapped: nn.Module | None = None
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), self.cuttlefish]
        super().__init__(*args, **kwargs)

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        names = super().get_decay_parameter_names(model)
        # Mirror replace_parameters_: at the switch the factors leave the decay group only when it has
        # weight_decay > 0 (with weight_decay=0 they stay in it), so a resumed optimizer has the same groups.
        if self.cuttlefish.config.resolved_frobenius_decay <= 0 or self.args.weight_decay == 0:
            return names
        factors = {f"{name}.{part}.weight" for name, module in model.named_modules()
                   if isinstance(module, FactorizedLayer) for part in ("first", "second")}
        return [name for name in names if name not in factors]

    def cuttlefish_switched(self, result: SwitchResult) -> None:
        """Re-wrap the model for DDP after the switch so the new factors' gradients are synchronized (and
        compile the wrapper again under ``torch_compile=True``)."""
        if self.args.world_size <= 1:
            return
        ddp_kwargs: dict[str, Any] = {"find_unused_parameters": bool(self.args.ddp_find_unused_parameters)}
        if self.args.device.type == "cuda":
            ddp_kwargs["device_ids"] = [self.args.local_rank]
        wrapped = nn.parallel.DistributedDataParallel(self.model, **ddp_kwargs)
        dynamo = self.accelerator.state.dynamo_plugin
        if dynamo.backend != DynamoBackend.NO:  # torch_compile=True: Accelerate compiled the DDP wrapper; so do we
            wrapped = torch.compile(wrapped, **dynamo.to_kwargs())
        self._cuttlefish_wrapped = self.model_wrapped = wrapped

    def create_model_card(self, **kwargs):
        """Trainer's card plus the Cuttlefish section: factorization table, totals, how it was trained."""
        super().create_model_card(**kwargs)
        controller = self.cuttlefish.controller
        if self.is_world_process_zero() and controller is not None and controller.switched:
            summary = controller.summary()
            notes = {key: summary[key]
                     for key in ("mode", "rank_rule", "rank_rule_reason", "switch_step", "switch_epoch")}
            write_model_card(self.model, self.args.output_dir, notes, repo_id=self.hub_model_id)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Trainer's save, plus ``modeling_cuttlefish.py`` and ``auto_map`` (the card's trust_remote_code route)."""
        super()._save(output_dir, state_dict)
        model = unwrap_compiled(self.accelerator.unwrap_model(self.model))
        if self.args.should_save and isinstance(model, PreTrainedModel) and factorized_plan(model):
            write_remote_code(model, output_dir or self.args.output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        self.cuttlefish.resume_folder = checkpoint
        super()._load_optimizer_and_scheduler(checkpoint)

    def _current_model(self, model: nn.Module) -> nn.Module:
        return self._cuttlefish_wrapped if self._cuttlefish_wrapped is not None else model

    def _run_epoch(self, model, *args, **kwargs):
        return super()._run_epoch(self._current_model(model), *args, **kwargs)

    def training_step(self, model: nn.Module, inputs: dict[str, torch.Tensor | Any], num_items_in_batch=None):
        return super().training_step(self._current_model(model), inputs, num_items_in_batch)
