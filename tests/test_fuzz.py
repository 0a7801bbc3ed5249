"""Robustness: seeded fuzzing of ``CuttlefishConfig`` and ``factorize_`` plans on a tiny model, and NaN/inf weights
at every place an SVD of weights begins.

Every fuzzed case must either be refused with a ``ValueError``/``TypeError`` whose message names what is wrong,
or succeed; an accepted config must then run the whole controller (warm-up, switch, a low-rank step) to finite
parameters and outputs. Anything else (another exception, NaN, a hang) is a bug.
"""

from __future__ import annotations

import copy
import json
import random
import time
from dataclasses import fields

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from cuttlefish_hf.config import CONFIG_RANK_RULES, MODES, PROFILE_DTYPES, WARMUPS, CuttlefishConfig
from cuttlefish_hf.controller import Cuttlefish
from cuttlefish_hf.inits import whitened_init
from cuttlefish_hf.layers import FactorizedLayer
from cuttlefish_hf.rank_rules import XI_REFERENCES, decide_ranks
from cuttlefish_hf.surgery import factorize_, factorized_plan

CASES = 300          # configs, and as many plans
STEPS, PER_EPOCH = 6, 2
NAN, INF = float("nan"), float("inf")


class ConvBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return x + torch.relu(self.bn(self.conv(x)))


class MlpBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(x + self.fc2(torch.relu(self.fc1(x))))


