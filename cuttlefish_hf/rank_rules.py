"""Rank rules: from a layer's measurements to the rank of its factorization, one registry keyed by name.

A rule is a small function ``rule(layer, options) -> (rank, xi_reference)`` over a :class:`LayerMeasurement`
(the ``m x n`` shape, conv weights read as ``(out, in*k*k)``, and the normalized singular values when the rule
reads them) and :class:`RuleOptions`. :func:`decide_ranks` runs one over many layers, clips every rank to
``[min_rank, min(m, n)]`` and leaves full-rank each layer whose rank reaches :func:`break_even_rank` (its
factors would not save parameters). Which rule runs is the config's ``rank_rule``; how the factors start is a
separate choice (:mod:`cuttlefish_hf.inits`).

Example:
    >>> decide_ranks({"w": torch.eye(64)}, "fixed_ratio", ratio=0.25)[0].rank
    16
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from .config import DEFAULT_KIND_FRACTIONS, OTHER_KIND_FRACTION, RANK_RULES as RULE_NAMES, XI_REFERENCES
from .stable_rank import check_finite, singular_values, spectrum_stable_rank, stable_ranks
from .targeting import layer_kind

__all__ = [
    "RANK_RULES",
    "XI_REFERENCES",
    "LayerMeasurement",
    "RankDecision",
    "RankRule",
    "RuleOptions",
    "break_even_rank",
    "decide_ranks",
    "looks_pretrained",
    "random_matrix_stable_rank",
    "rank_from_singular_values",
    "register_rank_rule",
    "round_rank",
    "xi_for",
]

# A weight whose stable rank is below this fraction of a same-shape Gaussian matrix's looks pretrained (random
# inits sit near 1.0; pretrained BERT matrices near 0.1). The one threshold for every "pretrained?" question.
PRETRAINED_SRANK_FRACTION = 0.5


def random_matrix_stable_rank(m: int, n: int) -> float:
    """Expected stable rank of an ``m x n`` i.i.d. Gaussian matrix: ``m*n / (sqrt(m) + sqrt(n))^2``."""
    return m * n / (math.sqrt(m) + math.sqrt(n)) ** 2


def looks_pretrained(init_stable_rank: float, m: int, n: int) -> bool:
    """Whether ``srank(W_0)`` is far below a same-shape random matrix's (see :data:`PRETRAINED_SRANK_FRACTION`)."""
    return init_stable_rank < PRETRAINED_SRANK_FRACTION * random_matrix_stable_rank(m, n)


def break_even_rank(m: int, n: int) -> int:
    """Smallest rank whose factors ``r*(m+n)`` hold at least as many parameters as ``m*n``."""
    return math.ceil(m * n / (m + n))


def round_rank(rank: int, multiple: int, m: int, n: int) -> int:
    """``rank`` rounded up to a multiple of ``multiple``, or left as it is when the rounded rank would reach
    :func:`break_even_rank` (no parameters saved) or pass the full rank."""
    rounded = math.ceil(rank / multiple) * multiple
    return rounded if rounded < break_even_rank(m, n) and rounded <= min(m, n) else rank


def xi_for(shape: tuple[int, int], init_stable_rank: float, reference: str) -> tuple[float, str]:
    """Scale ``xi = full_rank / srank(W_0)`` and the reference it came from ("init" or "random_matrix").

    ``reference="random_matrix"`` takes ``srank(W_0)`` from the random-matrix law instead of the snapshot: a
    pretrained ``srank(W_0)`` is already small and would make every rank full. ``"auto"`` chooses per layer
    with :func:`looks_pretrained` (the controller decides once per model and passes the result).
    """
    m, n = shape
    if reference == "auto":
        reference = "random_matrix" if looks_pretrained(init_stable_rank, m, n) else "init"
    elif reference not in ("init", "random_matrix"):
        raise ValueError(f"Unknown xi reference {reference!r}; choose one of {XI_REFERENCES}.")
    base = random_matrix_stable_rank(m, n) if reference == "random_matrix" else init_stable_rank
    # A zero (or degenerate) W_0 has stable rank 0: the scale is then unbounded and the rank clips to full.
    return min(m, n) / max(base, 1e-12), reference


@dataclass(frozen=True)
class LayerMeasurement:
    """What a rule may read about one layer."""

    name: str
    shape: tuple[int, int]
    singular_values: torch.Tensor | None = None  # descending, normalized; None for rules that read none
    init_stable_rank: float | None = None         # srank(W_0), snapshot at train begin

    @property
    def full_rank(self) -> int:
        return min(self.shape)


@dataclass(frozen=True)
class RuleOptions:
    """The rules' settings (the config's fields of the same meaning)."""

    xi_reference: str = "auto"
    energy: float = 0.9
    ratio: float = 0.25
    kind_fractions: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_KIND_FRACTIONS))


RuleFunction = Callable[[LayerMeasurement, RuleOptions], "tuple[int, str | None]"]


@dataclass(frozen=True)
class RankRule:
    function: RuleFunction
    reads_spectrum: bool  # whether the rule needs the layer's singular values (an SVD per layer)


RANK_RULES: dict[str, RankRule] = {}


def register_rank_rule(name: str, *, reads_spectrum: bool) -> Callable[[RuleFunction], RuleFunction]:
    """Register ``function(layer, options) -> (rank, xi_reference or None)`` as rank rule ``name``."""
    def register(function: RuleFunction) -> RuleFunction:
        RANK_RULES[name] = RankRule(function, reads_spectrum)
        return function

    return register


@register_rank_rule("stable_rank", reads_spectrum=True)
def _stable_rank(layer: LayerMeasurement, options: RuleOptions) -> tuple[int, None]:
    return math.ceil(spectrum_stable_rank(layer.singular_values) - 1e-9), None


