"""Tests for cuttlefish_hf.layers: factorized Linear/Conv2d, SVD init, merge and Frobenius decay."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cuttlefish_hf.layers import (
    FactorizedConv2d,
    FactorizedLayer,
    FactorizedLinear,
    dense_shape,
    full_rank,
    svd_factors,
    truncated_svd,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --------------------------------------------------------------------------- Linear
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(24, 16), (16, 24), (20, 20)])
def test_full_rank_linear_reproduces_dense(shape, bias):
    out_features, in_features = shape
    dense = nn.Linear(in_features, out_features, bias=bias)
    layer = FactorizedLinear.from_linear(dense, rank=min(shape))
    x = torch.randn(5, 3, in_features)  # extra leading dims work like nn.Linear
    assert torch.allclose(layer(x), dense(x), atol=1e-5)
    assert layer.first.weight.shape == (min(shape), in_features)
    assert layer.second.weight.shape == (out_features, min(shape))
    assert layer.first.bias is None
    assert (layer.second.bias is None) == (not bias)


def test_bias_parameter_is_shared_with_original():
    dense = nn.Linear(8, 6)
    layer = FactorizedLinear.from_linear(dense, rank=3)
    assert layer.second.bias is dense.bias
    assert layer.to_linear().bias is dense.bias
    conv = nn.Conv2d(3, 5, 3)
    factorized = FactorizedConv2d.from_conv(conv, rank=2)
    assert factorized.second.bias is conv.bias
    assert factorized.to_conv().bias is conv.bias


def _eckart_young_tail(matrix: torch.Tensor, rank: int) -> float:
    s = torch.linalg.svdvals(matrix.detach().double())
    return float((s[rank:] ** 2).sum())


@pytest.mark.parametrize("rank", [1, 3, 7, 12])
def test_linear_truncation_error_is_eckart_young_tail(rank):
    dense = nn.Linear(12, 20)
    layer = FactorizedLinear.from_linear(dense, rank=rank)
    error = float((dense.weight.detach().double() - layer.merged_weight().detach().double()).square().sum())
    expected = _eckart_young_tail(dense.weight, rank)
    assert error == pytest.approx(expected, rel=1e-4, abs=1e-8)
    # And the factorized layer's output equals x @ merged^T + b exactly (up to fp32).
    x = torch.randn(4, 12)
    assert torch.allclose(layer(x), x @ layer.merged_weight().T + dense.bias, atol=1e-5)


def test_svd_factors_balanced():
    matrix = torch.randn(10, 6)
    first, second = svd_factors(matrix, 4)
    assert first.shape == (4, 6) and second.shape == (10, 4)
    # sqrt(S) on both sides: the factors have equal column/row norms.
    assert torch.allclose(first.norm(dim=1), second.norm(dim=0), atol=1e-5)
    s = torch.linalg.svdvals(matrix)
    assert torch.allclose(first.norm(dim=1) ** 2, s[:4], atol=1e-5)


def test_to_linear_round_trip():
    dense = nn.Linear(16, 10)
    layer = FactorizedLinear.from_linear(dense, rank=4)
    merged = layer.to_linear()
    assert isinstance(merged, nn.Linear)
    assert (merged.in_features, merged.out_features) == (16, 10)
    assert torch.allclose(merged.weight, layer.merged_weight(), atol=1e-6)
    x = torch.randn(3, 16)
    assert torch.allclose(merged(x), layer(x), atol=1e-5)
    again = FactorizedLinear.from_linear(merged, rank=4)  # a rank-4 matrix is reproduced exactly
    assert torch.allclose(again(x), layer(x), atol=1e-5)


def test_linear_extra_repr_and_shape_helpers():
    layer = FactorizedLinear.from_linear(nn.Linear(16, 10), rank=4)
    text = repr(layer)
    assert "rank=4" in text and "in_features=16" in text and "out_features=10" in text
    assert isinstance(layer, FactorizedLayer)
    assert dense_shape(layer) == (10, 16)
    assert full_rank(layer) == 10
    assert full_rank(nn.Linear(16, 10)) == 10


@pytest.mark.parametrize("rank", [0, -1, 11])
def test_linear_rank_out_of_range_raises(rank):
    with pytest.raises(ValueError, match="rank must be in"):
        FactorizedLinear(16, 10, rank)
    with pytest.raises(ValueError, match="rank must be in"):
        FactorizedLinear.from_linear(nn.Linear(16, 10), rank)


def test_frozen_linear_gives_frozen_factors():
    dense = nn.Linear(8, 8)
    dense.weight.requires_grad_(False)
    layer = FactorizedLinear.from_linear(dense, rank=2)
    assert not layer.first.weight.requires_grad and not layer.second.weight.requires_grad
    assert not layer.to_linear().weight.requires_grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_linear(dtype):
    dense = nn.Linear(32, 24)
    x = torch.randn(4, 32)
    expected = dense(x).detach()  # fp32 output before the cast
    low = FactorizedLinear.from_linear(dense.to(dtype), rank=24)
    assert low.first.weight.dtype == dtype and low.second.weight.dtype == dtype
    assert low.second.bias is dense.bias and dense.bias.dtype == dtype
    out = low(x.to(dtype))
    assert out.dtype == dtype
    assert torch.allclose(out.float(), expected, atol=0.05, rtol=0.05)
    assert low.merged_weight().dtype == torch.float32
    assert low.to_linear().weight.dtype == dtype


# --------------------------------------------------------------------------- Conv2d
CONV_CASES = [
    dict(in_channels=3, out_channels=8, kernel_size=3, stride=2, padding=1, dilation=2, bias=False),
    dict(in_channels=4, out_channels=6, kernel_size=(1, 3), stride=(1, 2), padding=(0, 1), bias=True),
    dict(in_channels=2, out_channels=5, kernel_size=(3, 2), stride=1, padding=2, dilation=(2, 1), bias=True),
    dict(in_channels=3, out_channels=4, kernel_size=3, padding="same", bias=True),
    dict(in_channels=3, out_channels=4, kernel_size=3, padding=1, padding_mode="reflect", bias=True),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"k{c['kernel_size']}-{c.get('padding')}")
def test_full_rank_conv_reproduces_dense(case):
    conv = nn.Conv2d(**case)
    rank = min(conv.out_channels, conv.weight[0].numel())
    layer = FactorizedConv2d.from_conv(conv, rank)
    x = torch.randn(2, conv.in_channels, 9, 11)
    expected = conv(x)
    got = layer(x)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5)
    assert layer.first.stride == conv.stride and layer.first.dilation == conv.dilation
    assert layer.second.kernel_size == (1, 1)
    assert (layer.second.bias is None) == (conv.bias is None)


@pytest.mark.parametrize("rank", [1, 4, 8])
def test_conv_truncation_error_is_eckart_young_tail(rank):
    conv = nn.Conv2d(4, 8, (3, 2))
    layer = FactorizedConv2d.from_conv(conv, rank)
    matrix = conv.weight.reshape(8, -1)
    error = float((matrix.detach().double() - layer.merged_weight().detach().double()).square().sum())
    assert error == pytest.approx(_eckart_young_tail(matrix, rank), rel=1e-4, abs=1e-8)


def test_to_conv_round_trip():
    conv = nn.Conv2d(3, 6, 3, stride=2, padding=1, dilation=2)
    layer = FactorizedConv2d.from_conv(conv, rank=3)
    merged = layer.to_conv()
    assert isinstance(merged, nn.Conv2d)
    assert (merged.stride, merged.padding, merged.dilation, merged.kernel_size) == \
        (conv.stride, conv.padding, conv.dilation, conv.kernel_size)
    x = torch.randn(2, 3, 12, 12)
    assert torch.allclose(merged(x), layer(x), atol=1e-5)
    assert torch.allclose(merged.weight.reshape(6, -1), layer.merged_weight(), atol=1e-6)


def test_conv_extra_bn():
    conv = nn.Conv2d(3, 6, 3, padding=1)
    layer = FactorizedConv2d.from_conv(conv, rank=2, extra_bn=True)
    assert isinstance(layer.middle, nn.BatchNorm2d) and layer.middle.num_features == 2
    layer.eval()  # fresh BN in eval mode is the identity (mean 0, var 1, up to eps)
    x = torch.randn(2, 3, 8, 8)
    plain = FactorizedConv2d.from_conv(conv, rank=2)
    assert torch.allclose(layer(x), plain(x), atol=1e-4)
    with pytest.raises(ValueError, match="BatchNorm"):
        layer.to_conv()


def test_conv_extra_repr_and_helpers():
    layer = FactorizedConv2d.from_conv(nn.Conv2d(3, 6, (3, 2), stride=2), rank=2)
    text = repr(layer)
    assert "rank=2" in text and "kernel_size=(3, 2)" in text and "stride=(2, 2)" in text
    assert dense_shape(layer) == (6, 3, 3, 2)
    assert full_rank(layer) == 6
    assert full_rank(nn.Conv2d(2, 30, 2)) == 8  # min(30, 2*2*2)


def test_grouped_conv_raises():
    with pytest.raises(ValueError, match="grouped"):
        FactorizedConv2d.from_conv(nn.Conv2d(4, 8, 3, groups=2), rank=2)


@pytest.mark.parametrize("rank", [0, -2, 7, 100])
def test_conv_rank_out_of_range_raises(rank):
    # Conv2d(2, 6, 2x2) reads as 6 x 8: full rank 6.
    with pytest.raises(ValueError, match="rank must be in"):
        FactorizedConv2d(2, 6, 2, rank)
    with pytest.raises(ValueError, match="rank must be in"):
        FactorizedConv2d.from_conv(nn.Conv2d(2, 6, 2), rank)


def test_conv_rank_limited_by_in_k_k():
    layer = FactorizedConv2d(1, 16, 2, rank=4)  # (16, 1*2*2): full rank 4
    assert layer.rank == 4
    with pytest.raises(ValueError):
        FactorizedConv2d(1, 16, 2, rank=5)


def test_bf16_conv():
    conv = nn.Conv2d(3, 8, 3, padding=1).to(torch.bfloat16)
    layer = FactorizedConv2d.from_conv(conv, rank=4)
    assert layer.first.weight.dtype == torch.bfloat16 and layer.second.weight.dtype == torch.bfloat16
    out = layer(torch.randn(1, 3, 6, 6, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == (1, 8, 6, 6)


# --------------------------------------------------------------------------- Frobenius decay
def _autograd_decay(layer: FactorizedLayer, coefficient: float) -> tuple[torch.Tensor, torch.Tensor]:
    first = layer.first.weight.detach().clone().double().requires_grad_(True)
    second = layer.second.weight.detach().clone().double().requires_grad_(True)
    product = second.reshape(second.shape[0], -1) @ first.reshape(first.shape[0], -1)
    (coefficient / 2 * product.square().sum()).backward()
    return first.grad, second.grad


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_frobenius_decay_gradient_matches_autograd(kind):
    coefficient = 0.3
    if kind == "linear":
        layer = FactorizedLinear.from_linear(nn.Linear(12, 9), rank=5)
        x = torch.randn(4, 12)
    else:
        layer = FactorizedConv2d.from_conv(nn.Conv2d(3, 7, 3, padding=1), rank=4)
        x = torch.randn(2, 3, 5, 5)
    layer(x).square().sum().backward()
    task_first = layer.first.weight.grad.clone()
    task_second = layer.second.weight.grad.clone()
    expected_first, expected_second = _autograd_decay(layer, coefficient)
    layer.add_frobenius_decay_grad_(coefficient)
    assert torch.allclose((layer.first.weight.grad - task_first).double(), expected_first, rtol=1e-4, atol=1e-6)
    assert torch.allclose((layer.second.weight.grad - task_second).double(), expected_second, rtol=1e-4, atol=1e-6)
    assert expected_first.abs().max() > 1e-3  # the check compares real numbers, not zeros
    if layer.second.bias is not None:
        bias_grad = layer.second.bias.grad.clone()
        layer.add_frobenius_decay_grad_(coefficient)
        assert torch.equal(layer.second.bias.grad, bias_grad)  # the bias is not decayed


def test_frobenius_decay_without_gradients_is_a_no_op():
    layer = FactorizedLinear.from_linear(nn.Linear(6, 6), rank=2)
    layer.add_frobenius_decay_grad_(1.0)
    assert layer.first.weight.grad is None and layer.second.weight.grad is None


def test_frobenius_decay_scales_linearly():
    layer = FactorizedLinear.from_linear(nn.Linear(6, 5), rank=3)
    for p in (layer.first.weight, layer.second.weight):
        p.grad = torch.zeros_like(p)
    layer.add_frobenius_decay_grad_(1.0)
    once = layer.first.weight.grad.clone()
    layer.first.weight.grad.zero_()
    layer.second.weight.grad.zero_()
    layer.add_frobenius_decay_grad_(2.5)
    assert torch.allclose(layer.first.weight.grad, 2.5 * once, rtol=1e-6)


def _matrix(shape: tuple[int, int], spectrum: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    m, n = shape
    if spectrum == "zero":
        return torch.zeros(shape)
    u, _ = torch.linalg.qr(torch.randn(m, min(shape), generator=generator))
    v, _ = torch.linalg.qr(torch.randn(n, min(shape), generator=generator))
    values = {"random": torch.linalg.svdvals(torch.randn(shape, generator=generator)),
              "decaying": 0.7 ** torch.arange(min(shape), dtype=torch.float32),  # pretrained-like
              "rank_deficient": (torch.arange(min(shape)) < 3).float()}[spectrum]
    return (u * values) @ v.T


@pytest.mark.parametrize("shape", [(48, 48), (96, 32), (32, 96)])
@pytest.mark.parametrize("spectrum", ["random", "decaying", "rank_deficient", "zero"])
def test_truncated_svd_is_the_exact_truncation(shape, spectrum, monkeypatch):
    matrix = _matrix(shape, spectrum)
    rank = min(shape) // 4
    exact = torch.linalg.svdvals(matrix.double())
    if spectrum in ("random", "decaying"):  # the Gram path: no full SVD taken
        monkeypatch.setattr(torch.linalg, "svd", lambda *args, **kwargs: pytest.fail("took the full SVD"))
    u, s, vh = truncated_svd(matrix, rank)
    assert u.shape == (shape[0], rank) and s.shape == (rank,) and vh.shape == (rank, shape[1])
    optimal = exact[rank:].square().sum().sqrt()
    error = torch.linalg.norm(matrix.double() - ((u * s) @ vh).double())
    assert error <= optimal * (1 + 1e-4) + 1e-6 * exact[0]
    torch.testing.assert_close(s.double(), exact[:rank], rtol=1e-4, atol=1e-6 * float(exact[0]))


def test_svd_factors_take_the_gram_path_at_any_scale():
    matrix = _matrix((64, 32), "decaying") * 1e37  # the fp32 Gram matrix of this would overflow unscaled
    first, second = svd_factors(matrix, 8)
    assert torch.isfinite(first).all() and torch.isfinite(second).all()
    exact = torch.linalg.svdvals(matrix.double())
    error = torch.linalg.norm(matrix.double() - (second @ first).double())
    assert error <= exact[8:].square().sum().sqrt() * (1 + 1e-4)
