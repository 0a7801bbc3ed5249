"""Tests for cuttlefish_hf.rank_rules: rank rules, xi, break-even and per-layer decisions."""

from __future__ import annotations

import math

import pytest
import torch

from cuttlefish_hf.config import RANK_RULES as CONFIG_RULE_NAMES
from cuttlefish_hf.rank_rules import (
    RANK_RULES,
    LayerMeasurement,
    RuleOptions,
    RankDecision,
    break_even_rank,
    decide_ranks,
    random_matrix_stable_rank,
    rank_from_singular_values,
    round_rank,
    xi_for,
)
from cuttlefish_hf.stable_rank import stable_rank, stable_ranks
from cuttlefish_hf.targeting import find_targets, layer_kind
from helpers import tiny_bert


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _with_singular_values(values, n: int, seed: int = 0) -> torch.Tensor:
    """An ``m x n`` fp32 matrix ``U diag(values) V^T`` (m = len(values), n >= m)."""
    values = torch.as_tensor(values, dtype=torch.float64)
    m = values.numel()
    g = _gen(seed)
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=torch.float64))
    return ((u * values) @ v.T).float()


def _decaying(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """A pretrained-looking weight: fast-decaying spectrum, stable rank about 3."""
    return _with_singular_values([0.7**i for i in range(m)], n, seed)


# --------------------------------------------------------------------------- laws and break-even
@pytest.mark.parametrize("shape", [(128, 128), (192, 192), (128, 256), (256, 128), (96, 384)])
def test_random_matrix_stable_rank_matches_gaussian(shape):
    m, n = shape
    g = _gen(0)
    empirical = sum(stable_ranks([torch.randn(m, n, generator=g) for _ in range(6)])) / 6
    # The law is asymptotic: at these sizes the empirical mean sat 0-5.5% above it over 5 seeds (sigma_max
    # falls a little short of sqrt(m) + sqrt(n)); tolerance 6%, and never more than 2% below.
    law = random_matrix_stable_rank(m, n)
    assert empirical == pytest.approx(law, rel=0.06)
    assert empirical > 0.98 * law


def test_random_matrix_stable_rank_formula():
    assert random_matrix_stable_rank(64, 64) == pytest.approx(16.0)
    assert random_matrix_stable_rank(64, 256) == pytest.approx(64 * 256 / (8 + 16) ** 2)
    assert random_matrix_stable_rank(64, 256) == random_matrix_stable_rank(256, 64)


@pytest.mark.parametrize("m,n", [(1, 1), (2, 3), (64, 64), (64, 256), (768, 3072), (10, 7), (100, 1), (33, 65)])
def test_break_even_rank_is_smallest_rank_not_saving(m, n):
    r = break_even_rank(m, n)
    assert r * (m + n) >= m * n
    assert (r - 1) * (m + n) < m * n
    brute = next(k for k in range(0, min(m, n) + 2) if k * (m + n) >= m * n)
    assert r == brute
    assert r <= min(m, n)


def test_break_even_examples():
    assert break_even_rank(64, 64) == 32  # 32 * 128 == 64 * 64: saves nothing
    assert break_even_rank(768, 3072) == 615  # 768*3072/3840 = 614.4


# --------------------------------------------------------------------------- rules on known spectra
VALUES = torch.tensor([4.0, 2.0, 2.0, 1.0])  # squares 16, 4, 4, 1: sum 25, srank 25/16 = 1.5625


@pytest.mark.parametrize(
    "rule,kwargs,expected",
    [
        ("stable_rank", {}, 2),  # ceil(1.5625)
        ("scaled_stable_rank", {"xi": 1.0}, 2),
        ("scaled_stable_rank", {"xi": 2.0}, 4),  # ceil(3.125)
        ("scaled_stable_rank", {"xi": 1.6}, 3),  # ceil(2.5)
        ("stable_rank", {"xi": 2.0}, 2),  # plain stable_rank ignores xi
        ("energy", {"energy": 0.5}, 1),  # cumulative 0.64, 0.80, 0.96, 1.0
        ("energy", {"energy": 0.64}, 1),
        ("energy", {"energy": 0.7}, 2),
        ("energy", {"energy": 0.8}, 2),
        ("energy", {"energy": 0.9}, 3),
        ("energy", {"energy": 0.97}, 4),
        ("energy", {"energy": 1.0}, 4),
        ("fixed_ratio", {"ratio": 0.25}, 1),
        ("fixed_ratio", {"ratio": 0.3}, 2),  # ceil(1.2)
        ("fixed_ratio", {"ratio": 0.5}, 2),
        ("fixed_ratio", {"ratio": 1.0}, 4),
    ],
)
def test_rules_on_known_singular_values(rule, kwargs, expected):
    assert rank_from_singular_values(VALUES, rule, **kwargs) == expected


def test_integer_stable_rank_is_not_rounded_up():
    # Singular values [1, 1, 1, 0, 0]: srank exactly 3, so ceil gives 3 (not 4 from fp noise).
    values = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0])
    assert rank_from_singular_values(values, "stable_rank") == 3
    assert rank_from_singular_values(values, "scaled_stable_rank", xi=1.0) == 3
    # All energy sits in the first 3 values.
    assert rank_from_singular_values(values, "energy", energy=1.0) == 3


