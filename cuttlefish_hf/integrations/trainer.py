"""Hugging Face ``Trainer`` integration: ``CuttlefishCallback`` and ``CuttlefishTrainer``.

``Trainer(callbacks=[CuttlefishCallback(config)])`` runs Cuttlefish in a single process. ``CuttlefishTrainer``
is the entry point for everything else: it adds the callback, re-wraps the model for DDP after the switch
(``Trainer`` keeps the wrapped model in a local variable of its loop, so a callback alone cannot), and keeps
factors out of L2 weight decay in the optimizer it builds, so checkpoints saved after the switch resume.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_callback import ExportableState

from .. import hub
from ..config import CuttlefishConfig
from ..controller import Cuttlefish, SwitchResult
from ..layers import FactorizedLayer
from ..serialization import factorize_for_state_dict_

__all__ = ["CuttlefishCallback", "CuttlefishTrainer"]

logger = logging.getLogger(__name__)


class CuttlefishCallback(TrainerCallback, ExportableState):
    """Measures stable ranks during ``Trainer.train()`` and switches the model to low rank when they settle.

    Example:
        >>> trainer = Trainer(model, args, train_dataset=data, callbacks=[CuttlefishCallback(CuttlefishConfig())])
        >>> trainer.train()  # doctest: +SKIP
    """

    def __init__(self, config: CuttlefishConfig | dict | None = None, saved_controller_state: dict | None = None):
        self.config = CuttlefishConfig.from_dict(config) if isinstance(config, dict) else config or CuttlefishConfig()
        self.saved_controller_state = saved_controller_state
        self.controller: Cuttlefish | None = None
        self.trainer: CuttlefishTrainer | None = None  # set by CuttlefishTrainer
        self._args = None
        self._hooked_models: set[int] = set()

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
                _record_plan(module)

        model.register_load_state_dict_pre_hook(hook)

    def _check_resume_supported(self) -> None:
        args = self._args
        if self.trainer is None and args is not None and args.weight_decay > 0 and \
                self.config.resolved_frobenius_decay > 0:
            raise ValueError("This checkpoint was saved after the Cuttlefish switch with weight_decay > 0 and "
                             "Frobenius decay on: resume it with CuttlefishTrainer(..., cuttlefish_config=config), "
                             "which rebuilds the optimizer with the factors outside L2 weight decay.")

    # -- events -----------------------------------------------------------------------------------------
    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._args = args
        if model is not None:
            self._install_load_hook(model)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None,
                       train_dataloader=None, **kwargs):
        self._args = args
        self._check_setup(args)
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
            return
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

    def on_epoch_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        measured = len(self.controller.measured_steps)
        self._after_switch(self.controller.epoch_end(state.global_step, optimizer, lr_scheduler))
        self._after_measurement(measured)

    def _after_measurement(self, measured_before: int) -> None:
        if self.trainer is not None and len(self.controller.measured_steps) > measured_before:
            self.trainer.cuttlefish_measured(self.controller)

    def _after_switch(self, result: SwitchResult | None) -> None:
        if result is None:
            return
        _record_plan(self.controller.model)
        if self.trainer is not None:
            self.trainer.cuttlefish_switched(result)


def _record_plan(model: nn.Module) -> None:
    """Make every later ``save_pretrained`` (Trainer checkpoints included) carry the factorization plan."""
    if isinstance(model, PreTrainedModel):
        hub.record_plan_(model)


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
        if self.cuttlefish.config.resolved_frobenius_decay <= 0:
            return names
        factors = {f"{name}.{part}.weight" for name, module in model.named_modules()
                   if isinstance(module, FactorizedLayer) for part in ("first", "second")}
        return [name for name in names if name not in factors]

    def cuttlefish_switched(self, result: SwitchResult) -> None:
        """Re-wrap the model for DDP after the switch so the new factors' gradients are synchronized."""
        if self.args.world_size <= 1:
            return
        ddp_kwargs: dict[str, Any] = {"find_unused_parameters": bool(self.args.ddp_find_unused_parameters)}
        if self.args.device.type == "cuda":
            ddp_kwargs["device_ids"] = [self.args.local_rank]
        self._cuttlefish_wrapped = nn.parallel.DistributedDataParallel(self.model, **ddp_kwargs)
        self.model_wrapped = self._cuttlefish_wrapped

    def cuttlefish_measured(self, controller: Cuttlefish) -> None:
        """Log a measurement: two summary scalars everywhere, per-layer curves only to ``report_to`` integrations.

        The per-layer values (one ``cuttlefish/stable_rank/<layer>`` scalar each) skip the console printers so a
        72-layer model does not flood the terminal, and stay out of ``state.log_history``.
        """
        tracker = controller.tracker
        latest = {name: values[-1] for name, values in tracker.history.items()}
        fraction = sum(value / tracker.full_ranks[name] for name, value in latest.items()) / len(latest)
        due = self.control.should_log  # Trainer.log clears it: keep the loss log this step may owe
        self.log({"cuttlefish/stable_rank_fraction": fraction,
                  "cuttlefish/unstable_layers": len(tracker.unstable_layers())})
        self.control.should_log = due
        per_layer = {f"cuttlefish/stable_rank/{name}": value for name, value in latest.items()}
        for callback in self.callback_handler.callbacks:
            if not isinstance(callback, (ProgressCallback, PrinterCallback)):
                callback.on_log(self.args, self.state, self.control, logs=per_layer)

    def create_model_card(self, **kwargs):
        """Trainer's card plus the Cuttlefish section: factorization table, totals, how it was trained."""
        super().create_model_card(**kwargs)
        controller = self.cuttlefish.controller
        if self.is_world_process_zero() and controller is not None and controller.switched:
            summary = controller.summary()
            notes = {key: summary[key]
                     for key in ("mode", "rank_rule", "rank_rule_reason", "switch_step", "switch_epoch")}
            hub.write_model_card(self.model, self.args.output_dir, notes, repo_id=self.hub_model_id)

    def _current_model(self, model: nn.Module) -> nn.Module:
        return self._cuttlefish_wrapped if self._cuttlefish_wrapped is not None else model

    def _run_epoch(self, model, *args, **kwargs):
        return super()._run_epoch(self._current_model(model), *args, **kwargs)

    def training_step(self, model: nn.Module, inputs: dict[str, torch.Tensor | Any], num_items_in_batch=None):
        return super().training_step(self._current_model(model), inputs, num_items_in_batch)
