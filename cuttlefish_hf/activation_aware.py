"""Activation-aware factorization at the switch: rank rules and SVD init that see what the layer is fed.

Plain truncated SVD keeps the directions of ``W`` with the largest singular values, whatever the layer's
inputs. For a pretrained model those inputs are strongly anisotropic (LayerNorm outputs with a few huge
channels, GELU outputs concentrated on few directions), so the error that matters - the error of the
*output* ``W x`` on the data - is poorly served. Following SVD-LLM (Wang et al., 2024; ASVD and FWSVD are
relatives), this module

1. gathers the second moment ``C = X^T X / N`` of each target layer's inputs during training, with forward
   pre-hooks and running fp32 sums (:class:`ActivationStats`; no activations are stored);
2. factorizes in the whitened space: ``C + damping * mean(diag C) * I = L L^T`` (Cholesky), ``W L = U S V^T``,
   ``first = sqrt(S_r) V_r^T L^{-1}``, ``second = U_r sqrt(S_r)`` (:func:`whitened_factors`). With
   ``damping = 0`` this is the rank-``r`` matrix minimizing ``||(W - W_r) X^T||_F`` on the recorded inputs,
   and the error equals the tail of the *whitened* singular values;
3. chooses ranks (:func:`decide_ranks_activation_aware`): ``"fraction"`` (the default) keeps a fixed
   fraction of each layer's parameters by layer kind (:func:`layer_kind`; attention 0.4, FFN 0.7);
   ``"budget"`` spends a global parameter budget where it removes the most whitened output error (relative,
   or - with output-gradient statistics - the estimated loss increase) per parameter; ``"energy"`` keeps,
   per layer, the smallest rank holding a fraction of the output energy ``sum(s_w^2)``.

Measured on all-MiniLM-L6-v2 / debian-sections (``benchmarks/pretrained_rank_rules.py``): the whitened init
is worth 2-4 accuracy points over plain SVD at the same ranks, and is what makes 60% of the parameters
nearly as good as 80% with plain SVD. The error-driven allocations (``"budget"``, with or without gradient
weighting) minimize the damage *at the switch* but lose to the fixed per-kind fractions after two more
epochs: they cut some layers (mostly FFN) so deep that those layers cannot adapt any more.

:func:`detect_pretrained` tells pretrained weights from a random init from their stable ranks at train
begin, so a controller can pick the rule without asking the user, and say why.

Typical use at the switch (see the controller notes in :class:`ActivationStats`)::

    stats = ActivationStats().start(model, targets)         # during the last measurement period
    ...train the period...
    stats.stop()
    covariances = stats.covariances(targets)
    decisions = decide_ranks_activation_aware(weights, covariances)          # attention 0.4, FFN 0.7
    report = factorize_activation_aware_(model, {d.name: d.rank for d in decisions if d.factorize}, covariances)
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .layers import FactorizedLinear, dense_matrix, is_linear
from .rank_rules import (PRETRAINED_SRANK_FRACTION, RankDecision, break_even_rank, random_matrix_stable_rank,
                         rank_from_singular_values)
from .stable_rank import as_matrix, check_finite, stable_ranks
from .surgery import FactorizationReport, factorize_

__all__ = [
    "AA_RULES",
    "LAYER_KINDS",
    "PRETRAINED_DEFAULT_FRACTIONS",
    "SCALINGS",
    "ActivationStats",
    "PretrainedCheck",
    "allocate_budget",
    "decide_ranks_activation_aware",
    "detect_pretrained",
    "layer_kind",
    "factorize_activation_aware_",
    "output_error",
    "whitened_factors",
    "whitened_singular_values",
]

AA_RULES = ("fraction", "budget", "energy")
LAYER_KINDS = ("attention", "ffn", "other")
# The measured default for fine-tuning pretrained transformers (benchmarks/pretrained_rank_rules.py): whitened
# init, FFN matrices keep 70% of their parameters and attention matrices 40% (60% overall with a 4x FFN).
PRETRAINED_DEFAULT_FRACTIONS = {"attention": 0.4, "ffn": 0.7}
_ATTENTION_PARTS = ("attention", "attn", "self_attn", "query", "key", "value", "qkv", "q_proj", "k_proj", "v_proj",
                    "o_proj", "out_proj", "c_attn", "q_lin", "k_lin", "v_lin", "out_lin")
_FFN_PARTS = ("intermediate", "output", "mlp", "ffn", "feed_forward", "fc1", "fc2", "c_fc", "c_proj", "up_proj",
              "down_proj", "gate_proj", "wi", "wo", "wi_0", "wi_1", "lin1", "lin2", "dense_h_to_4h", "dense_4h_to_h")
SCALINGS = ("whiten", "diag", "none")
DEFAULT_DAMPING = 0.01


# ---------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------
class ActivationStats:
    """Running input second moments ``sum_t x_t x_t^T`` of named ``nn.Linear`` modules.

    ``start(model, names)`` registers a forward pre-hook on each module; every call adds ``X^T X`` of its
    input (any shape ``(..., in)``, flattened to ``(tokens, in)``) to an fp32 ``in x in`` running sum on the
    weight's device, and the token count. ``stop()`` removes the hooks and keeps the sums;
    ``covariance(name)`` is ``sum / count``.

    Layers that are fed the very same tensor in a forward pass (Q, K and V of an attention block) share one
    sum: the product is computed once per pass and the memory is held once. The sharing is detected on the
    first pass and checked on every later one (a layer whose input stops being shared raises).

    Cost, for controllers: one ``tokens x in x in`` matmul per distinct input per training forward (about
    1.5x the forward FLOPs of a BERT block's Linear layers, dominated by the FFN output projection's
    ``4d x 4d`` sum; measured on 1 CPU thread: 22 s of hooks on top of a 76 s MiniLM-L6 epoch), and
    ``4 * sum(in^2)`` bytes (MiniLM-L6: 64 MiB; BERT-base: 0.5 GiB). Collect only over
    the last measurement period before the switch (or the period in which the switch becomes likely), not
    during the whole warm-up. With ``training_only=True`` (default) forward passes in ``eval()`` mode
    (evaluation loops) are not recorded; ``every=k`` records only every k-th forward pass of each input (k
    times cheaper; a few thousand tokens per layer already give a usable covariance); ``max_tokens`` stops
    recording an input once that many tokens are in its sum (until :meth:`reset`).

    ``start(..., output_gradients=True)`` also accumulates, per output unit, the second moment of the
    gradient of the loss with respect to the layer's output, ``E[g^2]`` (a vector per layer, from a tensor
    hook on the output; cheap). With it the factorization can weight output units by how much the loss
    cares about them (diagonal K-FAC / FWSVD-style), which also puts the errors of all layers on one scale
    (estimated loss increase) for the global budget.

    Example:
        >>> layer = nn.Linear(4, 3)
        >>> stats = ActivationStats().start(nn.Sequential(layer), ["0"])
        >>> _ = layer(torch.ones(2, 5, 4))
        >>> stats.stop().count("0"), stats.covariance("0")[0, 0].item()
        (10, 1.0)
    """

    def __init__(self, training_only: bool = True, every: int = 1, max_tokens: int | None = None) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be an integer >= 1, got {every!r}.")
        if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
                                       or max_tokens < 1):
            raise ValueError(f"max_tokens must be an integer >= 1 or None, got {max_tokens!r}.")
        self.training_only = training_only
        self.every = every
        self.max_tokens = max_tokens
        self.seconds = 0.0  # host time spent in the hooks (on CUDA: launching, not running, the products)
        self._calls: list[int] = []              # per slot: forward calls seen (for `every`)
        self._handles: list = []
        self._slot_of: dict[str, int] = {}        # layer name -> slot index
        self._sums: list[torch.Tensor] = []       # per slot: fp32 (in, in) running sum of x x^T
        self._counts: list[int] = []              # per slot: tokens seen
        self._last_input: torch.Tensor | None = None
        self._last_slot: int | None = None
        self._grad_sums: dict[str, torch.Tensor] = {}   # per layer: fp32 (out,) running sum of g^2
        self._grad_counts: dict[str, int] = {}
        self._grad_calls: dict[str, int] = {}

    # -- collection -----------------------------------------------------------------------------------
    def start(self, model: nn.Module, names: Iterable[str], *, output_gradients: bool = False) -> ActivationStats:
        """Hook the named ``nn.Linear`` modules of ``model``; sums already held keep growing. Returns self.

        ``output_gradients=True`` also records ``E[g^2]`` per output unit during the backward passes."""
        if self._handles:
            raise RuntimeError("ActivationStats is already collecting; call stop() first.")
        modules = dict(model.named_modules())
        for name in names:
            module = modules.get(name)
            if not is_linear(module):
                kind = "missing" if module is None else type(module).__name__
                raise ValueError(f"ActivationStats needs nn.Linear (or Conv1D) modules; {name!r} is {kind}.")
            self._handles.append(module.register_forward_pre_hook(self._hook(name, module)))
            if output_gradients:
                self._handles.append(module.register_forward_hook(self._output_hook(name, module)))
        return self

    def stop(self) -> ActivationStats:
        """Remove every hook (the sums stay). Returns self."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._last_input, self._last_slot = None, None
        return self

    @property
    def collecting(self) -> bool:
        return bool(self._handles)

    def _hook(self, name: str, module: nn.Linear):
        def hook(_module, args):
            if self.training_only and not module.training:
                return
            x = args[0]
            start = time.perf_counter()
            with torch.no_grad():
                self._record(name, module, x)
            self.seconds += time.perf_counter() - start

        return hook

    def _output_hook(self, name: str, module: nn.Linear):
        def hook(_module, _args, output):
            if (self.training_only and not module.training) or not isinstance(output, torch.Tensor) \
                    or not output.requires_grad:
                return
            calls = self._grad_calls.get(name, 0)
            self._grad_calls[name] = calls + 1
            if calls % self.every:
                return

            def grad_hook(grad: torch.Tensor) -> None:
                with torch.no_grad():
                    flat = grad.detach().reshape(-1, grad.shape[-1]).float()
                    total = self._grad_sums.get(name)
                    if total is None:
                        total = self._grad_sums[name] = torch.zeros(grad.shape[-1], dtype=torch.float32,
                                                                    device=module.weight.device)
                        self._grad_counts[name] = 0
                    total.add_(flat.square().sum(0).to(total.device))
                    self._grad_counts[name] += flat.shape[0]

            output.register_hook(grad_hook)

        return hook

    def _record(self, name: str, module: nn.Linear, x: torch.Tensor) -> None:
        same_as_last = self._last_input is not None and x is self._last_input
        slot = self._slot_of.get(name)
        if slot is None:
            if same_as_last:                      # first pass: share the previous layer's sum
                self._slot_of[name] = self._last_slot
                return
            slot = len(self._sums)
            self._slot_of[name] = slot
            weight = module.weight
            self._sums.append(torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32, device=weight.device))
            self._counts.append(0)
            self._calls.append(0)
        elif same_as_last and slot == self._last_slot:
            return                                # the slot's owner already counted this tensor
        elif self._shared(slot) and self._owner(slot) != name:
            raise RuntimeError(f"ActivationStats: {name!r} shared its input with {self._owner(slot)!r} on the "
                               "first forward pass but not on this one; collect the layers in separate "
                               "ActivationStats objects.")
        self._last_input, self._last_slot = x, slot
        if self.max_tokens is not None and self._counts[slot] >= self.max_tokens:
            return
        self._calls[slot] += 1
        if (self._calls[slot] - 1) % self.every:
            return
        flat = x.detach().reshape(-1, x.shape[-1]).to(device=self._sums[slot].device, dtype=torch.float32)
        self._sums[slot].addmm_(flat.T, flat)
        self._counts[slot] += flat.shape[0]

    def _shared(self, slot: int) -> bool:
        return sum(1 for s in self._slot_of.values() if s == slot) > 1

    def _owner(self, slot: int) -> str:
        return next(name for name, s in self._slot_of.items() if s == slot)

    # -- results --------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Layers seen at least once."""
        return list(self._slot_of)

    def count(self, name: str) -> int:
        """Tokens recorded for ``name``."""
        return self._counts[self._slot_of[name]]

    def second_moment_sum(self, name: str) -> torch.Tensor:
        """The running ``X^T X`` (fp32, on the weight's device; shared with layers fed the same input)."""
        return self._sums[self._slot_of[name]]

    def covariance(self, name: str) -> torch.Tensor:
        """``X^T X / tokens`` of ``name``'s inputs (uncentered second moment, fp32)."""
        if name not in self._slot_of or self.count(name) == 0:
            raise KeyError(f"No activations recorded for {name!r}; was it called while collecting?")
        return self.second_moment_sum(name) / self.count(name)

    def covariances(self, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """``{name: covariance}``; layers sharing an input share one tensor."""
        by_slot: dict[int, torch.Tensor] = {}
        result = {}
        for name in (self.names if names is None else names):
            slot = self._slot_of[name]
            if slot not in by_slot:
                by_slot[slot] = self.covariance(name)
            result[name] = by_slot[slot]
        return result

    def output_gradient_moment(self, name: str) -> torch.Tensor:
        """``E[g^2]`` per output unit of ``name`` (fp32 ``(out,)``), ``g`` = d loss / d output."""
        if name not in self._grad_sums or self._grad_counts[name] == 0:
            raise KeyError(f"No output gradients recorded for {name!r}; start(..., output_gradients=True) and "
                           "run backward passes while collecting.")
        return self._grad_sums[name] / self._grad_counts[name]

    def output_gradient_moments(self, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        return {name: self.output_gradient_moment(name) for name in (self._grad_sums if names is None else names)}

    def memory_bytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in [*self._sums, *self._grad_sums.values()])

    def reset(self) -> None:
        """Forget everything recorded (hooks stay as they are)."""
        self._slot_of, self._sums, self._counts, self._calls = {}, [], [], []
        self._grad_sums, self._grad_counts, self._grad_calls = {}, {}, {}
        self._last_input, self._last_slot = None, None

    def all_reduce_(self) -> None:
        """Sum the statistics over all processes of a distributed run (a no-op otherwise)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        for slot, total in enumerate(self._sums):
            torch.distributed.all_reduce(total)
            count = torch.tensor([self._counts[slot]], dtype=torch.float64, device=total.device)
            torch.distributed.all_reduce(count)
            self._counts[slot] = int(count.item())
        for name, total in self._grad_sums.items():
            torch.distributed.all_reduce(total)
            count = torch.tensor([self._grad_counts[name]], dtype=torch.float64, device=total.device)
            torch.distributed.all_reduce(count)
            self._grad_counts[name] = int(count.item())

    def state_dict(self) -> dict:
        return {"slot_of": dict(self._slot_of), "sums": [s.clone() for s in self._sums],
                "counts": list(self._counts), "calls": list(self._calls),
                "grad_sums": {n: t.clone() for n, t in self._grad_sums.items()},
                "grad_counts": dict(self._grad_counts), "grad_calls": dict(self._grad_calls)}

    def load_state_dict(self, state: Mapping) -> None:
        self._slot_of = dict(state["slot_of"])
        self._sums = [s.clone().float() for s in state["sums"]]
        self._counts = [int(c) for c in state["counts"]]
        self._calls = [int(c) for c in state.get("calls", [0] * len(self._counts))]
        self._grad_sums = {n: t.clone().float() for n, t in state.get("grad_sums", {}).items()}
        self._grad_counts = {n: int(c) for n, c in state.get("grad_counts", {}).items()}
        self._grad_calls = {n: int(c) for n, c in state.get("grad_calls", {}).items()}
        self._last_input, self._last_slot = None, None


# ---------------------------------------------------------------------------------------------------------
# Factorization
# ---------------------------------------------------------------------------------------------------------
def _transform(covariance: torch.Tensor, damping: float, scaling: str) -> tuple[torch.Tensor, bool]:
    """``(L, lower)``: a factor with ``L L^T`` = the damped covariance (``lower`` False for a diagonal)."""
    cov = covariance.detach().double()
    n = cov.shape[0]
    diag = torch.diagonal(cov).clamp_min(0)
    scale = float(diag.mean()) if diag.numel() else 0.0
    if scale <= 0 or not math.isfinite(scale):   # no signal recorded: fall back to plain SVD
        return torch.eye(n, dtype=torch.float64, device=cov.device), False
    if scaling == "diag":
        return torch.diag((diag + damping * scale).sqrt()), False
    if scaling != "whiten":
        raise ValueError(f"Unknown scaling {scaling!r}; choose one of {SCALINGS}.")
    eye = torch.eye(n, dtype=torch.float64, device=cov.device)
    extra = damping * scale
    for _ in range(8):  # widen the damping until the (possibly rank-deficient) matrix factors
        chol, info = torch.linalg.cholesky_ex(cov + max(extra, 1e-12 * scale) * eye)
        if int(info) == 0:
            return chol, True
        extra = max(extra * 10, 1e-8 * scale)
    raise RuntimeError("Cholesky of the damped activation covariance failed; raise `damping`.")


def _output_scale(output_weights: torch.Tensor | None, damping: float, device) -> torch.Tensor | None:
    """``sqrt(E[g^2] + damping * mean)`` per output unit (``None`` when not given or all zero)."""
    if output_weights is None:
        return None
    d = output_weights.detach().double().to(device).clamp_min(0)
    mean = float(d.mean())
    if mean <= 0 or not math.isfinite(mean):
        return None
    return (d + damping * mean).sqrt()


def _whitened_svd(weight: torch.Tensor, covariance: torch.Tensor | None, damping: float, scaling: str,
                  row_scale: torch.Tensor | None = None):
    matrix = as_matrix(weight).double()
    if row_scale is not None:
        matrix = row_scale[:, None] * matrix
    if covariance is None or scaling == "none":
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u, s, vh, None, False
    if covariance.shape != (matrix.shape[1], matrix.shape[1]):
        raise ValueError(f"Covariance of shape {tuple(covariance.shape)} does not fit a weight with "
                         f"{matrix.shape[1]} inputs.")
    factor, lower = _transform(covariance.to(matrix.device), damping, scaling)
    u, s, vh = torch.linalg.svd(matrix @ factor, full_matrices=False)
    return u, s, vh, factor, lower


def whitened_factors(
    weight: torch.Tensor,
    covariance: torch.Tensor | None,
    rank: int,
    *,
    damping: float = DEFAULT_DAMPING,
    scaling: str = "whiten",
    output_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first, second)`` like :func:`cuttlefish_hf.layers.svd_factors`, truncated in the activation metric.

    ``scaling="whiten"`` (SVD-LLM): ``C + damping*mean(diag C)*I = L L^T``, ``W L = U S V^T``,
    ``first = sqrt(S_r) V_r^T L^{-1}`` ``(rank, in)``, ``second = U_r sqrt(S_r)`` ``(out, rank)``.
    ``scaling="diag"`` (ASVD-like, needs only ``diag C``) uses ``L = diag(sqrt(diag C + damping*mean))``;
    ``"none"`` (or ``covariance=None``) is plain SVD. ``output_weights`` (``E[g^2]`` per output unit, from
    ``ActivationStats.output_gradient_moment``) also scales the rows: ``D = diag(E[g^2] + damping*mean)``,
    SVD of ``D^(1/2) W L``, ``second = D^(-1/2) U_r sqrt(S_r)``, which minimizes the diagonal-K-FAC estimate
    ``tr(D (W - W_r) C (W - W_r)^T)`` of the loss increase. fp32 results; computed in fp64. At full rank
    ``second @ first == W`` for every scaling.
    """
    row_scale = _output_scale(output_weights, damping, weight.device)
    u, s, vh, factor, lower = _whitened_svd(weight, covariance, damping, scaling, row_scale)
    root = s[:rank].sqrt()
    first = root[:, None] * vh[:rank]
    if factor is not None:
        if lower:   # first @ L^{-1}: solve  F L = A
            first = torch.linalg.solve_triangular(factor, first, upper=False, left=False)
        else:
            first = first / torch.diagonal(factor)[None, :]
    second = u[:, :rank] * root
    if row_scale is not None:
        second = second / row_scale[:, None]
    return first.float(), second.float()


def whitened_singular_values(
    weights: Mapping[str, torch.Tensor],
    covariances: Mapping[str, torch.Tensor],
    *,
    damping: float = DEFAULT_DAMPING,
    scaling: str = "whiten",
    output_weights: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Singular values (descending, fp64, on CPU) of ``W L`` for each named weight.

    Their squares sum to ``tr(W C_d W^T)``, the mean squared output (bias excluded) under the damped
    covariance; the squares beyond rank ``r`` are the output error of :func:`whitened_factors` at rank ``r``.
    With ``output_weights`` the rows are scaled too (see :func:`whitened_factors`): the squares then estimate
    the loss increase, on one scale for all layers.
    """
    result = {}
    for name, weight in weights.items():
        matrix = as_matrix(weight).double()
        row_scale = _output_scale((output_weights or {}).get(name), damping, matrix.device)
        if row_scale is not None:
            matrix = row_scale[:, None] * matrix
        cov = covariances.get(name)
        if cov is None or scaling == "none":
            result[name] = torch.linalg.svdvals(matrix).cpu()
            continue
        factor, _ = _transform(cov.to(matrix.device), damping, scaling)
        result[name] = torch.linalg.svdvals(matrix @ factor).cpu()
    return result


def output_error(weight: torch.Tensor, approx: torch.Tensor, covariance: torch.Tensor,
                 *, relative: bool = True) -> float:
    """``tr((W - W') C (W - W')^T)`` (mean squared output error on inputs with second moment ``C``),
    divided by ``tr(W C W^T)`` when ``relative``."""
    w, a, c = as_matrix(weight).double(), as_matrix(approx).double(), covariance.double().to(weight.device)
    delta = w - a
    error = float(torch.einsum("ij,jk,ik->", delta, c, delta))
    if not relative:
        return error
    return error / max(float(torch.einsum("ij,jk,ik->", w, c, w)), 1e-300)


@torch.no_grad()
def factorize_activation_aware_(
    model: nn.Module,
    plan: Mapping[str, int],
    covariances: Mapping[str, torch.Tensor],
    *,
    damping: float = DEFAULT_DAMPING,
    scaling: str = "whiten",
    output_weights: Mapping[str, torch.Tensor] | None = None,
    stable_ranks: Mapping[str, float] | None = None,
    extra_bn: bool = False,
) -> FactorizationReport:
    """:func:`cuttlefish_hf.surgery.factorize_` with whitened factors for every Linear that has a covariance.

    The layers are built by ``factorize_`` (so the bias Parameter object, dtype, device and the report are
    exactly as usual), then the factors of each named Linear are overwritten with :func:`whitened_factors`
    computed from the dense weight it replaced. Layers without a covariance (or Conv2d, with ``extra_bn``
    as in ``factorize_``) keep plain SVD.
    """
    modules = dict(model.named_modules())
    dense = {name: dense_matrix(modules[name]).detach().clone() for name in plan
             if name in covariances and is_linear(modules.get(name))}
    # factorize_ checks the plan and that every planned weight is finite before any SVD (whitened ones below).
    report = factorize_(model, plan, init="svd", stable_ranks=stable_ranks, extra_bn=extra_bn)
    for name, weight in dense.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, FactorizedLinear)
        first, second = whitened_factors(weight, covariances[name], plan[name], damping=damping, scaling=scaling,
                                         output_weights=(output_weights or {}).get(name))
        layer.first.weight.copy_(first.to(layer.first.weight))
        layer.second.weight.copy_(second.to(layer.second.weight))
    return report


# ---------------------------------------------------------------------------------------------------------
# Rank selection
# ---------------------------------------------------------------------------------------------------------
def allocate_budget(
    spectra: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, int]],
    budget: int,
    *,
    min_rank: int | Mapping[str, int] = 1,
    weights: Mapping[str, float] | None = None,
    fixed: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Ranks that minimize ``sum_l w_l * (tail energy of layer l at its rank) / (total energy of l)`` with
    at most ``budget`` parameters (``rank*(m+n)`` per factorized layer, ``m*n`` for a dense one).

    Greedy by error removed per parameter, one rank step at a time. The spectrum is sorted, so a layer's
    steps remove less and less error, except the last one: at :func:`break_even_rank` the layer becomes dense
    (full rank, no error) for at most ``m+n`` more parameters. A layer's priority is therefore the better of
    its next step's ratio and the ratio of going all the way to dense from where it stands. ``fixed`` ranks
    (overrides) are paid first; every layer gets at least ``min_rank`` (an int, or ``{name: rank}``) even
    beyond the budget.
    """
    weights = weights or {}
    fixed = dict(fixed or {})
    ranks: dict[str, int] = {}
    spent = 0
    heap: list[tuple[float, int, str]] = []
    info: dict[str, tuple[list[float], list[float], float, int, int, int]] = {}

    def params(m: int, n: int, rank: int) -> int:
        return m * n if rank >= break_even_rank(m, n) else rank * (m + n)

    def priority(name: str) -> float | None:
        squares, tails, scale, m, n, b = info[name]
        rank = ranks[name]
        if rank >= b:
            return None
        to_dense = tails[rank] * scale / (m * n - rank * (m + n))
        if rank == b - 1:
            return to_dense
        return max(squares[rank] * scale / (m + n), to_dense)

    for index, (name, values) in enumerate(spectra.items()):
        m, n = shapes[name]
        full, b = min(m, n), break_even_rank(m, n)
        floor = min_rank.get(name, 1) if isinstance(min_rank, Mapping) else min_rank
        rank = min(fixed[name], full) if name in fixed else min(max(floor, 1), full)
        ranks[name] = full if rank >= b else rank
        spent += params(m, n, rank)
        squares = values.double().square()
        total = float(squares.sum())
        if name in fixed or rank >= b or total <= 0:
            continue
        tails = squares.flip(0).cumsum(0).flip(0).tolist() + [0.0]   # tails[r] = sum_{i >= r} s_i^2
        info[name] = (squares.tolist(), tails, weights.get(name, 1.0) / total, m, n, b)
        heapq.heappush(heap, (-priority(name), index, name))

    remaining = budget - spent
    while heap:
        _, index, name = heapq.heappop(heap)
        _, _, _, m, n, b = info[name]
        rank = ranks[name]
        step = m * n - rank * (m + n) if rank == b - 1 else m + n
        if step > remaining:
            continue          # no room for this layer's next step; smaller steps of other layers may fit
        remaining -= step
        ranks[name] = min(m, n) if rank + 1 >= b else rank + 1
        key = priority(name)
        if key is not None:
            heapq.heappush(heap, (-key, index, name))
    return ranks


def layer_kind(name: str) -> str:
    """``"attention"``, ``"ffn"`` or ``"other"`` from a module name's components (BERT, RoBERTa, ViT, GPT-2,
    LLaMA, T5, DistilBERT, ... naming). An attention name wins: ``attention.output.dense`` is attention."""
    parts = name.lower().split(".")
    if any(part in _ATTENTION_PARTS for part in parts):
        return "attention"
    if any(part in _FFN_PARTS for part in parts):
        return "ffn"
    return "other"


def decide_ranks_activation_aware(
    weights: Mapping[str, torch.Tensor],
    covariances: Mapping[str, torch.Tensor],
    rule: str = "fraction",
    *,
    keep_fraction: float = 0.6,
    kind_fractions: Mapping[str, float] | None = None,
    energy: float = 0.99,
    damping: float = DEFAULT_DAMPING,
    scaling: str = "whiten",
    min_rank: int = 1,
    min_keep_fraction: float = 0.0,
    output_weights: Mapping[str, torch.Tensor] | None = None,
    error: str | None = None,
    layer_weights: Mapping[str, float] | None = None,
    rank_overrides: Mapping[str, int] | None = None,
) -> list[RankDecision]:
    """Ranks from the whitened spectra, as :class:`~cuttlefish_hf.rank_rules.RankDecision` objects.

    * ``rule="fraction"`` (default): every layer keeps a fixed fraction of its own parameters, rank
      ``floor(f*m*n/(m+n))``, with ``f = kind_fractions[layer_kind(name)]`` (default
      :data:`PRETRAINED_DEFAULT_FRACTIONS`, attention 0.4 / FFN 0.7) or ``keep_fraction`` for other layers
      or when ``kind_fractions={}``. On the fine-tuning benchmark this beat every error-driven allocation:
      what a layer must keep to *go on learning* is not what its error at the switch says.
    * ``rule="budget"``: :func:`allocate_budget` with ``budget = keep_fraction * sum(m*n)`` over the given
      weights. ``error="relative"`` (default without ``output_weights``): each layer's loss is its relative
      output error ``tail / total`` of its whitened spectrum; ``error="absolute"`` (default with
      ``output_weights``): the tail itself, which with output-gradient weights estimates the loss increase,
      comparable across layers. Either is multiplied by ``layer_weights[name]`` (default 1).
      ``min_keep_fraction`` gives every layer at least that fraction of its own parameters first (rank
      ``floor(f*m*n/(m+n))``), so no layer is cut so deep that it cannot adapt in the rest of training; the
      rest of the budget goes where the error drops most. ``min_keep_fraction = keep_fraction`` is a uniform
      per-layer fraction.
    * ``rule="energy"``: per layer, the smallest rank whose whitened singular values hold ``energy`` of
      ``sum(s_w^2)`` (that fraction of the mean squared output on the recorded inputs).

    A layer without a covariance uses its plain spectrum. ``decision.rule`` is ``"aa_budget"`` or
    ``"aa_energy"``; ``decision.stable_rank`` is the plain weight's stable rank (for the report).
    """
    if rule not in AA_RULES:
        raise ValueError(f"Unknown activation-aware rule {rule!r}; choose one of {AA_RULES}.")
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction!r}.")
    if not 0 <= min_keep_fraction <= keep_fraction:
        raise ValueError(f"min_keep_fraction must be in [0, keep_fraction], got {min_keep_fraction!r}.")
    error = error or ("absolute" if output_weights else "relative")
    if error not in ("relative", "absolute"):
        raise ValueError(f"error must be 'relative' or 'absolute', got {error!r}.")
    check_finite(weights, "choosing ranks")  # before the SVDs below (whitened spectra, report stable ranks)
    spectra = {} if rule == "fraction" else whitened_singular_values(
        weights, covariances, damping=damping, scaling=scaling, output_weights=output_weights)
    shapes = {name: (w.shape[0], w[0].numel()) for name, w in weights.items()}
    overrides = {n: min(r, min(shapes[n])) for n, r in (rank_overrides or {}).items() if n in shapes}
    if rule == "fraction":
        fractions = PRETRAINED_DEFAULT_FRACTIONS if kind_fractions is None else kind_fractions
        ranks = {}
        for name, (m, n) in shapes.items():
            fraction = fractions.get(layer_kind(name), keep_fraction)
            ranks[name] = overrides.get(name) or min(min(m, n), max(min_rank, math.floor(fraction * m * n / (m + n))))
    elif rule == "budget":
        budget = int(keep_fraction * sum(m * n for m, n in shapes.values()))
        scale = {n: (layer_weights or {}).get(n, 1.0) * (float(v.double().square().sum()) if error == "absolute"
                                                          else 1.0) for n, v in spectra.items()}
        floors = {name: max(min_rank, math.floor(min_keep_fraction * m * n / (m + n)))
                  for name, (m, n) in shapes.items()}
        ranks = allocate_budget(spectra, shapes, budget, min_rank=floors, weights=scale, fixed=overrides)
    else:
        ranks = {name: overrides.get(name) or rank_from_singular_values(values.float(), "energy", energy=energy,
                                                                        min_rank=min_rank)
                 for name, values in spectra.items()}
    plain_sranks = stable_ranks(list(weights.values()))  # for the report
    return [RankDecision(name, shapes[name], srank, ranks[name], ranks[name] < break_even_rank(*shapes[name]),
                         f"aa_{rule}") for name, srank in zip(weights, plain_sranks)]


# ---------------------------------------------------------------------------------------------------------
# Pretrained or from scratch
# ---------------------------------------------------------------------------------------------------------
@dataclass
class PretrainedCheck:
    """Whether the targets look pretrained, from their stable ranks at train begin."""

    pretrained: bool
    low_layers: int          # targets whose srank(W_0) < threshold * srank(random matrix of that shape)
    layers: int
    median_ratio: float      # median of srank(W_0) / srank(random)
    threshold: float

    @property
    def reason(self) -> str:
        verdict = "pretrained" if self.pretrained else "randomly initialized (training from scratch)"
        return (f"weights look {verdict}: {self.low_layers} of {self.layers} target layers have a stable rank at "
                f"train begin below {self.threshold:g}x that of a random matrix of the same shape (median ratio "
                f"{self.median_ratio:.2f})")


def detect_pretrained(
    init_stable_ranks: Mapping[str, float],
    shapes: Mapping[str, Sequence[int]],
    *,
    threshold: float = PRETRAINED_SRANK_FRACTION,
    min_fraction: float = 0.5,
) -> PretrainedCheck:
    """``pretrained`` when at least ``min_fraction`` of the targets have ``srank(W_0)`` below ``threshold``
    times a same-shape Gaussian matrix's (random inits sit near 1, pretrained transformer matrices at 0.05-0.5).

    Call it with the controller's ``init_stable_ranks`` (measured at train begin, before any update: after
    training from scratch stable ranks fall too) and ``{name: (out, in*k*k)}``.
    """
    ratios = []
    for name, srank in init_stable_ranks.items():
        m, n = shapes[name][0], math.prod(shapes[name][1:])
        ratios.append(srank / random_matrix_stable_rank(m, n))
    if not ratios:
        return PretrainedCheck(False, 0, 0, float("nan"), threshold)
    low = sum(1 for r in ratios if r < threshold)
    median = sorted(ratios)[len(ratios) // 2]
    return PretrainedCheck(low >= min_fraction * len(ratios), low, len(ratios), median, threshold)
