"""Tests for cuttlefish_hf.stable_rank: exact stable ranks and the warm-started power-iteration meter."""

from __future__ import annotations

import math

import pytest
import torch

from cuttlefish_hf.stable_rank import (
    StableRankMeter,
    as_matrix,
    check_finite,
    singular_values,
    stable_rank,
    stable_ranks,
    top_right_singular_vectors,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _with_singular_values(values, n: int | None = None, seed: int = 0) -> torch.Tensor:
    """An ``m x n`` matrix ``U diag(values) V^T`` with random orthonormal ``U``, ``V`` (m = len(values))."""
    values = torch.as_tensor(values, dtype=torch.float64)
    m = values.numel()
    n = n or m
    g = _gen(seed)
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=torch.float64))
    return (u * values) @ v.T


# --------------------------------------------------------------------------- exact stable rank
@pytest.mark.parametrize("n", [1, 3, 16, 64])
def test_identity_has_stable_rank_n(n):
    assert stable_rank(torch.eye(n)) == pytest.approx(n, rel=1e-6)


def test_rank_one_matrix_has_stable_rank_one():
    g = _gen()
    matrix = torch.outer(torch.randn(20, generator=g), torch.randn(30, generator=g))
    assert stable_rank(matrix) == pytest.approx(1.0, rel=1e-5)


def test_known_spectrum():
    # ||W||_F^2 / sigma_max^2 = (16 + 4 + 4 + 1) / 16
    matrix = _with_singular_values([4.0, 2.0, 2.0, 1.0], n=7).float()
    assert stable_rank(matrix) == pytest.approx(25 / 16, rel=1e-5)


@pytest.mark.parametrize("scale", [1e-3, 0.5, 7.0, 1e3])
def test_scale_invariance(scale):
    matrix = torch.randn(24, 40, generator=_gen(1))
    assert stable_rank(matrix * scale) == pytest.approx(stable_rank(matrix), rel=1e-5)


def test_stable_rank_is_at_most_rank():
    matrix = torch.randn(30, 5, generator=_gen(2)) @ torch.randn(5, 30, generator=_gen(3))
    value = stable_rank(matrix)
    assert 1.0 <= value <= 5.0 + 1e-4


def test_conv_weight_read_as_out_by_in_k_k():
    weight = torch.randn(8, 3, 3, 3, generator=_gen(4))
    assert as_matrix(weight).shape == (8, 27)
    expected = stable_rank(weight.reshape(8, 27))
    assert stable_rank(weight) == pytest.approx(expected, rel=1e-6)
    # Reading it any other way gives another number, so the layout matters.
    assert abs(stable_rank(weight.reshape(24, 9)) - expected) > 0.1
    # Stable rank of the (out, in*k*k) matrix computed independently in float64.
    s = torch.linalg.svdvals(weight.reshape(8, -1).double())
    assert stable_rank(weight) == pytest.approx(float((s**2).sum() / s[0] ** 2), rel=1e-5)


def test_half_precision_inputs_computed_in_fp32():
    # Entries of 300: their squares (90 000) overflow fp16 (max 65 504) if the norm were taken in fp16.
    flat = torch.full((4, 4), 300.0, dtype=torch.float16)
    assert stable_rank(flat) == pytest.approx(1.0, rel=1e-5)
    assert stable_rank(torch.eye(4, dtype=torch.float16) * 300) == pytest.approx(4.0, rel=1e-5)
    assert as_matrix(flat).dtype == torch.float32
    for dtype in (torch.float16, torch.bfloat16):
        weight = torch.randn(16, 12, generator=_gen(5)).to(dtype)
        assert as_matrix(weight).dtype == torch.float32
        assert stable_rank(weight) == pytest.approx(stable_rank(weight.float()), rel=1e-6)
        meter_value = StableRankMeter(n_iter_first=60).measure({"w": weight})["w"]
        assert meter_value == pytest.approx(stable_rank(weight.float()), rel=2e-2)
    assert StableRankMeter().measure({"w": flat})["w"] == pytest.approx(1.0, rel=1e-5)


def test_zero_matrix_gives_zero_not_nan():
    assert stable_rank(torch.zeros(5, 7)) == 0.0
    assert StableRankMeter().measure({"z": torch.zeros(5, 7)})["z"] == 0.0


