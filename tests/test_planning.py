"""Tests for cuttlefish_hf.planning: one pretrained verdict, the method resolved from it, pure switch plans."""

from __future__ import annotations

import pytest
import torch

from cuttlefish_hf.config import PRETRAINED_FACTOR_LR_SCALE, CuttlefishConfig
from cuttlefish_hf.planning import (Method, detect_pretrained, fixed_ratio_saves, keep_dense, plan_switch,
                                    rank_overrides, resolve_method)
from cuttlefish_hf.stable_rank import stable_ranks
from cuttlefish_hf.targeting import find_targets
from helpers import pretrained_like, tiny_bert


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_detect_pretrained_from_initial_stable_ranks():
    model = tiny_bert(seed=0)
    targets = find_targets(model)
    weights = [model.get_submodule(n).weight for n in targets]
    shapes = {n: tuple(w.shape) for n, w in zip(targets, weights)}
    check = detect_pretrained(dict(zip(targets, stable_ranks(weights))), shapes)
    assert not check.pretrained and "from scratch" in check.reason
    # pretrained-looking weights: a few large singular values
    decaying = {}
    for name, (m, n) in shapes.items():
        k = min(m, n)
        u, _ = torch.linalg.qr(torch.randn(m, k, generator=_gen(10)))
        v, _ = torch.linalg.qr(torch.randn(n, k, generator=_gen(11)))
        decaying[name] = (u * torch.tensor([0.6 ** i for i in range(k)])) @ v.T
    check = detect_pretrained(dict(zip(targets, stable_ranks(list(decaying.values())))), shapes)
    assert check.pretrained and check.low_layers == len(targets) and "pretrained" in check.reason


def _init_ranks(model):
    targets = find_targets(model)
    weights = {n: model.get_submodule(n).weight for n in targets}
    return dict(zip(targets, stable_ranks(list(weights.values())))), {n: tuple(w.shape) for n, w in weights.items()}


@pytest.mark.parametrize("pretrained, expected", [
    (True, ("kind_fractions", "whitened", "random_matrix")),
    (False, ("scaled_stable_rank", "svd", "init")),
])
def test_one_verdict_resolves_rule_init_and_xi_reference(pretrained, expected):
    model = pretrained_like(tiny_bert()) if pretrained else tiny_bert()
    method = resolve_method(CuttlefishConfig(), *_init_ranks(model))
    assert (method.rank_rule, method.init, method.xi_reference) == expected
    assert method.records_inputs == (expected[1] == "whitened")
    assert method.reason.startswith("rank_rule='auto' and init='auto' and warmup='auto' and factor_lr_scale='auto' "
                                    "and the weights look")
    assert method.warmup == ("fixed" if pretrained else "stable_ranks")
    assert method.factor_lr_scale == (PRETRAINED_FACTOR_LR_SCALE if pretrained else 1.0) == (4 if pretrained else 1)


def test_explicit_choices_need_no_verdict():
    config = CuttlefishConfig(rank_rule="energy", init="svd", warmup="stable_ranks", factor_lr_scale="3")
    method = resolve_method(config, {}, {})
    assert method == Method("energy", "svd", "auto", "set in the config", "stable_ranks", 3.0)
    # the baselines: fixed ratio, plain SVD
    method = resolve_method(CuttlefishConfig(mode="pufferfish"), {}, {})
    assert (method.rank_rule, method.init) == ("fixed_ratio", "svd") and "pufferfish mode" in method.reason
    assert method.factor_lr_scale == 1.0


def test_plan_switch_is_pure_and_applies_rank_pattern():
    model = tiny_bert()
    targets = find_targets(model)
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in targets}
    config = CuttlefishConfig(rank_rule="fixed_ratio", rank_ratio=0.25, rank_pattern={"output.dense": 3})
    method = Method("fixed_ratio", "svd", "init", "test")
    decisions = plan_switch(weights, config, method)
    assert decisions == plan_switch(weights, config, method)
    for d in decisions:
        expected = 3 if d.name.endswith("output.dense") else 8  # attention.output.dense too (a suffix)
        assert d.rank == expected and d.factorize, d
    assert rank_overrides(targets, {"output.dense": 3}) == {n: 3 for n in targets if n.endswith("output.dense")}
    for name, weight in weights.items():  # nothing was changed
        torch.testing.assert_close(model.get_submodule(name).weight, weight)
    kept = keep_dense(decisions, [targets[0]])
    assert [d.factorize for d in kept] == [False] + [True] * (len(targets) - 1)


def test_fixed_ratio_saves_reads_only_shapes():
    assert fixed_ratio_saves(CuttlefishConfig(rank_ratio=0.25), {"a": (64, 64)})
    assert not fixed_ratio_saves(CuttlefishConfig(rank_ratio=0.5), {"a": (64, 64)})  # 32 = break-even rank
    assert fixed_ratio_saves(CuttlefishConfig(rank_ratio=0.5, rank_pattern={"a": 4}), {"a": (64, 64)})