def test_clipping_to_min_rank_and_full_rank():
    assert rank_from_singular_values(VALUES, "stable_rank", min_rank=3) == 3
    assert rank_from_singular_values(VALUES, "stable_rank", min_rank=10) == 4  # min_rank above full rank
    assert rank_from_singular_values(VALUES, "scaled_stable_rank", xi=100.0) == 4
    assert rank_from_singular_values(VALUES, "fixed_ratio", ratio=0.01) == 1
    assert rank_from_singular_values(torch.zeros(6), "stable_rank") == 1  # zero matrix: min_rank, no NaN
    assert rank_from_singular_values(torch.zeros(6), "energy", energy=0.9) == 6


def test_unknown_rule_raises():
    with pytest.raises(ValueError, match="Unknown rank rule"):
        rank_from_singular_values(VALUES, "svd")
    assert set(RANK_RULES) == {"scaled_stable_rank", "stable_rank", "energy", "fixed_ratio", "kind_fractions"}


# --------------------------------------------------------------------------- xi
@pytest.mark.parametrize("shape,expected_xi", [((64, 64), 4.0), ((64, 256), 2.25), ((256, 64), 2.25),
                                                ((100, 400), 2.25), ((3072, 768), 2.25)])
def test_random_matrix_xi_law(shape, expected_xi):
    xi, reference = xi_for(shape, init_stable_rank=2.0, reference="random_matrix")
    assert reference == "random_matrix"
    m, n = sorted(shape)
    assert xi == pytest.approx((1 + math.sqrt(m / n)) ** 2)
    assert xi == pytest.approx(expected_xi)


def test_xi_auto_picks_random_matrix_for_pretrained_and_init_for_gaussian():
    pretrained = _decaying(64, 96)
    gaussian = torch.randn(64, 96, generator=_gen(2)) * 0.02
    s_pre, s_gauss = stable_rank(pretrained), stable_rank(gaussian)
    assert s_pre < 5
    xi, reference = xi_for((64, 96), s_pre, "auto")
    assert reference == "random_matrix"
    assert xi == pytest.approx((1 + math.sqrt(64 / 96)) ** 2)
    xi, reference = xi_for((64, 96), s_gauss, "auto")
    assert reference == "init"
    assert xi == pytest.approx(64 / s_gauss)
    # Explicit references are obeyed whatever the weight looks like.
    assert xi_for((64, 96), s_pre, "init") == (pytest.approx(64 / s_pre), "init")
    assert xi_for((64, 96), s_gauss, "random_matrix")[1] == "random_matrix"


def test_xi_edge_cases():
    xi, _ = xi_for((8, 8), 0.0, "init")  # zero init: unbounded scale, no ZeroDivisionError
    assert xi > 1e6
    with pytest.raises(ValueError, match="xi reference"):
        xi_for((8, 8), 1.0, "pretrained")


