"""Is a factorized layer faster? Time dense vs low-rank forward+backward on the real device and dtype.

The paper keeps the first blocks full-rank because factorizing small early layers does not speed them up, and
picks them with a small benchmark. We decide **per layer**: every candidate is timed as a dense layer and as its
factorization at the planned rank, on synthetic inputs of the run's size, and a layer is kept dense unless its
factorized form takes at most ``(1 - margin)`` of the dense time. Per layer rather than "the first K blocks"
because a slow layer late in the network gains nothing from factorization either (see ``CUTTLEFISH.md`` 5).

The dense and the factorized layer are timed side by side, alternately (``warmup`` pairs, then ``repeats``
timed pairs), so that a machine that slows down or speeds up during profiling shifts both and not the
comparison; each time is the median of its ``repeats`` (outliers do not move it), and the spread of the pairs'
speed-ups is reported. A speed-up above the layer's FLOP ideal (dense over factorized multiply-adds) is not
physics but a measurement fault: it is flagged, in the table and in :attr:`ProfileReport.faults`. On CUDA every
window is synchronized and holds enough calls to last about 10 ms, so launch overhead and timer resolution do
not decide. A run that trains compiled is profiled compiled (``compiled=True``: each layer through
``torch.compile``, inductor, so the timings include what fusion and the compiled backward change). Results are
cached by ``(device, dtype, compiled, layer, input shape, rank)``: equal layers (the 12 blocks of BERT) are measured
once.

Example:
    >>> model = nn.Sequential(nn.Sequential(nn.Linear(1024, 1024)), nn.Sequential(nn.Linear(64, 64)))
    >>> report = profile_layers(model, {"0.0": 64, "1.0": 16}, tokens_per_batch=2048)
    >>> report.keep_dense  # the machine decides; print(report) shows the timings  # doctest: +SKIP
    ['1.0']
"""

from __future__ import annotations

import math
import statistics
import time
import weakref
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .compilation import retrace_compiled
from .config import DEFAULT_TOKENS_PER_BATCH
from .layers import FactorizedLayer, dense_shape, factorized_like, is_factorizable
from .tables import render_table

__all__ = ["DEFAULT_TOKENS_PER_BATCH", "LayerTiming", "ProfileReport", "SynchronizedTimer", "Timer", "flop_ideal",
           "profile_layers", "synthetic_input_shape"]


Timer = Callable[[Callable[[], None], nn.Module], float]
"""``timer(run, module) -> seconds`` of one call of ``run`` (forward+backward of ``module``)."""

_CACHE: dict[tuple, tuple[float, float, float]] = {}  # the process-wide cache used when profile_layers gets none

# A speed-up this far above the FLOP ideal is a measurement fault rather than a cache effect.
FAULT_TOLERANCE = 0.1


def flop_ideal(shape: Sequence[int], rank: int) -> float:
    """Dense over factorized multiply-adds of a layer of weight shape ``(out, in[, k, k])`` at ``rank``:
    ``m*n / (rank*(m+n))`` with ``m = out``, ``n = in*k*k`` (per output position, for a conv)."""
    m, n = shape[0], math.prod(shape[1:])
    return m * n / (rank * (m + n))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SynchronizedTimer:
    """Wall-clock seconds per call of ``run``, CUDA-synchronized around each timing window.

    A module's first call is a warm-up (allocator, kernel selection) and also calibrates: the window doubles
    from one call until it lasts ``target_seconds`` (at most ``max_calls`` calls), and later windows hold that
    many calls. A one-call window on a GPU would time the host's launch overhead and the synchronization,
    not the kernels.
    """

    def __init__(self, device: torch.device | str, target_seconds: float = 1e-2, max_calls: int = 256) -> None:
        self.device = torch.device(device)
        self.target_seconds = target_seconds
        self.max_calls = max_calls
        self._calls: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()

    def _window(self, run: Callable[[], None], calls: int) -> float:
        _synchronize(self.device)
        start = time.perf_counter()
        for _ in range(calls):
            run()
        _synchronize(self.device)
        return (time.perf_counter() - start) / calls

    def __call__(self, run: Callable[[], None], module: nn.Module) -> float:
        calls = self._calls.get(module)
        if calls is not None:
            return self._window(run, calls)
        self._window(run, 1)  # cold: not representative of anything
        calls = 1
        seconds = self._window(run, calls)
        while seconds * calls < self.target_seconds and calls < self.max_calls:
            calls = min(self.max_calls, 2 * calls)
            seconds = self._window(run, calls)
        self._calls[module] = calls
        return seconds


