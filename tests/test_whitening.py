"""Tests for cuttlefish_hf.whitening and the whitened init: truncation in the metric of a layer's inputs."""

from __future__ import annotations

import pytest
import torch

from cuttlefish_hf.inits import make_init, whitened_init
from cuttlefish_hf.layers import FactorizedLinear, svd_factors
from cuttlefish_hf.statistics import ActivationStats
from cuttlefish_hf.surgery import factorize_
from cuttlefish_hf.targeting import find_targets
from cuttlefish_hf.whitening import damped_cholesky, output_error, whitened_factors
from helpers import tiny_bert


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _correlated(tokens: int, n: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """Inputs with a strongly anisotropic, non-diagonal second moment (like LayerNorm outputs)."""
    g = _gen(seed)
    mixing = torch.randn(n, n, generator=g, dtype=dtype) * torch.logspace(0, -2, n, dtype=dtype)[:, None]
    return torch.randn(tokens, n, generator=g, dtype=dtype) @ mixing + 0.3


@pytest.mark.parametrize("with_covariance", [True, False])
def test_whitened_factors_reproduce_weight_at_full_rank(with_covariance):
    weight = torch.randn(7, 10, generator=_gen(1))
    x = _correlated(6, 10)  # fewer tokens than inputs: a singular covariance, damping makes it factor
    cov = (x.T @ x / x.shape[0]).float()
    first, second = whitened_factors(weight, cov if with_covariance else None, 7)
    assert first.shape == (7, 10) and second.shape == (7, 7)
    torch.testing.assert_close(second @ first, weight, rtol=1e-4, atol=1e-4)


def test_whitened_error_beats_plain_svd_and_equals_whitened_tail():
    weight = torch.randn(12, 16, generator=_gen(2), dtype=torch.float64).float()
    x = _correlated(400, 16, seed=3)
    cov = x.T @ x / x.shape[0]
    values = torch.linalg.svdvals(weight.double() @ damped_cholesky(cov, damping=0.0))
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


def test_factorize_with_the_whitened_init_keeps_bias_and_beats_plain_on_recorded_data():
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
    report = factorize_(model, plan, init=whitened_init(covs, damping=0.0))
    assert report.plan == plan
    for name in targets:
        ours, plain = model.get_submodule(name), plain_model.get_submodule(name)
        assert isinstance(ours, FactorizedLinear) and ours.second.bias is biases[name]
        assert output_error(dense[name], ours.merged_weight(), covs[name]) < \
            output_error(dense[name], plain.merged_weight(), covs[name])


def test_the_whitened_init_needs_covariances_and_unknown_inits_are_refused():
    with pytest.raises(ValueError, match="input covariances"):
        make_init("whitened")
    with pytest.raises(ValueError, match="choose one of"):
        make_init("lora")
    weight = torch.randn(6, 9, generator=_gen(7))
    first, second = make_init("whitened", covariances={})("no-statistics", weight, 3)  # plain SVD fallback
    plain_first, plain_second = svd_factors(weight, 3)
    torch.testing.assert_close(second @ first, plain_second @ plain_first)


def test_damped_cholesky_of_a_covariance_without_signal_is_none():
    assert damped_cholesky(torch.zeros(4, 4)) is None
    chol = damped_cholesky(torch.ones(4, 4))  # rank 1: the damping makes it factor
    torch.testing.assert_close(chol @ chol.T, torch.ones(4, 4, dtype=torch.float64) + 0.01 * torch.eye(4, dtype=torch.float64))