def test_batched_equals_per_layer_and_keeps_order():
    g = _gen(6)
    weights = [
        torch.randn(16, 32, generator=g),
        torch.randn(8, 4, 3, 3, generator=g),
        torch.randn(16, 32, generator=g) * 3,
        torch.eye(10),
        torch.randn(8, 4, 3, 3, generator=g).half(),
        torch.randn(32, 16, generator=g),
    ]
    batched = stable_ranks(weights)
    assert len(batched) == len(weights)
    assert all(type(value) is float for value in batched)
    for weight, value in zip(weights, batched):
        assert value == pytest.approx(stable_rank(weight), rel=1e-5)
    assert batched[3] == pytest.approx(10.0, rel=1e-6)
    assert stable_ranks([]) == []


def test_singular_values_match_svdvals():
    g = _gen(7)
    weights = [torch.randn(6, 9, generator=g), torch.randn(6, 9, generator=g), torch.randn(4, 2, 2, 2, generator=g)]
    for weight, values in zip(weights, singular_values(weights)):
        expected = torch.linalg.svdvals(weight.reshape(weight.shape[0], -1).double()).float()
        assert values.dtype == torch.float32
        assert torch.allclose(values, expected, rtol=1e-5, atol=1e-6)
        assert torch.all(values[:-1] >= values[1:])


# --------------------------------------------------------------------------- power-iteration meter
def test_meter_returns_plain_floats_in_input_order():
    g = _gen(8)
    weights = {"b": torch.randn(8, 8, generator=g), "a": torch.randn(4, 6, generator=g),
               "c": torch.randn(8, 8, generator=g)}
    ranks = StableRankMeter().measure(weights)
    assert list(ranks) == ["b", "a", "c"]
    assert all(type(value) is float for value in ranks.values())


def test_meter_exact_on_identity_and_rank_one():
    g = _gen(9)
    rank_one = torch.outer(torch.randn(12, generator=g), torch.randn(9, generator=g))
    ranks = StableRankMeter(n_iter=4).measure({"eye": torch.eye(8), "r1": rank_one})
    assert ranks["eye"] == pytest.approx(8.0, rel=1e-5)
    assert ranks["r1"] == pytest.approx(1.0, rel=1e-5)


def test_meter_agrees_with_exact_on_spectral_gap_within_1e_3():
    # sigma_2 / sigma_1 = 0.5: 30 first iterations shrink the error by 0.25^30; warm starts keep it.
    spectrum = [10.0, 5.0] + [4.0 * 0.9**i for i in range(30)]
    weights = {f"w{i}": _with_singular_values(spectrum, n=48, seed=i).float() for i in range(3)}
    meter = StableRankMeter(n_iter=4, n_iter_first=30)
    g = _gen(10)
    for _ in range(5):
        exact = dict(zip(weights, stable_ranks(list(weights.values()))))
        measured = meter.measure(weights)
        for name in weights:
            assert measured[name] == pytest.approx(exact[name], rel=1e-3)
        # training moves the weights a little between measurements
        weights = {n: w + 0.01 * torch.randn(w.shape, generator=g) for n, w in weights.items()}


def test_meter_on_gaussian_matrices_and_warm_start_never_hurts():
    # Square Gaussian matrices have almost no gap between sigma_1 and sigma_2, so power iteration converges
    # slowly. Measured (seed 0, 8 matrices 64x64): 6.4% worst relative error after the first 30 iterations,
    # 4.7% after five more warm-started measurements of 4 iterations. Tolerances: 8% and 6%.
    g = _gen(0)
    weights = {f"w{i}": torch.randn(64, 64, generator=g) for i in range(8)}
    exact = dict(zip(weights, stable_ranks(list(weights.values()))))
    meter = StableRankMeter(n_iter=4, n_iter_first=30, exact_start=False)
    errors = []
    for _ in range(6):
        measured = meter.measure(weights)
        for name in weights:  # ||A v|| <= sigma_max, so power iteration can only overestimate the stable rank
            assert measured[name] >= exact[name] * (1 - 1e-5)
        errors.append(max(measured[n] / exact[n] - 1 for n in weights))
    assert errors[0] < 0.08
    assert errors[-1] < 0.06
    for before, after in zip(errors, errors[1:]):
        assert after <= before + 1e-6  # warm start holds or improves accuracy on unchanged weights
    assert errors[-1] < errors[0] * 0.9