@dataclass
class LayerTiming:
    """Dense vs factorized forward+backward time of one layer."""

    name: str
    shape: tuple[int, ...]
    rank: int
    input_shape: tuple[int, ...]
    dense_ms: float
    factorized_ms: float
    keep_dense: bool
    spread: float = 0.0  # (max - min) / median of the timed pairs' speed-ups

    @property
    def speedup(self) -> float:
        return self.dense_ms / max(self.factorized_ms, 1e-12)

    @property
    def ideal(self) -> float:
        """The FLOP-ideal speed-up at this rank."""
        return flop_ideal(self.shape, self.rank)

    @property
    def fault(self) -> bool:
        """Whether the measured speed-up exceeds the FLOP ideal (by more than :data:`FAULT_TOLERANCE`)."""
        return self.speedup > self.ideal * (1 + FAULT_TOLERANCE)


@dataclass
class ProfileReport:
    """Per-layer timings, the keep-dense decision and what profiling cost; ``print(report)`` shows a table."""

    layers: list[LayerTiming] = field(default_factory=list)
    margin: float = 0.1
    device: str = "cpu"
    dtype: str = "float32"
    compiled: bool = False  # timed through torch.compile
    seconds: float = 0.0  # wall time profile_layers took, measuring and cache look-ups included
    measured: int = 0  # (layer, rank) pairs timed, dense and factorized side by side (the others: the cache)
    cached: int = 0

    @property
    def keep_dense(self) -> list[str]:
        """Layers whose factorization is not faster by the margin: leave them full-rank."""
        return [layer.name for layer in self.layers if layer.keep_dense]

    @property
    def faults(self) -> list[str]:
        """Layers whose measured speed-up is above the FLOP ideal: their timings are not to be trusted."""
        return [layer.name for layer in self.layers if layer.fault]

    def __str__(self) -> str:
        header = ("layer", "shape", "input", "rank", "dense ms", "factorized ms", "speedup", "spread", "ideal",
                  "decision")
        rows = [(t.name, "x".join(map(str, t.shape)), "x".join(map(str, t.input_shape)), t.rank, f"{t.dense_ms:.3f}",
                 f"{t.factorized_ms:.3f}", f"{t.speedup:.2f}x", f"{t.spread:.0%}", f"{t.ideal:.2f}x",
                 ("keep dense" if t.keep_dense else "factorize") + (" (above ideal: measurement fault)" if t.fault
                                                                     else ""))
                for t in self.layers]
        faults = (f"; {len(self.faults)} speed-ups above the FLOP ideal: a measurement fault (a busy machine, "
                  f"or a timer that does not see the device's work)" if self.faults else "")
        return "\n".join([
            render_table(header, rows, align="lrrrrrrrrl"),
            (f"forward+backward on {self.device} in {self.dtype}{', compiled' if self.compiled else ''}; a layer is "
             f"factorized when it takes at most {1 - self.margin:.0%} of the dense time (margin {self.margin:g})"
             f"{faults}"),
            (f"keep dense: {len(self.keep_dense)} of {len(self.layers)} layers; profiling took {self.seconds:.2f}s "
             f"({self.measured} layers timed, {self.cached} from the cache)")])


def synthetic_input_shape(module: nn.Module, tokens_per_batch: int) -> tuple[int, ...]:
    """Input shape used when a layer's real one is unknown: ``(tokens, in)`` for a Linear; for a conv a square
    ``(1, in, s, s)`` image with ``s * s ~ tokens`` spatial positions."""
    shape = dense_shape(module)
    if len(shape) == 2:
        return (tokens_per_batch, shape[1])
    # At least 2 output positions per channel whatever the geometry: an extra BatchNorm in training mode
    # refuses a single value per channel.
    conv = _geometry(module)[0]
    padding = 0 if isinstance(conv.padding, str) else min(conv.padding)
    smallest = max(conv.stride) + max(conv.dilation) * (max(conv.kernel_size) - 1) + 1 - 2 * padding
    side = max(2, smallest, math.isqrt(tokens_per_batch))
    return (1, shape[1], side, side)


