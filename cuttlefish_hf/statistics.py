"""Input statistics: running second moments of the inputs of named Linear layers, for the whitened init.

Forward pre-hooks add ``X^T X`` of every training forward's input to an fp32 running sum per distinct input
(no activations are stored); :meth:`ActivationStats.all_reduce_` sums them over the processes of a
distributed run; ``state_dict`` travels with checkpoints so a resumed run switches with the same factors.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .compilation import retrace_compiled
from .layers import is_linear

__all__ = ["ActivationStats"]


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

    Under ``torch.compile`` the hooks run outside the graph (a graph break at each hooked layer while
    recording), and ``start`` / ``stop`` make compiled models re-trace
    (:func:`~cuttlefish_hf.compilation.retrace_compiled`), so hooks are neither missed nor leave their graph
    breaks behind.

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

    # -- collection -----------------------------------------------------------------------------------
    def start(self, model: nn.Module, names: Iterable[str]) -> ActivationStats:
        """Hook the named ``nn.Linear`` modules of ``model``; sums already held keep growing. Returns self."""
        if self._handles:
            raise RuntimeError("ActivationStats is already collecting; call stop() first.")
        modules = dict(model.named_modules())
        for name in names:
            module = modules.get(name)
            if not is_linear(module):
                kind = "missing" if module is None else type(module).__name__
                raise ValueError(f"ActivationStats needs nn.Linear (or Conv1D) modules; {name!r} is {kind}.")
            self._handles.append(module.register_forward_pre_hook(self._hook(name, module)))
        retrace_compiled()
        return self

    def stop(self) -> ActivationStats:
        """Remove every hook (the sums stay). Returns self."""
        if self._handles:
            retrace_compiled()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._last_input, self._last_slot = None, None
        return self

    @property
    def collecting(self) -> bool:
        return bool(self._handles)

    def _hook(self, name: str, module: nn.Linear):
        @torch.compiler.disable  # bookkeeping in Python: run it eagerly, not traced into a compiled graph
        def hook(_module, args):
            if self.training_only and not module.training:
                return
            x = args[0]
            start = time.perf_counter()
            with torch.no_grad():
                self._record(name, module, x)
            self.seconds += time.perf_counter() - start

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

    @property
    def fewest_tokens(self) -> int:
        """Tokens recorded for the input with the fewest (0 before any forward pass)."""
        return min(self._counts, default=0)

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

    def memory_bytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self._sums)

    def reset(self) -> None:
        """Forget everything recorded (hooks stay as they are)."""
        self._slot_of, self._sums, self._counts, self._calls = {}, [], [], []
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

    def state_dict(self) -> dict:
        return {"slot_of": dict(self._slot_of), "sums": [s.clone() for s in self._sums],
                "counts": list(self._counts), "calls": list(self._calls)}

    def load_state_dict(self, state: Mapping) -> None:
        self._slot_of = dict(state["slot_of"])
        self._sums = [s.clone().float() for s in state["sums"]]
        self._counts = [int(c) for c in state["counts"]]
        self._calls = [int(c) for c in state.get("calls", [0] * len(self._counts))]
        self._last_input, self._last_slot = None, None
