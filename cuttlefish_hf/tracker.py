"""When to switch: the stable ranks of every candidate layer have stopped changing.

Each layer's stable-rank history is smoothed with an exponential moving average; a layer is *stable* when
the mean absolute change of the smoothed curve over the last ``window`` measurements is at most
``eps_relative * full_rank``. The threshold is relative to the layer's width because the reference code's
absolute thresholds (e.g. 0.411 rank/epoch for DeiT) mean different things for 192- and 3072-wide layers;
``eps_relative=0.001`` reproduces 0.384 ranks per measurement on a 384-wide DeiT-S layer.

When only a few layers remain unstable the threshold loosens (x2.5 when at most 20% remain, x5 at most 10%),
as the reference does. The switch never happens before ``min_measurements`` and always happens at
``max_measurements`` (the reference has no upper bound: a run whose ranks never settle never switches).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["StableRankTracker"]

# (fraction of layers still unstable, threshold multiplier), checked from the tightest.
LOOSENING = ((0.1, 5.0), (0.2, 2.5))


class StableRankTracker:
    """Per-layer stable-rank history and the EMA-derivative switch test.

    Example:
        >>> tracker = StableRankTracker({"fc": 64}, window=2, min_measurements=3)
        >>> [tracker.update({"fc": 10.0}) for _ in range(3)]
        [False, False, True]
    """

    def __init__(
        self,
        full_ranks: Mapping[str, int],
        *,
        window: int = 5,
        eps_relative: float = 0.001,
        ema_decay: float = 0.5,
        min_measurements: int = 2,
        max_measurements: int | None = None,
    ) -> None:
        if not full_ranks:
            raise ValueError("StableRankTracker needs at least one layer to track.")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}.")
        self.full_ranks = dict(full_ranks)
        self.window = window
        self.eps_relative = eps_relative
        self.ema_decay = ema_decay
        self.min_measurements = max(min_measurements, 1)
        self.max_measurements = max_measurements
        self.history: dict[str, list[float]] = {name: [] for name in self.full_ranks}
        self.smoothed: dict[str, list[float]] = {name: [] for name in self.full_ranks}

    @property
    def num_measurements(self) -> int:
        return len(next(iter(self.history.values())))

    def update(self, stable_ranks: Mapping[str, float]) -> bool:
        """Record one measurement of every layer; return True when training should switch now."""
        missing = set(self.full_ranks) - set(stable_ranks)
        if missing:
            raise ValueError(f"Measurement is missing tracked layers: {sorted(missing)[:5]}")
        for name in self.full_ranks:
            value = float(stable_ranks[name])
            previous = self.smoothed[name]
            ema = value if not previous else self.ema_decay * previous[-1] + (1 - self.ema_decay) * value
            self.history[name].append(value)
            previous.append(ema)
        return self.should_switch()

    def mean_change(self, name: str) -> float | None:
        """Mean absolute change of the smoothed curve over the last ``window`` steps (None until enough)."""
        curve = self.smoothed[name]
        if len(curve) <= self.window:
            return None
        recent = curve[-self.window - 1 :]
        return sum(abs(b - a) for a, b in zip(recent, recent[1:])) / self.window

    def unstable_layers(self) -> list[str]:
        """Layers whose smoothed stable rank still moves more than their (possibly loosened) threshold."""
        strict = [name for name in self.full_ranks if not self._is_stable(name, 1.0)]
        fraction = len(strict) / len(self.full_ranks)
        multiplier = next((m for limit, m in LOOSENING if fraction <= limit), 1.0)
        return [name for name in strict if not self._is_stable(name, multiplier)]

    def _is_stable(self, name: str, multiplier: float) -> bool:
        change = self.mean_change(name)
        return change is not None and change <= multiplier * self.eps_relative * self.full_ranks[name]

    def should_switch(self) -> bool:
        count = self.num_measurements
        if self.max_measurements is not None and count >= self.max_measurements:
            return True
        return count >= self.min_measurements and not self.unstable_layers()

    def state_dict(self) -> dict[str, Any]:
        return {"history": {k: list(v) for k, v in self.history.items()},
                "smoothed": {k: list(v) for k, v in self.smoothed.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if set(state["history"]) != set(self.full_ranks):
            raise ValueError("Tracker state was saved for a different set of layers; was the config changed?")
        self.history = {k: list(v) for k, v in state["history"].items()}
        self.smoothed = {k: list(v) for k, v in state["smoothed"].items()}