def _geometry(module: nn.Module) -> tuple[nn.Conv2d | None, bool]:
    """The conv that holds the kernel geometry (None for a Linear) and whether the layer has a bias."""
    outer = module.second if isinstance(module, FactorizedLayer) else module
    inner = module.first if isinstance(module, FactorizedLayer) else module
    return (inner if isinstance(inner, nn.Conv2d) else None), outer.bias is not None


def _signature(module: nn.Module) -> tuple:
    """What sets a layer's speed besides its input and rank: weight shape, bias and conv geometry."""
    conv, bias = _geometry(module)
    if conv is None:
        return ("linear", dense_shape(module), bias)
    return ("conv2d", dense_shape(module), bias, tuple(conv.stride), str(conv.padding), tuple(conv.dilation),
            conv.padding_mode)


def _build(module: nn.Module, rank: int | None, extra_bn: bool, device: torch.device,
           dtype: torch.dtype) -> nn.Module:
    """A fresh dense (``rank=None``) or factorized layer shaped like ``module``, on ``device`` / ``dtype``."""
    if rank is not None:
        return factorized_like(module, rank, extra_bn=extra_bn, device=device, dtype=dtype)
    conv, bias = _geometry(module)
    out_features, in_features = dense_shape(module)[:2]
    if conv is None:
        return nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
    return nn.Conv2d(in_features, out_features, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                     dilation=conv.dilation, bias=bias, padding_mode=conv.padding_mode, device=device, dtype=dtype)


def _forward_backward(layer: nn.Module, input_shape: Sequence[int], device: torch.device,
                      dtype: torch.dtype, compiled: bool) -> Callable[[], None]:
    """A closure running forward+backward of ``layer`` (gradients for its input and parameters), through
    ``torch.compile`` when ``compiled`` (compiled on the first call: a warm-up)."""
    x = torch.randn(*input_shape, device=device, dtype=dtype, requires_grad=True)
    with torch.no_grad():
        grad = torch.randn_like(layer(x))
    parameters = list(layer.parameters())
    forward = torch.compile(layer, dynamic=False) if compiled else layer

    def run() -> None:
        x.grad = None
        for parameter in parameters:  # fresh gradients: accumulating would add work the training step lacks
            parameter.grad = None
        forward(x).backward(grad)

    return run


def _paired_seconds(dense: nn.Module, factorized: nn.Module, input_shape: Sequence[int], timer: Timer,
                    repeats: int, warmup: int, device: torch.device, dtype: torch.dtype,
                    compiled: bool) -> tuple[float, float, float]:
    """Median seconds of the dense and the factorized layer, timed alternately, and the spread of the pairs'
    speed-ups (``(max - min) / median``)."""
    runs = [(_forward_backward(layer, input_shape, device, dtype, compiled), layer) for layer in (dense, factorized)]
    for _ in range(warmup):
        for run, layer in runs:
            timer(run, layer)
    pairs = [tuple(timer(run, layer) for run, layer in runs) for _ in range(repeats)]
    speedups = [d / max(f, 1e-12) for d, f in pairs]
    median = statistics.median(speedups)
    return (statistics.median(d for d, _ in pairs), statistics.median(f for _, f in pairs),
            (max(speedups) - min(speedups)) / max(median, 1e-12))