def test_meter_warm_start_beats_cold_start_with_same_iterations():
    g = _gen(11)
    weights = {f"w{i}": torch.randn(48, 64, generator=g) for i in range(4)}
    exact = dict(zip(weights, stable_ranks(list(weights.values()))))
    warm = StableRankMeter(n_iter=4, n_iter_first=4, exact_start=False)
    for _ in range(5):
        warm_values = warm.measure(weights)
    cold_values = StableRankMeter(n_iter=4, n_iter_first=4, exact_start=False).measure(weights)
    warm_error = max(warm_values[n] / exact[n] - 1 for n in weights)
    cold_error = max(cold_values[n] / exact[n] - 1 for n in weights)
    assert warm_error < cold_error


def test_meter_exact_start_tracks_drifting_gaussian_matrices_without_bias():
    # The default start (exact top singular vector) removes the random-start bias that would otherwise shrink
    # over the first measurements and look like the stable rank of a fresh init still settling.
    g = _gen(21)
    weights = {f"w{i}": torch.randn(64, 64, generator=g) for i in range(4)}
    meter = StableRankMeter(n_iter=4)
    for _ in range(6):
        exact = dict(zip(weights, stable_ranks(list(weights.values()))))
        measured = meter.measure(weights)
        assert max(abs(measured[n] / exact[n] - 1) for n in weights) < 5e-3
        weights = {n: w + 0.01 * torch.randn(w.shape, generator=g) for n, w in weights.items()}


def test_meter_is_deterministic_for_a_seed():
    weights = {"w": torch.randn(32, 32, generator=_gen(12))}
    first = StableRankMeter(n_iter_first=3, seed=5).measure(weights)
    second = StableRankMeter(n_iter_first=3, seed=5).measure(weights)
    assert first == second


def test_meter_batches_mixed_shapes_like_per_layer():
    g = _gen(13)
    weights = {"a": torch.randn(16, 16, generator=g), "conv": torch.randn(8, 2, 3, 3, generator=g),
               "b": torch.randn(16, 16, generator=g), "c": torch.randn(16, 24, generator=g)}
    together = StableRankMeter(n_iter_first=200).measure(weights)
    for name, weight in weights.items():
        alone = StableRankMeter(n_iter_first=200).measure({name: weight})[name]
        assert together[name] == pytest.approx(alone, rel=1e-4)
        assert together[name] == pytest.approx(stable_rank(weight), rel=5e-3)


def test_meter_forget_and_shape_change():
    meter = StableRankMeter()
    meter.measure({"layer": torch.randn(8, 8, generator=_gen(14))})
    # The same name now holds a weight of another shape (e.g. the layer was rebuilt): starts afresh.
    value = meter.measure({"layer": torch.eye(8, 16)})["layer"]
    assert value == pytest.approx(8.0, rel=1e-5)
    meter.forget(["layer", "never-measured"])
    assert meter.measure({"layer": torch.eye(4)})["layer"] == pytest.approx(4.0, rel=1e-5)
    assert math.isfinite(meter.measure({"layer": torch.eye(4), "new": torch.eye(4)})["new"])


def test_meter_recovers_after_zero_weight():
    # A zero-initialized layer must not poison the warm start: its stable rank is finite once it moves.
    meter = StableRankMeter(n_iter=4)
    assert meter.measure({"z": torch.zeros(8, 8)})["z"] == 0.0
    assert meter.measure({"z": torch.eye(8)})["z"] == pytest.approx(8.0, rel=1e-5)
    weight = torch.diag(torch.tensor([4.0, 1.0, 1.0, 0.5]))
    meter = StableRankMeter(n_iter=20)
    meter.measure({"z": torch.zeros(4, 4)})
    assert meter.measure({"z": weight})["z"] == pytest.approx(stable_rank(weight), rel=1e-4)


# --------------------------------------------------------------------------- extreme and non-finite weights
@pytest.mark.parametrize("scale", [1e30, 1e37, 1e-30, 1e-37])
def test_extreme_scales_give_the_unscaled_stable_rank(scale):
    # 1e30 fp32 entries used to square to inf (stable rank NaN), 1e-30 ones to 0 (stable rank 0).
    weights = {"square": torch.randn(24, 24, generator=_gen(20)), "conv": torch.randn(8, 4, 3, 3, generator=_gen(21))}
    expected = {name: stable_rank(weight) for name, weight in weights.items()}
    scaled = {name: weight * scale for name, weight in weights.items()}
    assert all(torch.isfinite(w).all() and w.abs().max() > 0 for w in scaled.values())  # fp32 holds them
    for name, weight in scaled.items():
        assert stable_rank(weight) == pytest.approx(expected[name], rel=1e-5)
    meter, reference = StableRankMeter(), StableRankMeter()
    for _ in range(2):  # exact start, then warm start
        got, want = meter.measure(scaled), reference.measure(weights)
        assert got == pytest.approx(want, rel=1e-4)
    assert got == pytest.approx(expected, rel=1e-3)
    # normalized singular values: the spectrum's shape, whatever the scale (1 at the top)
    values = singular_values(list(scaled.values()), normalized=True)
    plain = singular_values(list(weights.values()))
    for got_values, want_values in zip(values, plain):
        assert torch.allclose(got_values / got_values[0], want_values / want_values[0], rtol=1e-4, atol=1e-6)


