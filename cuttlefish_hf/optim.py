"""Keep the optimizer whole across the switch.

The reference code throws the optimizer away at the switch (momentum and Adam moments lost) and restarts the
warm-up. Here only the replaced weights leave the optimizer; every other parameter keeps its state, the new
factors start with fresh state, and the learning-rate schedule is not touched. Frobenius decay and the
optional re-warm-up are optimizer step hooks, so they see unscaled gradients under a GradScaler and work in
any training loop.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from .layers import FactorizedLayer

__all__ = ["unwrap_optimizer", "replace_parameters_", "attach_frobenius_decay", "attach_rewarmup",
           "attach_step_scale"]


def unwrap_optimizer(optimizer) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` inside wrappers such as Accelerate's ``AcceleratedOptimizer``."""
    # AcceleratedOptimizer subclasses Optimizer yet holds its state and hooks in ``.optimizer``; plain
    # (non-Optimizer) wrappers may also nest, so keep following ``.optimizer`` through those.
    while True:
        inner = getattr(optimizer, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer) or (
                inner is not None and inner is not optimizer and not isinstance(optimizer, torch.optim.Optimizer)):
            optimizer = inner
        else:
            break
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"Expected a torch.optim.Optimizer (or a wrapper of one), got {type(optimizer).__name__}.")
    return optimizer


def _zero_decay_group(optimizer: torch.optim.Optimizer, like: dict, scheduler) -> dict:
    """A group with ``weight_decay=0`` and otherwise ``like``'s hyper-parameters (created if missing)."""
    def settings(group: dict) -> dict:
        return {k: v for k, v in group.items() if k not in ("params", "weight_decay", "initial_lr")}

    for group in optimizer.param_groups:
        if group.get("weight_decay", 0.0) == 0.0 and settings(group) == settings(like):
            return group
    index = next(i for i, group in enumerate(optimizer.param_groups) if group is like)
    optimizer.add_param_group({**settings(like), "params": [], "weight_decay": 0.0})
    new = optimizer.param_groups[-1]
    if "initial_lr" in like:
        new["initial_lr"] = like["initial_lr"]
    if scheduler is not None:
        _extend_scheduler(scheduler, index)
    return new


def _extend_scheduler(scheduler, index: int, _seen: set[int] | None = None) -> None:
    """Give ``scheduler`` (and the schedulers it chains) an entry for a new last group copied from ``index``.

    Schedulers keep one entry per group; ``SequentialLR`` / ``ChainedScheduler`` hold their own lists and
    those of their children (a child left short would silently stop scheduling the new group). Lists shared
    between a wrapper and a child (``SequentialLR._last_lr``) are extended once.
    """
    seen = set() if _seen is None else _seen
    while not hasattr(scheduler, "base_lrs") and getattr(scheduler, "scheduler", None) is not None:
        scheduler = scheduler.scheduler  # Accelerate's AcceleratedScheduler keeps the real one here
    for attribute in ("base_lrs", "lr_lambdas", "_last_lr"):
        values = getattr(scheduler, attribute, None)
        if isinstance(values, list) and id(values) not in seen and len(values) > index:
            seen.add(id(values))
            values.append(values[index])
    for child in getattr(scheduler, "_schedulers", None) or ():
        _extend_scheduler(child, index, seen)


def replace_parameters_(
    optimizer,
    model: nn.Module,
    replacements: Mapping[nn.Parameter, Sequence[nn.Parameter]],
    *,
    zero_weight_decay: bool = False,
    scheduler=None,
) -> None:
    """Swap each replaced parameter for its new ones inside ``optimizer``, keeping all other state.

    New parameters join the group of the parameter they replace (or, with ``zero_weight_decay``, a group
    with ``weight_decay=0`` and the same other settings). Each group is then ordered as
    ``model.parameters()`` orders them, which is the layout a freshly built optimizer would have, so
    checkpoints saved after the switch load into an optimizer created for the factorized model.
    """
    optimizer = unwrap_optimizer(optimizer)
    order = {id(p): i for i, p in enumerate(model.parameters())}
    touched: set[int] = set()
    for group in list(optimizer.param_groups):
        replaced = [p for p in group["params"] if p in replacements]
        if not replaced:
            continue
        group["params"] = [p for p in group["params"] if p not in replacements]
        target = group
        if zero_weight_decay and group.get("weight_decay", 0.0) != 0.0:
            target = _zero_decay_group(optimizer, group, scheduler)
        for old in replaced:
            optimizer.state.pop(old, None)
            target["params"].extend(replacements[old])
        touched.update((id(group), id(target)))
    for group in optimizer.param_groups:
        if id(group) in touched:
            group["params"].sort(key=lambda p: order.get(id(p), len(order)))


def attach_frobenius_decay(optimizer, modules: Iterable[FactorizedLayer], coefficient: float):
    """Add Frobenius-decay gradients to ``modules``' factors right before every optimizer step.

    Returns the hook handle (``handle.remove()`` detaches it).
    """
    modules = list(modules)

    def hook(_optimizer, _args, _kwargs):
        for module in modules:
            module.add_frobenius_decay_grad_(coefficient)

    return unwrap_optimizer(optimizer).register_step_pre_hook(hook)


def attach_rewarmup(optimizer, steps: int, done: int = 0):
    """Scale every learning rate by ``(k + 1) / steps`` at the ``k``-th optimizer step from now, counting from
    ``k = done`` (steps of the ramp already taken, e.g. before a resume), until ``k = steps``.

    The schedule's own values are restored after each step, so any scheduler keeps working unchanged.
    Returns a list of the two hook handles.
    """
    optimizer = unwrap_optimizer(optimizer)
    state = {"step": max(0, done), "saved": []}

    def before(opt, _args, _kwargs):
        if state["step"] < steps:
            state["saved"] = [group["lr"] for group in opt.param_groups]
            for group in opt.param_groups:
                group["lr"] = group["lr"] * (state["step"] + 1) / steps

    def after(opt, _args, _kwargs):
        if state["step"] < steps:
            for group, lr in zip(opt.param_groups, state["saved"]):
                group["lr"] = lr
            state["step"] += 1

    return [optimizer.register_step_pre_hook(before), optimizer.register_step_post_hook(after)]


def attach_step_scale(optimizer, parameters: Iterable[nn.Parameter], scale: float):
    """Scale each optimizer step of ``parameters`` by ``scale``: after the step, ``p = old + scale * (p - old)``
    (a learning-rate multiplier for these parameters alone, for any optimizer, schedule or group layout, so
    checkpoints keep the optimizer's layout). Holds one copy of the parameters; two multi-tensor ops per step.
    Returns a list of the two hook handles."""
    optimizer = unwrap_optimizer(optimizer)
    values = [p.detach() for p in parameters]  # the parameters' storage, outside autograd
    saved = [v.clone() for v in values]

    def before(_opt, _args, _kwargs):
        torch._foreach_copy_(saved, values)

    def after(_opt, _args, _kwargs):
        torch._foreach_lerp_(values, saved, 1 - scale)  # p + (1 - scale) * (old - p) = old + scale * (p - old)

    return [optimizer.register_step_pre_hook(before), optimizer.register_step_post_hook(after)]