def profile_layers(
    model: nn.Module,
    ranks: Mapping[str, int],
    *,
    tokens_per_batch: int = DEFAULT_TOKENS_PER_BATCH,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    margin: float = 0.1,
    extra_bn: bool = False,
    repeats: int = 5,
    warmup: int = 2,
    compiled: bool = False,
    timer: Timer | None = None,
    cache: MutableMapping[tuple, float] | None = None,
) -> ProfileReport:
    """Time each ``{layer name: planned rank}`` dense and factorized; keep dense what is not faster by ``margin``.

    Args:
        model: holds the layers (dense ``nn.Linear`` / ``nn.Conv2d``, or already factorized); only their
            architecture is used: fresh layers with random weights are timed, the model is not touched.
        ranks: the planned rank of each layer to profile.
        tokens_per_batch: rows of a Linear's input per batch (batch size x sequence length or patches); for a
            conv, the spatial positions of its input (see :func:`synthetic_input_shape`).
        input_shapes: the real input shape of some layers (batch included), overriding ``tokens_per_batch``.
        dtype, device: the training dtype and device (default: those of each layer's weight).
        margin: the factorized layer must take at most ``(1 - margin)`` of the dense time.
        extra_bn: time factorized convs with the extra BatchNorm (Pufferfish).
        repeats, warmup: timed and discarded calls of the timer per measurement.
        compiled: time each layer through ``torch.compile`` (inductor), as a compiled training step runs it. Each
            distinct layer compiles twice (dense and factorized; seconds each on a CPU); afterwards torch.compile's
            caches are reset (:func:`~cuttlefish_hf.compilation.retrace_compiled`), so the profiled layers' graphs
            do not count against the model's recompile limit: a compiled model re-traces once on its next call.
        timer: ``timer(run, module) -> seconds`` (default :class:`SynchronizedTimer`); inject one for tests.
        cache: where timings are stored and looked up (default: a process-wide cache).

    Example:
        >>> fake = lambda run, module: 1.0 if isinstance(module, nn.Linear) else 0.5
        >>> profile_layers(nn.Sequential(nn.Linear(8, 8)), {"0": 2}, timer=fake).keep_dense
        []
    """
    if not 0 <= margin < 1:
        raise ValueError(f"margin must be in [0, 1), got {margin!r}.")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"Need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}.")
    if tokens_per_batch < 1:
        raise ValueError(f"tokens_per_batch must be >= 1, got {tokens_per_batch}.")
    start = time.perf_counter()
    cache = _CACHE if cache is None else cache
    modules = dict(model.named_modules())
    missing = [name for name in ranks if not (is_factorizable(modules.get(name)) or
                                              isinstance(modules.get(name), FactorizedLayer))]
    if missing:
        raise ValueError(f"profile_layers: {missing[:5]} are not Linear/Conv2d (or factorized) modules of "
                         f"{type(model).__name__}.")
    report = ProfileReport(margin=margin, compiled=compiled)
    timers: dict[torch.device, Timer] = {}
    with torch._dynamo.config.patch(recompile_limit=max(8, 2 * len(ranks))):  # a graph per distinct layer
        for name, rank in ranks.items():
            module = modules[name]
            weight = next(module.parameters())
            layer_device = torch.device(device) if device is not None else weight.device
            layer_dtype = dtype or weight.dtype
            report.device, report.dtype = str(layer_device), str(layer_dtype).removeprefix("torch.")
            shape = tuple(input_shapes[name]) if input_shapes and name in input_shapes else \
                synthetic_input_shape(module, tokens_per_batch)
            layer_timer = timer or timers.setdefault(layer_device, SynchronizedTimer(layer_device))
            key = (str(layer_device), str(layer_dtype), compiled, _signature(module), shape, rank, extra_bn)
            if key not in cache:
                cache[key] = _paired_seconds(_build(module, None, extra_bn, layer_device, layer_dtype),
                                             _build(module, rank, extra_bn, layer_device, layer_dtype), shape,
                                             layer_timer, repeats, warmup, layer_device, layer_dtype, compiled)
                report.measured += 1
            else:
                report.cached += 1
            dense_ms, factorized_ms, spread = 1000 * cache[key][0], 1000 * cache[key][1], cache[key][2]
            report.layers.append(LayerTiming(name, dense_shape(module), rank, shape, dense_ms, factorized_ms,
                                             keep_dense=factorized_ms > (1 - margin) * dense_ms, spread=spread))
    if compiled and report.measured:
        retrace_compiled()
    report.seconds = time.perf_counter() - start
    return report
