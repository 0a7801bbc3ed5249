"""Self-distillation after the switch: the dense model at the switch teaches the low-rank model cut from it.

The dense weights are free at the switch; a frozen copy of them (one extra model in memory, one extra
forward pass per training step) pulls the factorized model's predictions back toward what the cut lost while
the task loss keeps training it. It works in any loop whose model computes its own loss (``Trainer``,
Accelerate, plain PyTorch): a forward hook replaces the model's ``loss`` by

    (1 - weight) * loss + weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))

over the last dimension of ``logits`` (a mean squared error for single-output regression heads), in training
mode only. Evaluation and the model's saved weights never see the teacher.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .logging_utils import get_logger

logger = get_logger(__name__)

__all__ = ["SelfDistillation", "distillation_loss"]


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` averaged over all leading positions (the
    squared error for one-output heads), in fp32."""
    student, teacher = student.float(), teacher.float()
    if student.shape[-1] == 1:
        return F.mse_loss(student, teacher)
    log_student = F.log_softmax(student.reshape(-1, student.shape[-1]) / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher.reshape(-1, teacher.shape[-1]) / temperature, dim=-1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean") * temperature ** 2


class SelfDistillation:
    """A frozen copy of ``model`` (taken now) that distills into ``model`` once :meth:`attach` is called.

    Example:
        >>> distillation = SelfDistillation(model, weight=0.5)   # before the switch
        >>> factorize_(model, plan)
        >>> distillation.attach(model)                            # its training losses now include the teacher's
        >>> distillation.close()                                  # at train end: hook and teacher released
    """

    def __init__(self, model: nn.Module, weight: float, temperature: float = 1.0):
        if not 0 < weight <= 1:
            raise ValueError(f"The distillation weight must be in (0, 1], got {weight!r}.")
        self.weight, self.temperature = weight, temperature
        self.teacher: nn.Module | None = copy.deepcopy(model).eval().requires_grad_(False)
        self._handle = None
        self._warned = False

    def attach(self, model: nn.Module) -> None:
        """Start adding the distillation loss to ``model``'s training-mode outputs."""
        if self.teacher is None:
            raise RuntimeError("This SelfDistillation was closed; make a new one.")
        self.close_hook()
        self._handle = model.register_forward_hook(self._hook, with_kwargs=True)

    def close_hook(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def close(self) -> None:
        """Remove the hook and drop the teacher."""
        self.close_hook()
        self.teacher = None

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        if not module.training:
            return output
        if not isinstance(output, Mapping) or output.get("loss") is None or output.get("logits") is None:
            self._warn_once()
            return output
        with torch.no_grad():
            teacher_logits = self.teacher(*args, **kwargs)["logits"]
        kd = distillation_loss(output["logits"], teacher_logits, self.temperature)
        output["loss"] = (1 - self.weight) * output["loss"] + self.weight * kd.to(output["loss"].dtype)
        return output

    def _warn_once(self) -> None:
        if not self._warned:
            self._warned = True
            logger.warning("Cuttlefish self-distillation is on but the model returned no `loss` and `logits` in "
                           "training (labels not in the batch, return_dict=False, or a loss computed outside the "
                           "model such as Trainer's label smoothing or compute_loss_func): these steps train "
                           "without the teacher. Let the model compute its loss, or set distillation=0.")
