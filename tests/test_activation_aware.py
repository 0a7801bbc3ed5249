"""Tests for cuttlefish_hf.activation_aware: statistics, whitened factors, rank selection, pretrained check."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from cuttlefish_hf.activation_aware import (
    ActivationStats,
    allocate_budget,
    decide_ranks_activation_aware,
    PRETRAINED_DEFAULT_FRACTIONS,
    detect_pretrained,
    factorize_activation_aware_,
    layer_kind,
    output_error,
    whitened_factors,
    whitened_singular_values,
)
from cuttlefish_hf.layers import FactorizedLinear, svd_factors
from cuttlefish_hf.rank_rules import break_even_rank
from cuttlefish_hf.stable_rank import stable_ranks
from cuttlefish_hf.surgery import factorize_
from cuttlefish_hf.targeting import find_targets
from helpers import tiny_bert


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _correlated(tokens: int, n: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """Inputs with a strongly anisotropic, non-diagonal second moment (like LayerNorm outputs)."""
    g = _gen(seed)
    mixing = torch.randn(n, n, generator=g, dtype=dtype) * torch.logspace(0, -2, n, dtype=dtype)[:, None]
    return torch.randn(tokens, n, generator=g, dtype=dtype) @ mixing + 0.3


class SharedInput(nn.Module):
    """Two Linears fed the same tensor (like Q and K), then a third fed their sum."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(6, 5)
        self.k = nn.Linear(6, 5)
        self.out = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.q(x) + self.k(x))