# --------------------------------------------------------------------------- decide_ranks
def test_decide_ranks_stable_rank_rule_and_break_even():
    weights = {
        "low": _with_singular_values([1.0] * 8 + [0.0] * 56, 64),  # srank 8, break-even 32
        "high": _with_singular_values([1.0] * 40 + [0.0] * 24, 64, seed=1),  # srank 40 >= 32
        "conv": torch.randn(16, 4, 3, 3, generator=_gen(3)),
    }
    decisions = {d.name: d for d in decide_ranks(weights, "stable_rank")}
    assert list(decisions) == ["low", "high", "conv"]
    low, high, conv = decisions["low"], decisions["high"], decisions["conv"]
    assert isinstance(low, RankDecision)
    assert (low.rank, low.factorize, low.shape, low.full_rank) == (8, True, (64, 64), 64)
    assert low.stable_rank == pytest.approx(8.0, rel=1e-4)
    assert (high.rank, high.factorize) == (40, False)
    assert conv.shape == (16, 36) and conv.full_rank == 16
    assert conv.rank == math.ceil(stable_rank(weights["conv"]) - 1e-9)
    assert conv.factorize == (conv.rank < break_even_rank(16, 36))
    assert all(d.xi_reference is None and d.rule == "stable_rank" for d in decisions.values())


def test_decide_ranks_break_even_boundary():
    weight = torch.randn(64, 64, generator=_gen(4))
    at = decide_ranks({"w": weight}, "fixed_ratio", ratio=0.5)[0]  # 32 == break-even: no saving
    below = decide_ranks({"w": weight}, "fixed_ratio", ratio=0.484375)[0]  # 31
    assert (at.rank, at.factorize) == (32, False)
    assert (below.rank, below.factorize) == (31, True)


def test_decide_ranks_scaled_with_init_reference():
    weight = _with_singular_values([1.0] * 8 + [0.0] * 56, 64)  # srank 8
    d = decide_ranks({"w": weight}, "scaled_stable_rank", init_stable_ranks={"w": 32.0}, xi_reference="init")[0]
    assert (d.rank, d.factorize, d.xi_reference) == (16, True, "init")  # xi = 64/32 = 2
    d = decide_ranks({"w": weight}, "scaled_stable_rank", init_stable_ranks={"w": 16.0}, xi_reference="init")[0]
    assert (d.rank, d.factorize) == (32, False)  # xi = 4 -> 32 = break-even


def test_decide_ranks_scaled_auto_on_pretrained_uses_random_matrix():
    weight = _decaying(64, 64)
    srank = stable_rank(weight)
    d = decide_ranks({"w": weight}, "scaled_stable_rank", init_stable_ranks={"w": srank})[0]
    assert d.xi_reference == "random_matrix"
    assert d.rank == math.ceil(srank * 4.0 - 1e-9)
    assert d.factorize
    # With the "init" reference the same pretrained layer would stay full rank: the bug the auto rule avoids.
    d = decide_ranks({"w": weight}, "scaled_stable_rank", init_stable_ranks={"w": srank}, xi_reference="init")[0]
    assert (d.rank, d.factorize) == (64, False)


def test_decide_ranks_energy_and_min_rank():
    weight = _with_singular_values([4.0, 2.0, 2.0, 1.0] + [0.0] * 12, 16)
    assert decide_ranks({"w": weight}, "energy", energy=0.9)[0].rank == 3
    assert decide_ranks({"w": weight}, "energy", energy=0.9, min_rank=5)[0].rank == 5


def test_decide_ranks_overrides():
    weights = {"a": torch.randn(64, 64, generator=_gen(5)), "b": torch.randn(64, 64, generator=_gen(6))}
    decisions = decide_ranks(weights, "fixed_ratio", ratio=0.25, rank_overrides={"a": 5})
    assert [(d.name, d.rank, d.factorize) for d in decisions] == [("a", 5, True), ("b", 16, True)]
    decisions = decide_ranks(weights, "fixed_ratio", ratio=0.25, rank_overrides={"a": 40, "b": 1000})
    assert [(d.rank, d.factorize) for d in decisions] == [(40, False), (64, False)]  # override clipped to full


