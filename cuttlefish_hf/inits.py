"""Factor inits: how the two factors of a layer start at the switch, one registry keyed by name.

An init is a function ``init(name, matrix, rank) -> (first, second)`` over the dense layer's ``(out, in*k*k)``
matrix (a Conv1D's transposed weight, a conv's flattened kernel), returning fp32 factors with
``second @ first`` the rank-``rank`` approximation the init stands for. :func:`make_init` builds one by name
from what it needs (the whitened init needs the recorded input covariances); :func:`cuttlefish_hf.factorize_`
takes the result as ``init=``. Which ranks is a separate choice (:mod:`cuttlefish_hf.rank_rules`).

Example:
    >>> init = make_init("svd")
    >>> first, second = init("layer", torch.eye(4), 2)
    >>> tuple(first.shape), tuple(second.shape)
    ((2, 4), (4, 2))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from .config import INITS as INIT_NAMES
from .layers import svd_factors
from .whitening import DEFAULT_DAMPING, whitened_factors

__all__ = ["FactorInit", "INITS", "make_init", "svd_init", "whitened_init"]

FactorInit = Callable[[str, torch.Tensor, int], "tuple[torch.Tensor, torch.Tensor]"]


def svd_init(name: str, matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The truncated SVD of the weight (the paper's init)."""
    return svd_factors(matrix, rank)


def whitened_init(covariances: Mapping[str, torch.Tensor], damping: float = DEFAULT_DAMPING) -> FactorInit:
    """Truncated SVD in the metric of each layer's recorded inputs (:func:`whitened_factors`); layers without
    a covariance (convs, layers never called while recording) start from the plain SVD."""
    if covariances is None:
        raise ValueError("The whitened init needs the layers' input covariances: make_init('whitened', "
                         "covariances=ActivationStats(...).covariances()).")
    def init(name: str, matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        covariance = covariances.get(name)
        if covariance is None:
            return svd_factors(matrix, rank)
        return whitened_factors(matrix, covariance, rank, damping=damping)

    return init


# name -> builder(**what the controller has at the switch) -> FactorInit
INITS: dict[str, Callable[..., FactorInit]] = {
    "svd": lambda **_: svd_init,
    "whitened": lambda covariances=None, **_: whitened_init(covariances),
}
assert set(INITS) == set(INIT_NAMES), "config.INITS names the registered inits"


def make_init(name: str, **available: Any) -> FactorInit:
    """The init ``name`` built from ``available`` (``covariances={layer: C}`` for ``"whitened"``)."""
    if name not in INITS:
        raise ValueError(f"Unknown factor init {name!r}; choose one of {tuple(INITS)}.")
    return INITS[name](**available)
