"""Tests for cuttlefish_hf.optim: keeping the optimizer and schedule whole across the switch."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cuttlefish_hf.optim import (attach_frobenius_decay, attach_rewarmup, attach_step_scale, replace_parameters_,
                                 unwrap_optimizer)
from cuttlefish_hf.surgery import factorize_


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 4))


def _groups(model: nn.Module, decay_lr: float = 1e-2, no_decay_lr: float = 1e-2) -> list[dict]:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": 0.1, "lr": decay_lr},
            {"params": no_decay, "weight_decay": 0.0, "lr": no_decay_lr}]


def _train(model: nn.Module, optimizer, steps: int, scheduler=None, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(6, 8, generator=generator)
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def _switch(model: nn.Module, plan: dict[str, int]) -> dict[nn.Parameter, list[nn.Parameter]]:
    old = {name: model.get_submodule(name).weight for name in plan}
    factorize_(model, plan)
    return {old[name]: [model.get_submodule(name).first.weight, model.get_submodule(name).second.weight]
            for name in plan}


def _state_copy(optimizer) -> dict:
    return {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for p, s in optimizer.state.items()}


def _order_follows_model(model: nn.Module, optimizer) -> bool:
    index = {id(p): i for i, p in enumerate(model.parameters())}
    return all([index[id(p)] for p in g["params"]] == sorted(index[id(p)] for p in g["params"])
               for g in optimizer.param_groups)


# --------------------------------------------------------------------------- replace_parameters_
def test_replace_keeps_untouched_state_and_drops_replaced():
    model = _model()
    optimizer = torch.optim.AdamW(_groups(model))
    _train(model, optimizer, 3)
    before = _state_copy(optimizer)
    replacements = _switch(model, {"2": 4, "4": 3})
    replace_parameters_(optimizer, model, replacements)

    new = [p for params in replacements.values() for p in params]
    in_optimizer = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(in_optimizer) == len({id(p) for p in in_optimizer})  # no duplicates
    assert {id(p) for p in in_optimizer} == {id(p) for p in model.parameters()}
    for old in replacements:
        assert old not in optimizer.state
        assert all(p is not old for p in in_optimizer)
    untouched = [p for p in model.parameters() if all(p is not q for q in new)]
    assert len(untouched) == 6  # 2 dense weights + 4 biases (the factorized layers' biases are shared)
    for p in untouched:
        for key, value in before[p].items():
            assert torch.equal(optimizer.state[p][key], value), key
    for p in new:
        assert p not in optimizer.state  # fresh state, created on the next step
    # New factors joined the decay group; every group is ordered as model.parameters().
    decay, no_decay = optimizer.param_groups
    assert all(any(p is q for q in decay["params"]) for p in new)
    assert [id(p) for p in decay["params"]] == [id(p) for p in model.parameters() if p.ndim >= 2]
    assert [id(p) for p in no_decay["params"]] == [id(p) for p in model.parameters() if p.ndim < 2]
    assert _order_follows_model(model, optimizer)
    assert len(optimizer.param_groups) == 2

    _train(model, optimizer, 2, seed=2)
    assert all(int(optimizer.state[p]["step"]) == 2 for p in new)
    assert all(int(optimizer.state[p]["step"]) == 5 for p in untouched)


def test_swapped_state_dict_loads_into_fresh_optimizer():
    model = _model()
    optimizer = torch.optim.AdamW(_groups(model))
    _train(model, optimizer, 3)
    replace_parameters_(optimizer, model, _switch(model, {"2": 4}))
    _train(model, optimizer, 2, seed=3)
    fresh = torch.optim.AdamW(_groups(model))
    fresh.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for p in model.parameters():
        assert optimizer.state[p].keys() == fresh.state[p].keys()
        for key in optimizer.state[p]:
            assert torch.equal(optimizer.state[p][key], fresh.state[p][key])
    # And training continues identically with either optimizer.
    twin = copy.deepcopy(model)
    twin_optimizer = torch.optim.AdamW(_groups(twin))
    twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    _train(model, optimizer, 2, seed=4)
    _train(twin, twin_optimizer, 2, seed=4)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_zero_weight_decay_joins_existing_matching_group():
    model = _model()
    optimizer = torch.optim.AdamW(_groups(model))  # no-decay group has the same lr: reuse it
    _train(model, optimizer, 1)
    replacements = _switch(model, {"2": 4})
    replace_parameters_(optimizer, model, replacements, zero_weight_decay=True)
    assert len(optimizer.param_groups) == 2
    no_decay = optimizer.param_groups[1]
    assert no_decay["weight_decay"] == 0.0
    assert all(any(p is q for q in no_decay["params"]) for p in replacements[next(iter(replacements))])
    assert _order_follows_model(model, optimizer)


def _lambdas():
    return [lambda k: 1.0 / (1 + k), lambda k: 0.9**k]


def test_zero_weight_decay_group_created_and_lambda_lr_extended():
    model = _model()
    optimizer = torch.optim.AdamW(_groups(model, decay_lr=1e-2, no_decay_lr=5e-3))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lambdas())
    _train(model, optimizer, 3, scheduler)
    decay_lr = optimizer.param_groups[0]["lr"]
    assert decay_lr == pytest.approx(1e-2 / 4)
    replacements = _switch(model, {"2": 4, "6": 2})
    new = [p for params in replacements.values() for p in params]
    replace_parameters_(optimizer, model, replacements, zero_weight_decay=True, scheduler=scheduler)

    assert len(optimizer.param_groups) == 3
    created = optimizer.param_groups[2]
    assert created["weight_decay"] == 0.0
    assert created["lr"] == decay_lr and created["initial_lr"] == 1e-2
    assert created["betas"] == optimizer.param_groups[0]["betas"]
    assert [id(p) for p in created["params"]] == [id(p) for p in model.parameters() if any(p is q for q in new)]
    assert all(all(p is not q for q in new) for p in optimizer.param_groups[0]["params"])
    assert _order_follows_model(model, optimizer)
    assert scheduler.base_lrs == [1e-2, 5e-3, 1e-2]
    assert len(scheduler.lr_lambdas) == 3 and len(scheduler.get_last_lr()) == 3

    for _ in range(3):
        _train(model, optimizer, 1, scheduler, seed=5)
        k = scheduler.last_epoch
        expected = [1e-2 / (1 + k), 5e-3 * 0.9**k, 1e-2 / (1 + k)]
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(expected)
        assert scheduler.get_last_lr() == pytest.approx(expected)

    # A fresh optimizer built the same way (three groups) takes the state dict.
    factors = [p for p in model.parameters() if any(p is q for q in new)]
    rest = [p for p in model.parameters() if p.ndim >= 2 and all(p is not q for q in new)]
    fresh = torch.optim.AdamW([{"params": rest, "weight_decay": 0.1, "lr": 1e-2},
                               {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0,
                                "lr": 5e-3},
                               {"params": factors, "weight_decay": 0.0, "lr": 1e-2}])
    fresh.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for p in model.parameters():
        for key in optimizer.state[p]:
            assert torch.equal(optimizer.state[p][key], fresh.state[p][key])
    # The scheduler's state dict also round-trips with three groups.
    fresh_scheduler = torch.optim.lr_scheduler.LambdaLR(fresh, _lambdas() + [_lambdas()[0]])
    fresh_scheduler.load_state_dict(scheduler.state_dict())
    assert fresh_scheduler.base_lrs == [1e-2, 5e-3, 1e-2]


def test_sequential_lr_children_are_extended():
    model = _model()
    optimizer = torch.optim.SGD(_groups(model, decay_lr=0.1, no_decay_lr=0.05), momentum=0.9)
    warm = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: (k + 1) / 3)
    decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 0.5**k)
    scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [warm, decay], milestones=[3])
    _train(model, optimizer, 1, scheduler)
    replace_parameters_(optimizer, model, _switch(model, {"2": 4}), zero_weight_decay=True, scheduler=scheduler)
    assert len(optimizer.param_groups) == 3
    assert len(warm.base_lrs) == len(decay.base_lrs) == 3
    assert len(scheduler.get_last_lr()) == 3
    for _ in range(5):  # crosses the milestone into the second scheduler
        _train(model, optimizer, 1, scheduler, seed=6)
        lrs = [g["lr"] for g in optimizer.param_groups]
        assert lrs[2] == pytest.approx(lrs[0])
        assert lrs[1] == pytest.approx(lrs[0] / 2)


def test_replace_through_wrapper_and_params_outside_optimizer():
    model = _model()
    model[2].weight.requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)

    class Wrapper:
        def __init__(self, inner):
            self.optimizer = inner

    replacements = _switch(model, {"2": 4, "4": 4})
    replace_parameters_(Wrapper(Wrapper(optimizer)), model, replacements)
    params = optimizer.param_groups[0]["params"]
    frozen_factors = [model[2].first.weight, model[2].second.weight]
    assert all(all(p is not q for q in params) for p in frozen_factors)  # the frozen layer was never in it
    assert any(p is model[4].first.weight for p in params)


# --------------------------------------------------------------------------- hooks
def test_attach_frobenius_decay_equals_manual_gradient():
    coefficient = 0.05
    model = _model()
    factorize_(model, {"2": 4, "4": 3})
    twin = copy.deepcopy(model)
    modules = [model[2], model[4]]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    handle = attach_frobenius_decay(optimizer, modules, coefficient)
    generator = torch.Generator().manual_seed(7)
    for _ in range(3):
        x = torch.randn(6, 8, generator=generator)
        for net, opt in ((model, optimizer), (twin, twin_optimizer)):
            opt.zero_grad()
            net(x).square().mean().backward()
        twin[2].add_frobenius_decay_grad_(coefficient)
        twin[4].add_frobenius_decay_grad_(coefficient)
        optimizer.step()
        twin_optimizer.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(a, b, atol=1e-7, rtol=0)
    # The decay changed something (compared with no decay at all).
    plain = copy.deepcopy(twin)
    assert not torch.allclose(model[2].first.weight, _model_without_decay_step(plain)[2].first.weight)
    handle.remove()
    x = torch.randn(6, 8, generator=generator)
    for net, opt in ((model, optimizer), (twin, twin_optimizer)):
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(a, b, atol=1e-7, rtol=0)


def _model_without_decay_step(model: nn.Module) -> nn.Module:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.zero_grad()
    model(torch.randn(6, 8)).square().mean().backward()
    optimizer.step()
    return model


def test_attach_frobenius_decay_step_is_exact():
    # SGD without momentum: one step moves the factors by -lr * (task grad + decay grad).
    model = _model()
    factorize_(model, {"2": 4})
    layer = model[2]
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    attach_frobenius_decay(optimizer, [layer], 0.2)
    for p in layer.parameters():
        p.grad = torch.zeros_like(p)
    first, second = layer.first.weight.detach().clone(), layer.second.weight.detach().clone()
    optimizer.step()
    assert torch.allclose(layer.first.weight, first - 0.5 * 0.2 * (second.T @ second @ first), atol=1e-7)
    assert torch.allclose(layer.second.weight, second - 0.5 * 0.2 * (second @ first @ first.T), atol=1e-7)


def test_attach_rewarmup_scales_lr_then_restores_schedule():
    weight = nn.Parameter(torch.zeros(3))
    gradient = torch.tensor([1.0, -2.0, 0.5])
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 0.9**k)

    def step():
        optimizer.zero_grad()
        (weight * gradient).sum().backward()
        before = weight.detach().clone()
        optimizer.step()
        scheduler.step()
        return float(((before - weight.detach()) / gradient).mean())  # the lr the step used

    for _ in range(2):
        step()
    handles = attach_rewarmup(Wrapper(optimizer), 4)
    assert len(handles) == 2
    for k in range(7):
        scheduled = 0.1 * 0.9 ** (k + 2)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(scheduled)
        used = step()
        factor = (k + 1) / 4 if k < 4 else 1.0
        assert used == pytest.approx(scheduled * factor, rel=1e-5)
        # The schedule's own value is untouched after each step.
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.9 ** (k + 3))
        assert scheduler.get_last_lr()[0] == pytest.approx(0.1 * 0.9 ** (k + 3))
    for handle in handles:
        handle.remove()


def test_attach_rewarmup_continues_a_ramp_begun_before_a_resume():
    a = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([a], lr=1.0)
    attach_rewarmup(optimizer, 4, done=2)  # steps 3 and 4 of the ramp remain, then the schedule's own lr
    for expected in (0.75, 1.0, 1.0):
        a.grad = torch.ones(1)
        before = a.item()
        optimizer.step()
        assert before - a.item() == pytest.approx(expected)


def test_attach_rewarmup_all_groups():
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 0.5}])
    attach_rewarmup(optimizer, 2)
    for expected in ([0.5, 0.25], [1.0, 0.5], [1.0, 0.5]):
        a.grad, b.grad = torch.ones(1), torch.ones(1)
        before = (a.item(), b.item())
        optimizer.step()
        assert [before[0] - a.item(), before[1] - b.item()] == pytest.approx(expected)
        assert [g["lr"] for g in optimizer.param_groups] == [1.0, 0.5]


class Wrapper:
    """Stands in for wrappers such as Accelerate's AcceleratedOptimizer."""

    def __init__(self, inner):
        self.optimizer = inner