def test_check_finite_names_every_bad_layer_and_the_fix():
    good, nan, inf = torch.ones(3, 3), torch.ones(3, 3), torch.ones(2, 2, 3, 3)
    nan[1, 2], inf[0, 1, 2, 2] = float("nan"), float("-inf")
    check_finite({"good": good})  # finite: no error
    with pytest.raises(ValueError) as info:
        check_finite({"good": good, "blocks.0.fc": nan, "blocks.1.conv": inf.half()}, "choosing ranks")
    message = str(info.value)
    assert message.startswith("The weights of 'blocks.0.fc', 'blocks.1.conv' are NaN/inf before choosing ranks")
    assert "'good'" not in message
    assert "learning rate" in message and "fp16" in message
    with pytest.raises(ValueError, match=r"'l3', 'l4' and 3 more are NaN/inf before factorizing"):
        check_finite({f"l{i}": nan for i in range(8)})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_meter_names_non_finite_weights(bad):
    # Used to fail in torch.linalg.svd naming no layer (first measurement) or return NaN (warm-started ones).
    weights = {"ok": torch.randn(6, 6, generator=_gen(22)), "diverged": torch.randn(6, 6, generator=_gen(23))}
    broken = dict(weights, diverged=weights["diverged"].clone().index_fill_(0, torch.tensor([2]), bad))
    with pytest.raises(ValueError, match=r"^The weights of 'diverged' are NaN/inf before measuring stable ranks"):
        StableRankMeter().measure(broken)
    meter = StableRankMeter()
    meter.measure(weights)
    with pytest.raises(ValueError, match=r"^The weights of 'diverged' are NaN/inf before measuring stable ranks"):
        meter.measure(broken)


def test_exact_stable_ranks_of_non_finite_weights_are_nan_not_a_lapack_error():
    # Callers without names (a list of weights) get NaN for the broken ones and exact values for the rest;
    # a NaN used to make LAPACK fail the whole batch ("linalg.svd: ... non-finite values"), naming no layer.
    good = torch.randn(6, 6, generator=_gen(24))
    weights = [good, torch.full((6, 6), float("nan")), good.clone().fill_(float("inf")), torch.eye(6)]
    ranks = stable_ranks(weights)
    assert ranks[0] == pytest.approx(stable_rank(good), rel=1e-6) and ranks[3] == pytest.approx(6.0, rel=1e-6)
    assert math.isnan(ranks[1]) and math.isnan(ranks[2])
    values = singular_values(weights)
    assert torch.isnan(values[1]).all() and torch.isfinite(values[0]).all()


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32)])
def test_top_right_singular_vectors_are_the_svds_up_to_sign(shape):
    flat = torch.randn(3, *shape, generator=_gen(4))  # near-Gaussian: close top singular values
    decaying = flat * 0.8 ** torch.arange(shape[1], dtype=torch.float32)
    for matrices in (flat, decaying):
        vectors = top_right_singular_vectors(matrices)
        exact = torch.linalg.svd(matrices.double(), full_matrices=False).Vh[:, 0, :]
        cosines = (vectors.double() * exact).sum(dim=1).abs()
        torch.testing.assert_close(cosines, torch.ones(3, dtype=torch.float64), atol=1e-4, rtol=0)


def test_meter_starts_without_a_full_svd(monkeypatch):
    weights = {"a": torch.randn(48, 16, generator=_gen(5)), "b": torch.randn(16, 48, generator=_gen(6))}
    monkeypatch.setattr(torch.linalg, "svd", lambda *args, **kwargs: pytest.fail("a full SVD"))
    ranks = StableRankMeter(n_iter=2).measure(weights)
    monkeypatch.undo()
    for name, weight in weights.items():
        assert ranks[name] == pytest.approx(stable_rank(weight), rel=1e-4)
