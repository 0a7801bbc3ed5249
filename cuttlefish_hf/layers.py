"""Low-rank layers: ``W ~ (U sqrt(S)) (sqrt(S) V^T)`` as two chained layers, and Frobenius decay.

``FactorizedLinear`` is ``Linear(in -> r, no bias)`` then ``Linear(r -> out, bias)``; ``FactorizedConv2d`` is a
``k x k`` conv to ``r`` channels (stride, padding, dilation kept) then a ``1 x 1`` conv, with an optional
BatchNorm between them (Pufferfish's extra BN). Both keep the original bias *Parameter object*, so an
optimizer holding it keeps its state across the switch.
"""

from __future__ import annotations

import math
import sys

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from .stable_rank import check_finite

__all__ = ["FactorizedLinear", "FactorizedConv2d", "FactorizedLayer", "svd_factors", "truncated_svd", "dense_shape",
           "full_rank", "dense_matrix", "is_conv1d", "is_linear", "is_factorizable", "factorized_like",
           "factorized_from"]


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2's Linear with an ``(in, out)`` weight)."""
    # Read from sys.modules: a model holding a Conv1D has imported it, and importing it here would load
    # transformers for users who never touch it.
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return conv1d is not None and isinstance(module, conv1d)


def is_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` or a transformers ``Conv1D``: ``y = x W^T + b`` whichever way the weight is stored."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def is_factorizable(module: nn.Module) -> bool:
    """A dense layer ``factorize_`` can replace: ``nn.Linear``, transformers' ``Conv1D`` or ``nn.Conv2d``."""
    return is_linear(module) or isinstance(module, nn.Conv2d)


def dense_shape(module: nn.Module) -> tuple[int, ...]:
    """``(out, in)`` or ``(out, in, k, k)`` of a dense Linear/Conv1D/Conv2d, or of the dense layer a factorized
    one replaced."""
    if isinstance(module, FactorizedLinear):
        return (module.out_features, module.in_features)
    if isinstance(module, FactorizedConv2d):
        return (module.out_channels, module.in_channels, *module.first.kernel_size)
    if is_conv1d(module):
        return (module.nf, module.nx)
    return tuple(module.weight.shape)


def dense_matrix(module: nn.Module) -> torch.Tensor:
    """The ``(out, in*k*k)`` matrix a dense layer applies (a view of its weight; transposed for a Conv1D)."""
    weight = module.weight
    return weight.T if is_conv1d(module) else weight.reshape(weight.shape[0], -1)


def full_rank(module: nn.Module) -> int:
    """``min(out, in*k*k)``: the largest rank a (factorized) Linear/Conv2d can have."""
    shape = dense_shape(module)
    return min(shape[0], math.prod(shape[1:]))


def truncated_svd(matrix: torch.Tensor, rank: int, *, resolution: float = 1e-3
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``rank`` singular triplets ``(u (m, rank), s (rank,), vh (rank, n))`` of a finite 2-D matrix.

    One symmetric eigendecomposition of the smaller Gram matrix, the other side's vectors projected out of the
    matrix: 3-6x cheaper than a full SVD for BERT-base's matrices on a CPU (``benchmarks/switch_cost.py``), and
    ``u @ diag(s) @ vh == u u^T matrix`` exactly, so the approximation is the best one in the span of ``u``. Where
    a kept singular value falls below ``resolution`` times the largest (rank-deficient or zero matrices: the
    Gram matrix's fp32 eigenvalues carry an absolute error near ``eps * s_1^2``), the full SVD is taken instead.
    """
    m, n = matrix.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be in [1, {min(m, n)}] for a {m}x{n} matrix, got {rank}.")
    short = matrix if m <= n else matrix.T  # (k, l), k <= l
    if rank < short.shape[0]:
        values, vectors = torch.linalg.eigh(short @ short.T)  # ascending
        s = values.flip(0)[:rank].clamp_min(0).sqrt()
        if s[-1] > resolution * s[0]:
            left = vectors.flip(1)[:, :rank]  # (k, rank): the short side's singular vectors
            right = (short.T @ left) / s      # (l, rank)
            return (left, s, right.T) if m <= n else (right, s, left.T)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank]


def svd_factors(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first, second)`` with ``second @ first`` the best rank-``rank`` approximation of ``matrix`` (fp32).

    ``first = sqrt(S_r) V_r^T`` has shape ``(rank, n)``, ``second = U_r sqrt(S_r)`` shape ``(m, rank)``.
    A matrix holding NaN/inf raises a ValueError (callers that know the layer's name check it first).
    """
    matrix = matrix.detach().float()
    check_finite({f"a {'x'.join(map(str, matrix.shape))} matrix": matrix})
    # SVD of the matrix divided by its largest entry, the scale put back as sqrt on each factor: the fp32 SVD
    # of a matrix of 1e38 entries is NaN (its singular values overflow), its square-root factors are not.
    scale = matrix.abs().max()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    u, s, vh = truncated_svd(matrix / scale, rank)
    root = s.sqrt() * scale.sqrt()
    return root[:, None] * vh, u * root


class FactorizedLayer(nn.Module):
    """Shared behaviour of factorized layers: ``first`` then ``second``, merge, Frobenius decay."""

    first: nn.Module
    second: nn.Module
    rank: int

    def _first_matrix(self) -> torch.Tensor:
        return self.first.weight.reshape(self.rank, -1)

    def _second_matrix(self) -> torch.Tensor:
        return self.second.weight.reshape(-1, self.rank)

    def merged_weight(self) -> torch.Tensor:
        """The dense ``(out, in*k*k)`` matrix this layer computes, in fp32."""
        return self._second_matrix().float() @ self._first_matrix().float()

    @torch.no_grad()
    def add_frobenius_decay_grad_(self, coefficient: float) -> None:
        """Add the gradient of ``coefficient/2 * ||second @ first||_F^2`` to the factors' gradients.

        Uses ``r x r`` products only: ``d first += c * (S^T S) F`` and ``d second += c * S (F F^T)``.
        Factors that have no gradient yet (e.g. frozen) are left alone.
        """
        first, second = self._first_matrix(), self._second_matrix()
        if self.first.weight.grad is None or self.second.weight.grad is None:
            return
        self.first.weight.grad.add_(((second.T @ second) @ first).reshape_as(self.first.weight), alpha=coefficient)
        self.second.weight.grad.add_((second @ (first @ first.T)).reshape_as(self.second.weight), alpha=coefficient)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.middle(self.first(x)))

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


class FactorizedLinear(FactorizedLayer):
    """A rank-``r`` replacement for ``nn.Linear``.

    Example:
        >>> dense = nn.Linear(16, 8)
        >>> low_rank = FactorizedLinear.from_linear(dense, rank=8)
        >>> x = torch.randn(2, 16)
        >>> torch.allclose(low_rank(x), dense(x), atol=1e-5)
        True
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank must be in [1, {min(in_features, out_features)}] for a "
                             f"{out_features}x{in_features} Linear, got {rank}.")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.merges_to_conv1d = False  # replaced a transformers Conv1D: merge_ gives one back
        self.first = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.middle = nn.Identity()
        self.second = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_linear(cls, linear: nn.Module, rank: int) -> FactorizedLinear:
        """SVD-initialized factors of an ``nn.Linear`` or a transformers ``Conv1D`` (SVD in fp32, factors cast
        back to its dtype); a Conv1D's factorization merges back into a Conv1D."""
        return factorized_from(linear, rank, svd_factors(dense_matrix(linear), rank))

    def to_linear(self) -> nn.Module:
        """Merge the factors back into one dense ``nn.Linear`` (or the ``Conv1D`` it replaced); the bias Parameter
        is shared."""
        weight = self.first.weight
        if self.merges_to_conv1d:
            from transformers.pytorch_utils import Conv1D

            with torch.device(weight.device):
                dense = Conv1D(self.out_features, self.in_features).to(weight.dtype)
            merged = self.merged_weight().T
        else:
            dense = nn.Linear(self.in_features, self.out_features, bias=False, device=weight.device, dtype=weight.dtype)
            merged = self.merged_weight()
        with torch.no_grad():
            dense.weight.copy_(merged)
        dense.weight.requires_grad_(self.first.weight.requires_grad)
        dense.bias = self.second.bias
        return dense

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class FactorizedConv2d(FactorizedLayer):
    """A rank-``r`` replacement for ``nn.Conv2d``: ``k x k`` conv to ``r`` channels, then ``1 x 1``.

    Example:
        >>> dense = nn.Conv2d(4, 8, 3, padding=1)
        >>> low_rank = FactorizedConv2d.from_conv(dense, rank=8)
        >>> x = torch.randn(1, 4, 6, 6)
        >>> torch.allclose(low_rank(x), dense(x), atol=1e-5)
        True
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, rank: int, stride=1, padding=0,
                 dilation=1, bias: bool = True, padding_mode: str = "zeros", extra_bn: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        # Validate before building the convs: nn.Conv2d with 0 or negative channels fails with an obscure error.
        full_rank = min(out_channels, in_channels * math.prod(_pair(kernel_size)))
        if not 1 <= rank <= full_rank:
            raise ValueError(f"rank must be in [1, {full_rank}] for a Conv2d({in_channels}, {out_channels}, "
                             f"kernel_size={tuple(_pair(kernel_size))}), got {rank}.")
        first = nn.Conv2d(in_channels, rank, kernel_size, stride=stride, padding=padding, dilation=dilation,
                          bias=False, padding_mode=padding_mode, device=device, dtype=dtype)
        self.in_channels, self.out_channels, self.rank = in_channels, out_channels, rank
        self.first = first
        self.middle = nn.BatchNorm2d(rank, device=device, dtype=dtype) if extra_bn else nn.Identity()
        self.second = nn.Conv2d(rank, out_channels, 1, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: int, extra_bn: bool = False) -> FactorizedConv2d:
        """SVD-initialized factors of ``conv`` read as the ``(out, in*k*k)`` matrix."""
        return factorized_from(conv, rank, svd_factors(dense_matrix(conv), rank), extra_bn=extra_bn)

    def to_conv(self) -> nn.Conv2d:
        """Merge back into one dense ``nn.Conv2d`` (exact only without the extra BatchNorm)."""
        if not isinstance(self.middle, nn.Identity):
            raise ValueError("A FactorizedConv2d with an extra BatchNorm cannot be merged into one Conv2d.")
        f = self.first
        conv = nn.Conv2d(self.in_channels, self.out_channels, f.kernel_size, stride=f.stride, padding=f.padding,
                         dilation=f.dilation, bias=False, padding_mode=f.padding_mode, device=f.weight.device,
                         dtype=f.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.merged_weight().reshape_as(conv.weight))
        conv.weight.requires_grad_(self.first.weight.requires_grad)
        conv.bias = self.second.bias
        return conv

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={tuple(self.first.kernel_size)}, "
                f"stride={tuple(self.first.stride)}, rank={self.rank}")


def factorized_like(module: nn.Module, rank: int, *, extra_bn: bool = False,
                    device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> FactorizedLayer:
    """A rank-``rank`` factorized layer shaped like ``module``, its factors not set from any weight.

    ``module`` is a dense ``nn.Linear``, transformers ``Conv1D`` or ``nn.Conv2d`` (or a factorized layer, whose
    dense shape is used): the new layer has its shape, bias (a new one) and conv geometry, and the device and
    dtype of its weight unless given. The factors are initialized as ``nn.Linear`` / ``nn.Conv2d`` initialize
    themselves, for a caller that overwrites them (a checkpoint) or only times the layer.
    :func:`factorized_from` builds one holding given factors.

    Example:
        >>> factorized_like(nn.Conv2d(4, 8, 3, padding=1), rank=2)
        FactorizedConv2d(
          4, 8, kernel_size=(3, 3), stride=(1, 1), rank=2
          (first): Conv2d(4, 2, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False)
          (middle): Identity()
          (second): Conv2d(2, 8, kernel_size=(1, 1), stride=(1, 1))
        )
    """
    factorized = isinstance(module, FactorizedLayer)
    conv = module.first if factorized else module
    if not (factorized or is_factorizable(module)):
        raise ValueError(f"Only nn.Linear, transformers' Conv1D and nn.Conv2d can be factorized, got "
                         f"{type(module).__name__}.")
    weight = conv.weight
    device = weight.device if device is None else device
    dtype = weight.dtype if dtype is None else dtype
    bias = (module.second if factorized else module).bias is not None
    out_features, in_features = dense_shape(module)[:2]
    if not isinstance(conv, nn.Conv2d):
        layer = FactorizedLinear(in_features, out_features, rank, bias=bias, device=device, dtype=dtype)
        layer.merges_to_conv1d = module.merges_to_conv1d if factorized else is_conv1d(module)
        return layer
    if conv.groups != 1:
        raise ValueError(f"Cannot factorize a grouped Conv2d (groups={conv.groups}); exclude it with "
                         "`exclude_modules`.")
    if isinstance(conv.padding, str) and conv.padding == "same" and conv.stride != (1, 1):
        raise ValueError("padding='same' requires stride 1.")
    return FactorizedConv2d(in_features, out_features, conv.kernel_size, rank, stride=conv.stride,
                            padding=conv.padding, dilation=conv.dilation, bias=bias, padding_mode=conv.padding_mode,
                            extra_bn=extra_bn, device=device, dtype=dtype)


def factorized_from(module: nn.Module, rank: int, factors: tuple[torch.Tensor, torch.Tensor], *,
                    extra_bn: bool = False) -> FactorizedLayer:
    """The factorized replacement of the dense ``module`` (see :func:`factorized_like`) holding ``factors``:
    ``(first (rank, in*k*k), second (out, rank))``, cast to the module's dtype. It shares the module's bias
    Parameter, and its factors train if the module's weight did."""
    layer = factorized_like(module, rank, extra_bn=extra_bn)
    first, second = factors
    with torch.no_grad():
        layer.first.weight.copy_(first.reshape_as(layer.first.weight))
        layer.second.weight.copy_(second.reshape_as(layer.second.weight))
    layer.second.bias = module.bias
    for factor in (layer.first.weight, layer.second.weight):
        factor.requires_grad_(module.weight.requires_grad)
    return layer