# -- statistics ------------------------------------------------------------------------------------------
def test_stats_equal_direct_second_moment_over_3d_batches_and_shared_inputs():
    torch.manual_seed(0)
    model = SharedInput()
    stats = ActivationStats().start(model, ["q", "k", "out"])
    inputs = [torch.randn(3, 7, 6), torch.randn(2, 4, 6), torch.randn(5, 6)]
    hidden = []
    for x in inputs:
        model(x)
        hidden.append((model.q(x) + model.k(x)).detach())  # hooks record these calls too
    stats.stop()
    flat = torch.cat([x.reshape(-1, 6) for x in inputs]).double()
    expected = 2 * flat.T @ flat  # every x was seen twice by q (forward + the explicit call above)
    tokens = 2 * flat.shape[0]
    assert stats.count("q") == stats.count("k") == tokens
    torch.testing.assert_close(stats.second_moment_sum("q").double(), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(stats.covariance("k").double(), expected / tokens, rtol=1e-5, atol=1e-5)
    hid = torch.cat([h.reshape(-1, 5) for h in hidden]).double()
    torch.testing.assert_close(stats.covariance("out").double(), hid.T @ hid / hid.shape[0], rtol=1e-4, atol=1e-5)
    assert stats.second_moment_sum("q") is stats.second_moment_sum("k")   # Q/K share one sum
    assert stats.memory_bytes() == 4 * (6 * 6 + 5 * 5)
    assert stats.covariance("q").dtype == torch.float32


def test_stats_skip_eval_mode_and_hooks_are_removed_after_stop():
    model = SharedInput()
    stats = ActivationStats().start(model, ["q", "out"])
    assert all(len(m._forward_pre_hooks) == 1 for m in (model.q, model.out))
    model.eval()
    model(torch.randn(4, 6))
    assert stats.names == []                      # eval forward passes are not recorded
    model.train()
    model(torch.randn(4, 6))
    stats.stop()
    assert not stats.collecting
    assert all(len(m._forward_pre_hooks) == 0 for m in model.modules())
    before = stats.second_moment_sum("q").clone()
    model(torch.randn(4, 6))
    torch.testing.assert_close(stats.second_moment_sum("q"), before)
    assert stats.count("q") == 4


def test_stats_state_dict_round_trip_and_errors():
    model = SharedInput()
    stats = ActivationStats().start(model, ["q", "k", "out"])
    model(torch.randn(3, 6))
    stats.stop()
    restored = ActivationStats()
    restored.load_state_dict(stats.state_dict())
    for name in ("q", "k", "out"):
        torch.testing.assert_close(restored.covariance(name), stats.covariance(name))
        assert restored.count(name) == stats.count(name)
    assert restored.second_moment_sum("q") is restored.second_moment_sum("k")
    with pytest.raises(KeyError):
        restored.covariance("missing")
    with pytest.raises(ValueError, match="nn.Linear"):
        ActivationStats().start(model, ["nope"])


def test_stats_every_k_records_every_kth_pass():
    model = SharedInput()
    stats = ActivationStats(every=2).start(model, ["q", "k", "out"])
    inputs = [torch.randn(3, 6) for _ in range(5)]
    for x in inputs:
        model(x)
    stats.stop()
    kept = torch.cat([inputs[0], inputs[2], inputs[4]])
    assert stats.count("q") == stats.count("k") == stats.count("out") == 9
    torch.testing.assert_close(stats.covariance("q"), kept.T @ kept / 9, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        ActivationStats(every=0)


def test_stats_raise_when_shared_input_stops_being_shared():
    model = SharedInput()
    stats = ActivationStats().start(model, ["q", "k"])
    model(torch.randn(2, 6))
    model.q(torch.randn(2, 6))
    with pytest.raises(RuntimeError, match="shared its input"):
        model.k(torch.randn(2, 6))
    stats.stop()


def test_output_gradient_moments_equal_direct_computation():
    torch.manual_seed(1)
    model = SharedInput()
    stats = ActivationStats().start(model, ["q", "out"], output_gradients=True)
    expected_q, expected_out, tokens = torch.zeros(5), torch.zeros(4), 0
    for shape in [(2, 3, 6), (4, 6)]:
        x = torch.randn(*shape)
        q_out = model.q(x)
        q_out.retain_grad()
        y = model.out(q_out + model.k(x))
        y.retain_grad()
        (y.square().sum() + y.sum()).backward()
        expected_q += q_out.grad.reshape(-1, 5).square().sum(0)
        expected_out += y.grad.reshape(-1, 4).square().sum(0)
        tokens += x.numel() // 6
    stats.stop()
    torch.testing.assert_close(stats.output_gradient_moment("q"), expected_q / tokens)
    torch.testing.assert_close(stats.output_gradient_moment("out"), expected_out / tokens)
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    restored = ActivationStats()
    restored.load_state_dict(stats.state_dict())
    torch.testing.assert_close(restored.output_gradient_moment("q"), expected_q / tokens)


# -- factors ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scaling", ["whiten", "diag", "none"])
def test_whitened_factors_reproduce_weight_at_full_rank(scaling):
    weight = torch.randn(7, 10, generator=_gen(1))
    x = _correlated(6, 10)  # fewer tokens than inputs: a singular covariance, damping makes it factor
    cov = (x.T @ x / x.shape[0]).float()
    first, second = whitened_factors(weight, cov, 7, scaling=scaling)
    assert first.shape == (7, 10) and second.shape == (7, 7)
    torch.testing.assert_close(second @ first, weight, rtol=1e-4, atol=1e-4)


def test_whitened_error_beats_plain_svd_and_equals_whitened_tail():
    weight = torch.randn(12, 16, generator=_gen(2), dtype=torch.float64).float()
    x = _correlated(400, 16, seed=3)
    cov = x.T @ x / x.shape[0]
    values = whitened_singular_values({"w": weight}, {"w": cov}, damping=0.0)["w"]
    for rank in (2, 4, 8):
        f, s = whitened_factors(weight, cov, rank, damping=0.0)
        pf, ps = svd_factors(weight, rank)
        ours = float(((weight.double() - (s @ f).double()) @ x.T).norm())
        plain = float(((weight.double() - (ps @ pf).double()) @ x.T).norm())
        assert ours < 0.9 * plain, (rank, ours, plain)
        # the output error is the tail of the whitened spectrum (SVD-LLM's theorem)
        tail = float(values[rank:].square().sum() / values.square().sum())
        assert output_error(weight, s @ f, cov) == pytest.approx(tail, rel=1e-3)
        # the default small damping stays close to the optimum
        f2, s2 = whitened_factors(weight, cov, rank)
        assert float(((weight.double() - (s2 @ f2).double()) @ x.T).norm()) < plain


def test_output_weighted_factors_exact_at_full_rank_and_best_in_weighted_metric():
    weight = torch.randn(10, 12, generator=_gen(12))
    x = _correlated(300, 12, seed=13)
    cov = x.T @ x / x.shape[0]
    d = torch.logspace(0, -3, 10, dtype=torch.float64)
    first, second = whitened_factors(weight, cov, 10, output_weights=d)
    torch.testing.assert_close(second @ first, weight, rtol=1e-4, atol=1e-4)

    def weighted_error(approx):
        delta = (weight - approx).double()
        return float(torch.einsum("i,ij,jk,ik->", d, delta, cov, delta))

    for rank in (3, 6):
        f, s = whitened_factors(weight, cov, rank, damping=0.0, output_weights=d)
        f0, s0 = whitened_factors(weight, cov, rank, damping=0.0)
        assert weighted_error(s @ f) < weighted_error(s0 @ f0)
        # the tail of the two-sided spectrum is that weighted error
        values = whitened_singular_values({"w": weight}, {"w": cov}, damping=0.0, output_weights={"w": d})["w"]
        assert weighted_error(s @ f) == pytest.approx(float(values[rank:].square().sum()), rel=1e-3)


def test_factorize_activation_aware_keeps_bias_and_beats_plain_on_recorded_data():
    model = tiny_bert(seed=0)
    targets = find_targets(model)
    ids = torch.randint(8, 64, (16, 12), generator=_gen(4))
    stats = ActivationStats().start(model, targets)
    model.train()
    with torch.no_grad():
        torch.manual_seed(0)
        model(input_ids=ids)
    stats.stop()
    covs = stats.covariances(targets)
    plan = {name: 6 for name in targets}
    dense = {name: model.get_submodule(name).weight.detach().clone() for name in targets}
    biases = {name: model.get_submodule(name).bias for name in targets}
    plain_model = tiny_bert(seed=0)
    factorize_(plain_model, plan)
    report = factorize_activation_aware_(model, plan, covs, damping=0.0)
    assert report.plan == plan
    for name in targets:
        ours, plain = model.get_submodule(name), plain_model.get_submodule(name)
        assert isinstance(ours, FactorizedLinear) and ours.second.bias is biases[name]
        assert output_error(dense[name], ours.merged_weight(), covs[name]) < \
            output_error(dense[name], plain.merged_weight(), covs[name])


# -- rank selection ---------------------------------------------------------------------------------------
def test_energy_rule_on_whitened_spectrum():
    weight = torch.randn(8, 8, generator=_gen(5))
    x = _correlated(300, 8, seed=6)
    cov = x.T @ x / x.shape[0]
    values = whitened_singular_values({"w": weight}, {"w": cov})["w"]
    cumulative = values.square().cumsum(0) / values.square().sum()
    for energy in (0.5, 0.9, 0.99):
        decision, = decide_ranks_activation_aware({"w": weight}, {"w": cov}, "energy", energy=energy)
        expected = int((cumulative < energy - 1e-12).sum()) + 1
        assert decision.rank == expected and decision.rule == "aa_energy"
        assert decision.factorize == (expected < break_even_rank(8, 8))


def _objective(spectra, ranks):
    return sum(float(v[r:].square().sum() / v.square().sum()) for v, r in zip(spectra, ranks))


def test_budget_rule_spends_where_output_error_drops_most_and_respects_budget():
    # two 8x8 layers (rank step = 16 params, break-even rank 4), identity covariance = plain spectra
    steep = torch.tensor([10.0, 1, 1, 1, 1, 1, 1, 1])
    flat = torch.full((8,), 5.0)
    weights = {"steep": torch.diag(steep), "flat": torch.diag(flat)}
    covs = {name: torch.eye(8) for name in weights}
    decisions = decide_ranks_activation_aware(weights, covs, "budget", keep_fraction=0.5, damping=0.0)
    ranks = {d.name: d.rank for d in decisions}
    assert ranks == {"steep": 1, "flat": 3}   # 64 params: min ranks (32) + two steps for the flat spectrum
    assert all(d.rule == "aa_budget" and d.factorize for d in decisions)
    # exhaustive check: no allocation within the same budget has a lower total relative error
    spectra = [steep.double(), flat.double()]

    def params(r):
        return 64 if r >= 4 else 16 * r

    best = min(_objective(spectra, rs) for rs in itertools.product(range(1, 9), repeat=2)
               if sum(params(r) for r in rs) <= 64)
    assert _objective(spectra, [ranks["steep"], ranks["flat"]]) == pytest.approx(best)
    # a generous budget makes the flat layer dense (full rank, not factorized) before the steep one
    decisions = decide_ranks_activation_aware(weights, covs, "budget", keep_fraction=0.75, damping=0.0)
    flat_decision = next(d for d in decisions if d.name == "flat")
    assert flat_decision.rank == 8 and not flat_decision.factorize


def test_allocate_budget_matches_exhaustive_search_on_random_layers():
    g = _gen(7)
    shapes = {"a": (6, 6), "b": (6, 12), "c": (12, 6)}
    spectra = {n: torch.sort(torch.rand(6, generator=g, dtype=torch.float64) ** 3, descending=True).values
               for n in shapes}

    def params(name, r):
        m, n = shapes[name]
        return m * n if r >= break_even_rank(m, n) else r * (m + n)

    total = sum(m * n for m, n in shapes.values())
    for fraction in (0.3, 0.45, 0.6, 0.8):
        budget = int(fraction * total)
        ranks = allocate_budget(spectra, shapes, budget)
        assert sum(params(n, r) for n, r in ranks.items()) <= budget
        names = list(shapes)
        best = min(_objective([spectra[n] for n in names], rs) for rs in itertools.product(range(1, 7), repeat=3)
                   if sum(params(n, r) for n, r in zip(names, rs)) <= budget)
        # greedy by gain per parameter is optimal up to the last (pooled) step that did not fit, which costs
        # at most one dense layer's parameters
        slack = min((_objective([spectra[n] for n in names], rs) for rs in itertools.product(range(1, 7), repeat=3)
                     if sum(params(n, r) for n, r in zip(names, rs)) <= budget - 72), default=float("inf"))
        got = _objective([spectra[n] for n in names], [ranks[n] for n in names])
        assert best - 1e-12 <= got <= slack + 1e-12


def test_min_keep_fraction_floors_every_layer():
    g = _gen(14)
    weights = {f"l{i}": torch.randn(16, 16, generator=g) @ torch.diag(torch.logspace(0, -4 * i, 16)) for i in range(3)}
    covs = {n: torch.eye(16) for n in weights}
    plain = {d.name: d.rank for d in decide_ranks_activation_aware(weights, covs, "budget", keep_fraction=0.4)}
    floored = {d.name: d.rank for d in decide_ranks_activation_aware(weights, covs, "budget", keep_fraction=0.4,
                                                                     min_keep_fraction=0.3)}
    assert min(plain.values()) < 2          # without a floor the steep layers are cut to almost nothing
    assert all(r >= 2 for r in floored.values())  # floor(0.3 * 256 / 32) = 2
    assert sum(r * 32 for r in floored.values()) <= 0.4 * 3 * 256
    uniform = {d.name: d.rank for d in decide_ranks_activation_aware(weights, covs, "budget", keep_fraction=0.4,
                                                                     min_keep_fraction=0.4)}
    assert set(uniform.values()) == {3}     # floor(0.4 * 256 / 32) = 3 everywhere, nothing left to allocate


def test_layer_kind_from_names():
    assert layer_kind("bert.encoder.layer.0.attention.self.query") == "attention"
    assert layer_kind("bert.encoder.layer.0.attention.output.dense") == "attention"
    assert layer_kind("bert.encoder.layer.0.intermediate.dense") == "ffn"
    assert layer_kind("bert.encoder.layer.0.output.dense") == "ffn"
    assert layer_kind("model.layers.3.self_attn.o_proj") == "attention"
    assert layer_kind("model.layers.3.mlp.down_proj") == "ffn"
    assert layer_kind("blocks.2.attn.qkv") == "attention" and layer_kind("blocks.2.mlp.fc1") == "ffn"
    assert layer_kind("transformer.h.0.mlp.c_proj") == "ffn" and layer_kind("transformer.h.0.attn.c_proj") == "attention"
    assert layer_kind("features.3.conv") == "other"


def test_fraction_rule_keeps_the_kind_fraction_of_each_layer():
    model = tiny_bert(seed=0)  # hidden 32, FFN 64
    targets = find_targets(model)
    weights = {n: model.get_submodule(n).weight for n in targets}
    decisions = decide_ranks_activation_aware(weights, {})   # default: fraction rule, attention 0.4 / FFN 0.7
    assert PRETRAINED_DEFAULT_FRACTIONS == {"attention": 0.4, "ffn": 0.7}
    for d in decisions:
        m, n = d.shape
        fraction = 0.4 if layer_kind(d.name) == "attention" else 0.7
        assert d.rule == "aa_fraction" and d.rank == int(fraction * m * n // (m + n)) and d.factorize
    kept = sum(d.rank * sum(d.shape) for d in decisions) / sum(d.shape[0] * d.shape[1] for d in decisions)
    assert 0.5 < kept <= 0.6
    uniform = decide_ranks_activation_aware(weights, {}, "fraction", keep_fraction=0.5, kind_fractions={})
    assert {d.rank for d in uniform if d.shape == (32, 32)} == {8}


def test_rank_overrides_and_min_rank_are_honoured():
    weights = {"a": torch.randn(8, 8, generator=_gen(8)), "b": torch.randn(8, 8, generator=_gen(9))}
    covs = {n: torch.eye(8) for n in weights}
    decisions = decide_ranks_activation_aware(weights, covs, "budget", keep_fraction=0.3, min_rank=2,
                                              rank_overrides={"a": 1})
    ranks = {d.name: d.rank for d in decisions}
    assert ranks["a"] == 1 and ranks["b"] >= 2
    with pytest.raises(ValueError):
        decide_ranks_activation_aware(weights, covs, "nope")


# -- pretrained or not -------------------------------------------------------------------------------------
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