def test_decide_ranks_fp16_weights():
    weight = _with_singular_values([1.0] * 8 + [0.0] * 24, 32).half()
    d = decide_ranks({"w": weight}, "stable_rank")[0]
    assert d.rank == 8 and d.factorize


def test_kind_fractions_rule_keeps_the_kind_fraction_of_each_layer():
    model = tiny_bert(seed=0)  # hidden 32, FFN 64
    targets = find_targets(model)
    weights = {n: model.get_submodule(n).weight for n in targets}
    decisions = decide_ranks(weights, "kind_fractions")   # default: attention 0.4 / FFN 0.7
    for d in decisions:
        m, n = d.shape
        fraction = 0.4 if layer_kind(d.name) == "attention" else 0.7
        assert d.rule == "kind_fractions" and d.rank == int(fraction * m * n // (m + n)) and d.factorize
        assert d.stable_rank == pytest.approx(stable_rank(weights[d.name]), rel=1e-6)  # for the report
    kept = sum(d.rank * sum(d.shape) for d in decisions) / sum(d.shape[0] * d.shape[1] for d in decisions)
    assert 0.5 < kept <= 0.6
    uniform = decide_ranks(weights, "kind_fractions", kind_fractions={"attention": 0.5, "ffn": 0.5})
    assert {d.rank for d in uniform if d.shape == (32, 32)} == {8}
    other = decide_ranks({"features.conv": torch.randn(20, 20)}, "kind_fractions")[0]  # no known kind: 0.6
    assert other.rank == 6


def test_the_registry_holds_the_configs_rule_names_and_rules_are_small_functions():
    assert set(RANK_RULES) == set(CONFIG_RULE_NAMES)
    assert {name for name, rule in RANK_RULES.items() if not rule.reads_spectrum} == {"fixed_ratio", "kind_fractions"}
    layer = LayerMeasurement("encoder.0.attention.query", (64, 64), torch.ones(64), init_stable_rank=64.0)
    assert RANK_RULES["fixed_ratio"].function(layer, RuleOptions(ratio=0.5)) == (32, None)
    assert RANK_RULES["stable_rank"].function(layer, RuleOptions()) == (64, None)
    assert RANK_RULES["kind_fractions"].function(layer, RuleOptions()) == (12, None)  # floor(0.4 * 64 / 2)
    with pytest.raises(ValueError, match="choose one of"):
        decide_ranks({"w": torch.eye(4)}, "aa_budget")


def test_rules_that_read_no_spectrum_take_no_svd_of_the_weights(monkeypatch):
    import cuttlefish_hf.rank_rules as rank_rules

    calls = []
    monkeypatch.setattr(rank_rules, "singular_values", lambda *a, **k: calls.append(a) or [])
    decide_ranks({"w": torch.eye(8)}, "fixed_ratio", ratio=0.25)
    assert calls == []


def test_rank_multiple_rounds_up_but_never_to_a_rank_that_saves_nothing():
    assert round_rank(13, 8, 64, 64) == 16 and round_rank(16, 8, 64, 64) == 16 and round_rank(13, 1, 64, 64) == 13
    assert break_even_rank(64, 64) == 32
    assert round_rank(30, 8, 64, 64) == 30   # 32 would save no parameters: left as chosen
    assert round_rank(5, 64, 64, 64) == 5    # 64 passes the break-even rank too
    weights = {"a": torch.randn(64, 64, generator=_gen(3)), "b": torch.randn(64, 64, generator=_gen(4))}
    decisions = decide_ranks(weights, "fixed_ratio", ratio=0.2, rank_multiple=8, rank_overrides={"b": 13})
    assert [(d.rank, d.factorize) for d in decisions] == [(16, True), (13, True)]  # ceil(12.8)=13 -> 16; b as given
