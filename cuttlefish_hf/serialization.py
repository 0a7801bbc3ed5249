"""Rebuild the factorized architecture a saved state dict describes, before its weights are loaded."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .layers import is_factorizable
from .surgery import factorize_

__all__ = ["plan_from_state_dict", "factorize_for_state_dict_", "factor_ranks"]

_FIRST = ".first.weight"


def plan_from_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, int], bool]:
    """``({module name: rank}, extra_bn)`` for the dense modules of ``model`` that ``state_dict`` holds as factors.

    The rank is read from the shape of each ``<name>.first.weight``, so nothing else needs to be saved.
    """
    modules = dict(model.named_modules())
    plan, extra_bn = {}, False
    for key, tensor in state_dict.items():
        if not key.endswith(_FIRST):
            continue
        name = key[: -len(_FIRST)]
        if is_factorizable(modules.get(name)):
            plan[name] = int(tensor.shape[0])
            extra_bn = extra_bn or f"{name}.middle.running_mean" in state_dict
    return plan, extra_bn


def factorize_for_state_dict_(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                              extra_bn: bool = False) -> bool:
    """Factorize (without SVD) the layers ``state_dict`` stores as factors; True if any was."""
    plan, saved_extra_bn = plan_from_state_dict(model, state_dict)
    if plan:
        factorize_(model, plan, extra_bn=extra_bn or saved_extra_bn, init="empty")
    return bool(plan)


def factor_ranks(shapes: Mapping[str, Sequence[int]]) -> tuple[dict[str, int], bool]:
    """``({name: rank}, extra_bn)`` read from the tensor shapes of a saved state dict, without a model.

    A factorized layer is a ``<name>.first.weight`` with a ``<name>.second.weight`` beside it; names are as saved
    (a loader may rename them), and the rank is the first dimension of ``first``.
    """
    ranks, extra_bn = {}, False
    for key, shape in shapes.items():
        if key.endswith(_FIRST) and f"{key[: -len(_FIRST)]}.second.weight" in shapes:
            name = key[: -len(_FIRST)]
            ranks[name] = int(shape[0])
            extra_bn = extra_bn or f"{name}.middle.running_mean" in shapes
    return ranks, extra_bn