class Tiny(nn.Module):
    """Auto targets: ``convs.{0,1}.conv`` (4x4x3x3) and ``blocks.{0,1}.fc{1,2}`` (16x8, 8x16)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.convs = nn.ModuleList([ConvBlock(), ConvBlock()])
        self.proj = nn.Linear(4, 8)
        self.blocks = nn.ModuleList([MlpBlock(), MlpBlock()])
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        for block in self.convs:
            x = block(x)
        x = self.proj(x.mean(dim=(2, 3)))
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _template() -> Tiny:
    with torch.random.fork_rng():  # built at import: leave the global RNG of other tests alone
        torch.manual_seed(0)
        return Tiny()


TEMPLATE = _template()
INPUTS = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(1))
LABELS = torch.tensor([0, 1, 2, 1])

# Values of every type and range that configs and plans should refuse, or take when they happen to fit.
JUNK = [NAN, INF, -INF, 10**12, 2**64, 10**400, -1, 0, -0.5, 0.5, 1.5, 1e300, True, False, None, "", "auto", "0",
        "false", "[", "(" * 5000 + ")" * 5000, "a{99999999999}", [], [1, [2]], ["fc1", None], {}, {"a": [1]},
        {"ffn": NAN}, {"a{99999999999}": 2}, (), ("fc1",), object()]

# Valid values of every field, cheap to run (the upper bounds themselves are tested in test_config.py).
VALID = {
    "mode": lambda r: r.choice(MODES),
    "target_modules": lambda r: r.choice(["auto", None, r"blocks\.\d+\.fc1", ["fc1", "fc2"], ["conv"], "head",
                                          ["proj"], ".*", r"convs\.0\.conv", []]),
    "exclude_modules": lambda r: r.choice([None, ["fc2"], r".*conv", [], "nothing", ".*"]),
    "rank_pattern": lambda r: r.choice([{}, {}, {"fc1": r.randint(1, 40)}, {r"convs\.0\.conv": 1}, {"nothing": 3},
                                        {".*": 2**40}]),
    "rank_rule": lambda r: r.choice([*CONFIG_RANK_RULES, "fixed_ratio", "energy"]),  # the ones that factorize Tiny
    "xi_reference": lambda r: r.choice(XI_REFERENCES),
    "warmup": lambda r: r.choice(WARMUPS),
    "energy_threshold": lambda r: r.choice([1.0, 1, 0.5, 1e-300, r.random() or 1.0]),
    "rank_ratio": lambda r: r.choice([1.0, 0.25, 1e-300, r.random() or 1.0]),
    "kind_fractions": lambda r: r.choice([{}, {"ffn": 1.0}, {"attention": 1e-9, "other": 0.5},
                                          {"attention": 0.4, "ffn": 0.7}]),
    "init": lambda r: r.choice(["auto", "auto", "svd", "whitened"]),
    "activation_tokens": lambda r: r.choice([1, 7, 4096, 2**24]),
    "min_rank": lambda r: r.choice([1, 1, 2, 3, 100, 2**20]),
    "rank_multiple": lambda r: r.choice([1, 1, 8, 64, 1024]),
    "measure_every_steps": lambda r: r.choice([None, 1, 2, 3, 10**7]),
    "window": lambda r: r.choice([1, 2, 5, 1000]),
    "eps_relative": lambda r: r.choice([0, 0.0, 1e-3, 1.0, r.random()]),
    "ema_decay": lambda r: r.choice([0, 0.5, 0.999999, r.random() * 0.99]),
    "min_warmup_measurements": lambda r: r.choice([1, 2, 10**6]),
    "max_warmup_fraction": lambda r: r.choice([1e-300, 0.5, 1.0, r.random() or 1.0]),
    "fixed_warmup_fraction": lambda r: r.choice([0, 0.0, 0.25, 1.0, r.random()]),
    "skip_first_blocks": lambda r: r.choice([None, 0, 1, 2, 5, "auto", 10**6]),
    "profile_margin": lambda r: r.choice([0, 0.1, 0.999, r.random() * 0.5]),
    "profile_tokens_per_batch": lambda r: r.choice([1, 2, 4, 5, 64, 500]),
    "profile_dtype": lambda r: r.choice(PROFILE_DTYPES),
    "frobenius_decay": lambda r: r.choice([None, 0, 0.0, 1e-4, 1.0]),
    "extra_bn": lambda r: r.choice([None, True, False]),
    "rewarmup_steps": lambda r: r.choice([0, 1, 3, 10**7]),
    "factor_lr_scale": lambda r: r.choice([1.0, 0.5, 2, 10]),
    "power_iterations": lambda r: r.choice([1, 4, 1000]),
    "power_iteration_seed": lambda r: r.choice([0, 1, 2**64 - 1]),
}
FIELD_NAMES = [f.name for f in fields(CuttlefishConfig)]


def _random_config_kwargs(rng: random.Random) -> dict:
    # the rest: defaults (scaled_stable_rank keeps a random-init Tiny dense: a rank rule in most cases)
    kwargs = {name: VALID[name](rng) for name in FIELD_NAMES if rng.random() < (0.8 if name == "rank_rule" else 0.4)}
    for name in rng.sample(FIELD_NAMES, rng.choice([0, 0, 1, 1, 2])):  # about a third of the cases: all valid
        kwargs[name] = rng.choice(JUNK)
    return kwargs


def _assert_clear(error: Exception, names) -> None:
    message = str(error)
    assert isinstance(error, (ValueError, TypeError)), repr(error)
    assert any(str(name) in message for name in names), f"the message names nothing it was given: {message}"


def _finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _train_step(model: nn.Module, optimizer) -> None:
    optimizer.zero_grad()
    F.cross_entropy(model(INPUTS), LABELS).backward()
    optimizer.step()


def _run_controller(config: CuttlefishConfig) -> Cuttlefish | None:
    """Warm-up, switch (forced when the config would switch later), one low-rank step; None when the model
    has no layer the config can target (a clear ValueError)."""
    model = copy.deepcopy(TEMPLATE)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    try:
        controller = Cuttlefish(model, config, total_steps=STEPS, steps_per_epoch=PER_EPOCH)
    except ValueError as error:  # no target (left): the message names the knob to change
        _assert_clear(error, ["target_modules", "exclude_modules", "skip_first_blocks",
                              "do not keep blocks full-rank by index"])  # a non-block target with skip > 0
        return None
    controller.begin(optimizer)
    for step in range(1, STEPS + 1):
        _train_step(model, optimizer)
        controller.step_end(step, optimizer)
        if step % PER_EPOCH == 0:
            controller.epoch_end(step, optimizer)
    if not controller.decided:  # (decided, not switched: it may have found nothing worth factorizing)
        controller.switch(STEPS, optimizer)
    _train_step(model, optimizer)  # Frobenius decay and re-warm-up hooks run here
    assert _finite(model), f"non-finite parameters after the switch with {config}"
    with torch.no_grad():
        assert torch.isfinite(model.eval()(INPUTS)).all()
    assert set(factorized_plan(model)) <= set(controller.targets)
    return controller


def test_fuzzed_configs_are_refused_clearly_or_run_to_finite_weights():
    rng = random.Random(0)
    accepted = refused = ran = factorized = 0
    start = time.perf_counter()
    for case in range(CASES):
        kwargs = _random_config_kwargs(rng)
        case_start = time.perf_counter()
        try:
            config = CuttlefishConfig(**kwargs)
        except (ValueError, TypeError) as error:
            _assert_clear(error, kwargs or FIELD_NAMES)
            refused += 1
            continue
        accepted += 1
        # Accepted configs are plain JSON (no NaN/inf) and come back equal through it.
        again = CuttlefishConfig.from_dict(json.loads(config.to_json_string()))
        assert again.to_dict() == json.loads(config.to_json_string())
        try:
            controller = _run_controller(config)
        except Exception as error:  # noqa: BLE001 - any crash of an accepted config is a bug: say which
            raise AssertionError(f"case {case}: accepted config crashed: {kwargs}") from error
        ran += controller is not None
        factorized += controller is not None and controller.switched
        assert time.perf_counter() - case_start < 5, f"case {case} took too long: {kwargs}"
    assert refused > 50 and accepted > 50 and ran > 50 and factorized > 25, (accepted, refused, ran, factorized)
    assert time.perf_counter() - start < 60


FULL_RANKS = {"convs.0.conv": 4, "convs.1.conv": 4, "blocks.0.fc1": 8, "blocks.1.fc2": 8, "stem": 4, "head": 3,
              "proj": 4}
BAD_NAMES = ["convs.0.bn", "blocks.0.norm", "blocks.0", "convs", "", "nothing", "proj.first", "proj.second",
             "head.weight", "blocks.0.fc1.", 3, None, ("head",), 1.5]
BAD_RANKS = [0, -1, 5, 9, 10**9, 2**64, 1.0, 2.5, True, False, "2", None, [2], {"r": 2}, NAN, INF]


def _random_plan(rng: random.Random) -> dict:
    """1-3 valid entries, then (in most cases) one entry with a bad name or a bad rank."""
    names = rng.sample(sorted(FULL_RANKS), rng.randint(1, 3))
    plan = {name: rng.randint(1, FULL_RANKS[name]) for name in names}
    if rng.random() < 0.7:
        if rng.random() < 0.5:
            plan[rng.choice(BAD_NAMES)] = rng.randint(1, 3)
        else:
            plan[rng.choice(names)] = rng.choice(BAD_RANKS)
    return plan


def test_fuzzed_plans_are_refused_clearly_or_factorize_to_finite_layers():
    rng = random.Random(0)
    refused = applied = 0
    for case in range(CASES):
        model = copy.deepcopy(TEMPLATE)
        if rng.random() < 0.3:
            factorize_(model, {"proj": 2})  # then "proj", "proj.first", "proj.second" name factorized parts
        plan = _random_plan(rng)
        init = rng.choice(["svd", "svd", "empty"])
        before = dict(factorized_plan(model))
        try:
            report = factorize_(model, plan, init=init, extra_bn=rng.random() < 0.5)
        except (ValueError, TypeError) as error:
            _assert_clear(error, [*plan, *plan.values()])
            assert factorized_plan(model) == before, f"case {case}: a refused plan changed the model: {plan}"
            refused += 1
            continue
        applied += 1
        assert factorized_plan(model) == before | report.plan and report.plan == plan
        if init == "svd":
            assert _finite(model)
            with torch.no_grad():
                assert torch.isfinite(model.eval()(INPUTS)).all()
    assert refused > 100 and applied > 50, (refused, applied)


def test_every_field_is_fuzzed():
    assert set(VALID) == set(FIELD_NAMES)


# --------------------------------------------------------------------------- NaN/inf weights at every SVD entry
def _broken(bad: float) -> Tiny:
    model = copy.deepcopy(TEMPLATE)
    with torch.no_grad():
        model.blocks[1].fc2.weight[2, 3] = bad
    return model


@pytest.mark.parametrize("bad", [NAN, INF])
@pytest.mark.parametrize("mode,rule", [("cuttlefish", "fixed_ratio"), ("cuttlefish", "energy"),
                                       ("cuttlefish", "scaled_stable_rank"), ("cuttlefish", "kind_fractions"),
                                       ("pufferfish", "auto"), ("si_fd", "auto")])
def test_non_finite_weights_at_the_switch_raise_naming_the_layer(bad, mode, rule):
    # inf used to become NaN factors with no error (fixed ratio, Pufferfish, SI&FD); NaN a raw LinAlgError.
    model = _broken(bad)
    controller = Cuttlefish(model, CuttlefishConfig(mode=mode, rank_rule=rule), total_steps=STEPS)
    with pytest.raises(ValueError, match=r"^The weights of 'blocks\.1\.fc2' are NaN/inf before training.*"
                                         r"learning rate"):
        controller.begin()  # W_0's stable ranks are the first SVD
    controller.init_stable_ranks = {}  # a broken weight that arrives after begin() is caught at the switch
    with pytest.raises(ValueError, match=r"^The weights of 'blocks\.1\.fc2' are NaN/inf before choosing ranks.*"
                                         r"learning rate"):
        controller.switch(1)
    assert factorized_plan(model) == {} and not any(isinstance(m, FactorizedLayer) for m in model.modules())


@pytest.mark.parametrize("bad", [NAN, INF])
def test_non_finite_weights_in_the_rank_rules_and_whitened_init_entry_points(bad):
    model = _broken(bad)
    weights = {name: model.get_submodule(name).weight for name in ("blocks.0.fc1", "blocks.1.fc2")}
    pattern = r"^The weights of 'blocks\.1\.fc2' are NaN/inf before choosing ranks"
    with pytest.raises(ValueError, match=pattern):
        decide_ranks(weights, "energy")
    for rule in ("kind_fractions", "fixed_ratio"):  # rules that read no spectrum still check the weights
        with pytest.raises(ValueError, match=pattern):
            decide_ranks(weights, rule)
    covariances = {name: torch.eye(weight.shape[1]) for name, weight in weights.items()}
    with pytest.raises(ValueError, match=r"^The weights of 'blocks\.1\.fc2' are NaN/inf before factorizing"):
        factorize_(model, {"blocks.0.fc1": 2, "blocks.1.fc2": 2}, init=whitened_init(covariances))
    assert factorized_plan(model) == {}


def test_a_diverged_warm_up_stops_at_the_next_measurement_naming_the_layer():
    model = copy.deepcopy(TEMPLATE)
    controller = Cuttlefish(model, CuttlefishConfig(measure_every_steps=1, rank_rule="energy"), total_steps=100)
    controller.begin()
    controller.step_end(1)
    with torch.no_grad():
        model.convs[0].conv.weight.fill_(INF)
    with pytest.raises(ValueError, match=r"^The weights of 'convs\.0\.conv' are NaN/inf before measuring"):
        controller.step_end(2)


def test_profiling_a_conv_with_extra_bn_on_a_tiny_batch_switches():
    config = CuttlefishConfig(skip_first_blocks="auto", extra_bn=True, rank_rule="fixed_ratio",
                              profile_tokens_per_batch=1)
    controller = Cuttlefish(copy.deepcopy(TEMPLATE), config, total_steps=STEPS)
    controller.begin()
    controller.switch(1)  # timed the conv on a (1, C, 1, 1) input: its extra BatchNorm refused 1 value per channel
    assert controller.profile_report is not None and controller.decided