def test_unwrap_optimizer():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    assert unwrap_optimizer(optimizer) is optimizer
    assert unwrap_optimizer(Wrapper(optimizer)) is optimizer
    assert unwrap_optimizer(Wrapper(Wrapper(optimizer))) is optimizer
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        unwrap_optimizer(object())

    class OptimizerSubclassWrapper(torch.optim.Optimizer):  # like Accelerate's AcceleratedOptimizer
        def __init__(self, inner):
            self.optimizer = inner

    assert unwrap_optimizer(OptimizerSubclassWrapper(optimizer)) is optimizer
    assert unwrap_optimizer(Wrapper(OptimizerSubclassWrapper(optimizer))) is optimizer
    with pytest.raises(TypeError):
        unwrap_optimizer(Wrapper("not an optimizer"))


def test_new_zero_decay_group_is_scheduled_through_accelerate_wrappers():
    from accelerate import Accelerator

    from cuttlefish_hf import Cuttlefish, CuttlefishConfig

    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32)), nn.Linear(32, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)  # one group: no zero-decay one
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / 100)
    model, optimizer, scheduler = Accelerator(cpu=True).prepare(model, optimizer, scheduler)
    Cuttlefish(model, CuttlefishConfig(mode="si_fd"), total_steps=100).begin(optimizer, scheduler)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.05, 0.0]
    for _ in range(50):
        optimizer.step()
        scheduler.step()
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([5e-3, 5e-3])


