"""Rank rules: from a layer's measured spectrum to the rank of its factorization.

All rules see the weight as an ``m x n`` matrix (conv weights as ``(out, in*k*k)``) and return an integer
rank clipped to ``[min_rank, min(m, n)]``. A rank at or above :func:`break_even_rank` saves no parameters,
so the planner leaves such a layer full-rank.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .stable_rank import check_finite, singular_values

__all__ = [
    "RANK_RULES",
    "XI_REFERENCES",
    "RankDecision",
    "break_even_rank",
    "random_matrix_stable_rank",
    "rank_from_singular_values",
    "decide_ranks",
    "xi_for",
]

RANK_RULES = ("scaled_stable_rank", "stable_rank", "energy", "fixed_ratio")
XI_REFERENCES = ("auto", "init", "random_matrix")
# A weight whose stable rank is below this fraction of a same-shape Gaussian matrix's is treated as
# pretrained by ``xi_reference="auto"`` (random inits sit near 1.0; pretrained BERT matrices near 0.1).
PRETRAINED_SRANK_FRACTION = 0.5


def random_matrix_stable_rank(m: int, n: int) -> float:
    """Expected stable rank of an ``m x n`` i.i.d. Gaussian matrix: ``m*n / (sqrt(m) + sqrt(n))^2``."""
    return m * n / (math.sqrt(m) + math.sqrt(n)) ** 2


def break_even_rank(m: int, n: int) -> int:
    """Smallest rank whose factors ``r*(m+n)`` hold at least as many parameters as ``m*n``."""
    return math.ceil(m * n / (m + n))


def xi_for(shape: tuple[int, int], init_stable_rank: float, reference: str) -> tuple[float, str]:
    """Scale ``xi = full_rank / srank(W_0)`` and the reference it came from ("init" or "random_matrix").

    With ``reference="auto"`` a weight that looks pretrained (stable rank far below a random matrix of the
    same shape) takes ``W_0`` from the random-matrix law instead of its own snapshot, because a pretrained
    ``srank(W_0)`` is already small and would make every rank full.
    """
    m, n = shape
    random_srank = random_matrix_stable_rank(m, n)
    if reference == "auto":
        looks_pretrained = init_stable_rank < PRETRAINED_SRANK_FRACTION * random_srank
        reference = "random_matrix" if looks_pretrained else "init"
    elif reference not in ("init", "random_matrix"):
        raise ValueError(f"Unknown xi reference {reference!r}; choose one of {XI_REFERENCES}.")
    base = random_srank if reference == "random_matrix" else init_stable_rank
    # A zero (or degenerate) W_0 has stable rank 0: the scale is then unbounded and the rank clips to full.
    return min(m, n) / max(base, 1e-12), reference


def rank_from_singular_values(
    values: torch.Tensor,
    rule: str,
    *,
    xi: float = 1.0,
    energy: float = 0.9,
    ratio: float = 0.25,
    min_rank: int = 1,
) -> int:
    """Rank chosen by ``rule`` from descending fp32 singular values, clipped to ``[min_rank, full_rank]``."""
    full_rank = values.numel()
    squares = values.double().square()
    if rule in ("stable_rank", "scaled_stable_rank"):
        srank = float(squares.sum() / squares[0].clamp_min(1e-300))
        raw = math.ceil(srank * (xi if rule == "scaled_stable_rank" else 1.0) - 1e-9)
    elif rule == "energy":
        cumulative = torch.cumsum(squares, 0) / squares.sum().clamp_min(1e-300)
        raw = int(torch.searchsorted(cumulative, torch.tensor(energy - 1e-12, dtype=cumulative.dtype))) + 1
    elif rule == "fixed_ratio":
        raw = math.ceil(ratio * full_rank - 1e-9)
    else:
        raise ValueError(f"Unknown rank rule {rule!r}; choose one of {RANK_RULES}.")
    return max(min(raw, full_rank), min(min_rank, full_rank))


@dataclass
class RankDecision:
    """The decided rank of one layer and the numbers behind it."""

    name: str
    shape: tuple[int, int]
    stable_rank: float
    rank: int
    factorize: bool
    rule: str
    xi_reference: str | None = None

    @property
    def full_rank(self) -> int:
        return min(self.shape)


def decide_ranks(
    weights: Mapping[str, torch.Tensor],
    rule: str,
    *,
    init_stable_ranks: Mapping[str, float] | None = None,
    xi_reference: str = "auto",
    energy: float = 0.9,
    ratio: float = 0.25,
    min_rank: int = 1,
    rank_overrides: Mapping[str, int] | None = None,
) -> list[RankDecision]:
    """Decide every layer's rank from exact singular values (batched by shape).

    ``rank_overrides`` (from ``rank_pattern``) replace the rule's rank for the named layers. A layer whose
    rank reaches :func:`break_even_rank` is marked ``factorize=False``. NaN/inf weights raise a ValueError
    naming them.
    """
    check_finite(weights, "choosing ranks")
    names = list(weights)
    # Normalized spectra: every rule is scale invariant, and fp32 weights near 1e38 would give a NaN SVD.
    spectra: Sequence[torch.Tensor] = singular_values([weights[name] for name in names], normalized=True)
    decisions = []
    for name, values in zip(names, spectra):
        values = values.cpu()
        weight = weights[name]
        shape = (weight.shape[0], weight[0].numel())
        srank = float(values.double().square().sum() / values[0].double().square().clamp_min(1e-300))
        xi, reference = 1.0, None
        if rule == "scaled_stable_rank":
            init = (init_stable_ranks or {}).get(name, srank)
            xi, reference = xi_for(shape, init, xi_reference)
        if rank_overrides and name in rank_overrides:
            rank = min(rank_overrides[name], min(shape))
        else:
            rank = rank_from_singular_values(values, rule, xi=xi, energy=energy, ratio=ratio, min_rank=min_rank)
        factorize = rank < break_even_rank(*shape)
        decisions.append(RankDecision(name, shape, srank, rank, factorize, rule, reference))
    return decisions