@register_rank_rule("scaled_stable_rank", reads_spectrum=True)
def _scaled_stable_rank(layer: LayerMeasurement, options: RuleOptions) -> tuple[int, str]:
    """The paper's rule: ``ceil(xi * srank(W))`` with ``xi = full_rank / srank(W_0)``."""
    srank = spectrum_stable_rank(layer.singular_values)
    init = srank if layer.init_stable_rank is None else layer.init_stable_rank
    xi, reference = xi_for(layer.shape, init, options.xi_reference)
    return math.ceil(srank * xi - 1e-9), reference


@register_rank_rule("energy", reads_spectrum=True)
def _energy(layer: LayerMeasurement, options: RuleOptions) -> tuple[int, None]:
    squares = layer.singular_values.double().square()
    cumulative = torch.cumsum(squares, 0) / squares.sum().clamp_min(1e-300)
    target = torch.tensor(options.energy - 1e-12, dtype=cumulative.dtype)
    return int(torch.searchsorted(cumulative, target)) + 1, None


@register_rank_rule("fixed_ratio", reads_spectrum=False)
def _fixed_ratio(layer: LayerMeasurement, options: RuleOptions) -> tuple[int, None]:
    return math.ceil(options.ratio * layer.full_rank - 1e-9), None


@register_rank_rule("kind_fractions", reads_spectrum=False)
def _kind_fractions(layer: LayerMeasurement, options: RuleOptions) -> tuple[int, None]:
    """Keep a fixed fraction ``f`` of the layer's parameters, ``floor(f*m*n/(m+n))``, by layer kind
    (:func:`cuttlefish_hf.targeting.layer_kind`). The measured default for fine-tuning pretrained models."""
    m, n = layer.shape
    fraction = options.kind_fractions.get(layer_kind(layer.name), OTHER_KIND_FRACTION)
    return math.floor(fraction * m * n / (m + n)), None


assert set(RANK_RULES) == set(RULE_NAMES), "config.RANK_RULES names the registered rules"


def rank_from_singular_values(values: torch.Tensor, rule: str, *, xi: float = 1.0, energy: float = 0.9,
                              ratio: float = 0.25, min_rank: int = 1) -> int:
    """Rank chosen by a spectrum rule from descending singular values, clipped to ``[min_rank, len(values)]``
    (``xi`` given, for ``scaled_stable_rank``)."""
    spectrum_rules = tuple(name for name in RANK_RULES if name != "kind_fractions")  # it reads layer names
    if rule not in spectrum_rules:
        raise ValueError(f"Unknown rank rule {rule!r}; choose one of {spectrum_rules}.")
    full = values.numel()
    if rule == "scaled_stable_rank":
        raw = math.ceil(spectrum_stable_rank(values) * xi - 1e-9)
    else:
        layer = LayerMeasurement("", (full, full), values)
        raw, _ = RANK_RULES[rule].function(layer, RuleOptions(energy=energy, ratio=ratio))
    return max(min(raw, full), min(min_rank, full))


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
    kind_fractions: Mapping[str, float] | None = None,
    min_rank: int = 1,
    rank_multiple: int = 1,
    rank_overrides: Mapping[str, int] | None = None,
    spectra: Mapping[str, torch.Tensor] | None = None,
    measured_stable_ranks: Mapping[str, float] | None = None,
) -> list[RankDecision]:
    """Every layer's rank under ``rule`` (a name in :data:`RANK_RULES`).

    Rules that read spectra get exact singular values (batched by shape; pass ``spectra``, normalized and
    descending, to reuse ones already computed); rules that read none take no SVD, and the decisions' stable ranks
    (for the report) are ``measured_stable_ranks`` (e.g. the meter's, at the switch) or exact ones.
    ``rank_overrides`` (from ``rank_pattern``) replace the rule's rank for the named layers; the rule's ranks are
    rounded by :func:`round_rank`. A layer whose rank reaches :func:`break_even_rank` is marked
    ``factorize=False``. NaN/inf weights raise a ValueError naming them.
    """
    if rule not in RANK_RULES:
        raise ValueError(f"Unknown rank rule {rule!r}; choose one of {tuple(RANK_RULES)}.")
    check_finite(weights, "choosing ranks")
    names = list(weights)
    # Normalized spectra: every rule is scale invariant, and fp32 weights near 1e38 would give a NaN SVD.
    if spectra is None and RANK_RULES[rule].reads_spectrum:
        spectra = dict(zip(names, singular_values([weights[n] for n in names], normalized=True)))
    if spectra is None and measured_stable_ranks is not None:
        plain = {name: measured_stable_ranks[name] for name in names}
    elif spectra is None:  # the rule reads no spectrum; the report still shows each layer's stable rank
        plain = dict(zip(names, stable_ranks([weights[n] for n in names])))
    else:
        plain = {name: spectrum_stable_rank(spectra[name]) for name in names}
    options = RuleOptions(xi_reference=xi_reference, energy=energy, ratio=ratio,
                          kind_fractions=DEFAULT_KIND_FRACTIONS if kind_fractions is None else kind_fractions)
    function = RANK_RULES[rule].function
    decisions = []
    for name in names:
        weight = weights[name]
        shape = (weight.shape[0], weight[0].numel())
        values = spectra[name].cpu() if spectra is not None else None
        rank, reference = function(LayerMeasurement(name, shape, values, (init_stable_ranks or {}).get(name)),
                                   options)
        rank = round_rank(max(min(rank, min(shape)), min(min_rank, min(shape))), rank_multiple, *shape)
        if rank_overrides and name in rank_overrides:
            rank = min(rank_overrides[name], min(shape))
        decisions.append(RankDecision(name, shape, plain[name], rank, rank < break_even_rank(*shape), rule,
                                      reference))
    return decisions