@pytest.mark.parametrize("optimizer_class", [torch.optim.SGD, torch.optim.AdamW])
def test_step_scale_multiplies_the_learning_rate_of_its_parameters_only(optimizer_class):
    torch.manual_seed(0)
    start = [torch.randn(3, 4), torch.randn(4)]

    def run(scale_by_hook: bool) -> list[torch.Tensor]:
        scaled, plain = (torch.nn.Parameter(value.clone()) for value in start)
        options = {"momentum": 0.9} if optimizer_class is torch.optim.SGD else {"weight_decay": 0.1}
        if scale_by_hook:  # one group at lr 0.01, the hook triples the first parameter's steps
            optimizer = optimizer_class([scaled, plain], lr=0.01, **options)
            attach_step_scale(optimizer, [scaled], 3.0)
        else:
            optimizer = optimizer_class([{"params": [scaled], "lr": 0.03}, {"params": [plain], "lr": 0.01}],
                                        **options)
        for _ in range(3):
            optimizer.zero_grad()
            ((scaled ** 2).sum() + (plain ** 3).sum()).backward()
            optimizer.step()
        return [scaled.detach(), plain.detach()]

    hooked, reference = run(True), run(False)
    torch.testing.assert_close(hooked, reference)
    assert not torch.allclose(hooked[0], start[0], atol=0.05)
