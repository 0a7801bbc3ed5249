"""Whitening math: a truncated SVD in the metric of a layer's inputs (SVD-LLM; ASVD and FWSVD are relatives).

Plain truncated SVD keeps the directions of ``W`` with the largest singular values, whatever the layer is fed.
The error that matters is the error of the *output* ``W x`` on the data; with ``C = E[x x^T]`` the inputs'
second moment, ``C + damping * mean(diag C) * I = L L^T`` (Cholesky) and ``W L = U S V^T``, the factors
``first = sqrt(S_r) V_r^T L^{-1}``, ``second = U_r sqrt(S_r)`` minimize ``||(W - W_r) X^T||_F`` (exactly at
``damping = 0``), and that error is the tail of the *whitened* singular values ``S``.

Measured on all-MiniLM-L6-v2 / debian-sections: the whitened init is worth 2-4 accuracy points over plain SVD
at the same ranks of a pretrained model.
"""

from __future__ import annotations

import math

import torch

from .stable_rank import as_matrix

__all__ = ["DEFAULT_DAMPING", "damped_cholesky", "output_error", "whitened_factors"]

DEFAULT_DAMPING = 0.01


def damped_cholesky(covariance: torch.Tensor, damping: float = DEFAULT_DAMPING) -> torch.Tensor | None:
    """Lower ``L`` (fp64) with ``L L^T = C + damping * mean(diag C) * I``; None when ``C`` holds no signal.

    The damping widens (x10, up to 8 times) until a rank-deficient ``C`` factors."""
    cov = covariance.detach().double()
    n = cov.shape[0]
    scale = float(torch.diagonal(cov).clamp_min(0).mean()) if n else 0.0
    if scale <= 0 or not math.isfinite(scale):
        return None
    eye = torch.eye(n, dtype=torch.float64, device=cov.device)
    extra = damping * scale
    for _ in range(8):
        chol, info = torch.linalg.cholesky_ex(cov + max(extra, 1e-12 * scale) * eye)
        if int(info) == 0:
            return chol
        extra = max(extra * 10, 1e-8 * scale)
    raise RuntimeError("Cholesky of the damped activation covariance failed; raise `damping`.")


def whitened_factors(weight: torch.Tensor, covariance: torch.Tensor | None, rank: int, *,
                     damping: float = DEFAULT_DAMPING) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first (rank, in), second (out, rank))``, fp32 (computed in fp64), truncated in the inputs' metric.

    Without a covariance (or one holding no signal) this is the plain truncated SVD. At full rank
    ``second @ first == W``.
    """
    matrix = as_matrix(weight).double()
    factor = None
    if covariance is not None:
        if covariance.shape != (matrix.shape[1], matrix.shape[1]):
            raise ValueError(f"Covariance of shape {tuple(covariance.shape)} does not fit a weight with "
                             f"{matrix.shape[1]} inputs.")
        factor = damped_cholesky(covariance.to(matrix.device), damping)
    u, s, vh = torch.linalg.svd(matrix if factor is None else matrix @ factor, full_matrices=False)
    root = s[:rank].sqrt()
    first = root[:, None] * vh[:rank]
    if factor is not None:  # first @ L^{-1}: solve F L = A
        first = torch.linalg.solve_triangular(factor, first, upper=False, left=False)
    return first.float(), (u[:, :rank] * root).float()


def output_error(weight: torch.Tensor, approx: torch.Tensor, covariance: torch.Tensor, *,
                 relative: bool = True) -> float:
    """``tr((W - W') C (W - W')^T)`` (mean squared output error on inputs with second moment ``C``),
    divided by ``tr(W C W^T)`` when ``relative``."""
    w, a, c = as_matrix(weight).double(), as_matrix(approx).double(), covariance.double().to(weight.device)
    delta = w - a
    error = float(torch.einsum("ij,jk,ik->", delta, c, delta))
    if not relative:
        return error
    return error / max(float(torch.einsum("ij,jk,ik->", w, c, w)), 1e-300)
