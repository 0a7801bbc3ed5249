"""Tests for cuttlefish_hf.statistics: input second moments recorded by hooks (shared inputs, caps, state)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cuttlefish_hf.statistics import ActivationStats


class SharedInput(nn.Module):
    """Two Linears fed the same tensor (like Q and K), then a third fed their sum."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(6, 5)
        self.k = nn.Linear(6, 5)
        self.out = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.q(x) + self.k(x))


def test_stats_equal_direct_second_moment_over_3d_batches_and_shared_inputs():
    torch.manual_seed(0)
    model = SharedInput()
    stats = ActivationStats().start(model, ["q", "k", "out"])
    inputs = [torch.randn(3, 7, 6), torch.randn(2, 4, 6), torch.randn(5, 6)]
    hidden = []
    for x in inputs:
        model(x)
        hidden.append((model.q(x) + model.k(x)).detach())  # hooks record these calls too
    stats.stop()
    flat = torch.cat([x.reshape(-1, 6) for x in inputs]).double()
    expected = 2 * flat.T @ flat  # every x was seen twice by q (forward + the explicit call above)
    tokens = 2 * flat.shape[0]
    assert stats.count("q") == stats.count("k") == tokens
    torch.testing.assert_close(stats.second_moment_sum("q").double(), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(stats.covariance("k").double(), expected / tokens, rtol=1e-5, atol=1e-5)
    hid = torch.cat([h.reshape(-1, 5) for h in hidden]).double()
    torch.testing.assert_close(stats.covariance("out").double(), hid.T @ hid / hid.shape[0], rtol=1e-4, atol=1e-5)
    assert stats.second_moment_sum("q") is stats.second_moment_sum("k")   # Q/K share one sum
    assert stats.memory_bytes() == 4 * (6 * 6 + 5 * 5)
    assert stats.covariance("q").dtype == torch.float32


def test_stats_skip_eval_mode_and_hooks_are_removed_after_stop():
    model = SharedInput()
    stats = ActivationStats().start(model, ["q", "out"])
    assert all(len(m._forward_pre_hooks) == 1 for m in (model.q, model.out))
    model.eval()
    model(torch.randn(4, 6))
    assert stats.names == []                      # eval forward passes are not recorded
    model.train()
    model(torch.randn(4, 6))
    stats.stop()
    assert not stats.collecting
    assert all(len(m._forward_pre_hooks) == 0 for m in model.modules())
    before = stats.second_moment_sum("q").clone()
    model(torch.randn(4, 6))
    torch.testing.assert_close(stats.second_moment_sum("q"), before)
    assert stats.count("q") == 4


def test_stats_state_dict_round_trip_and_errors():
    model = SharedInput()
    stats = ActivationStats().start(model, ["q", "k", "out"])
    model(torch.randn(3, 6))
    stats.stop()
    restored = ActivationStats()
    restored.load_state_dict(stats.state_dict())
    for name in ("q", "k", "out"):
        torch.testing.assert_close(restored.covariance(name), stats.covariance(name))
        assert restored.count(name) == stats.count(name)
    assert restored.second_moment_sum("q") is restored.second_moment_sum("k")
    with pytest.raises(KeyError):
        restored.covariance("missing")
    with pytest.raises(ValueError, match="nn.Linear"):
        ActivationStats().start(model, ["nope"])


def test_stats_every_k_records_every_kth_pass():
    model = SharedInput()
    stats = ActivationStats(every=2).start(model, ["q", "k", "out"])
    inputs = [torch.randn(3, 6) for _ in range(5)]
    for x in inputs:
        model(x)
    stats.stop()
    kept = torch.cat([inputs[0], inputs[2], inputs[4]])
    assert stats.count("q") == stats.count("k") == stats.count("out") == 9
    torch.testing.assert_close(stats.covariance("q"), kept.T @ kept / 9, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        ActivationStats(every=0)


def test_stats_raise_when_shared_input_stops_being_shared():
    model = SharedInput()
    stats = ActivationStats().start(model, ["q", "k"])
    model(torch.randn(2, 6))
    model.q(torch.randn(2, 6))
    with pytest.raises(RuntimeError, match="shared its input"):
        model.k(torch.randn(2, 6))
    stats.stop()
