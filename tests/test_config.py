"""Tests for cuttlefish_hf.config: validation, mode defaults and JSON round trips."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import fields

import pytest

from cuttlefish_hf.config import CONFIG_NAME, CONFIG_RANK_RULES, MODES, CuttlefishConfig


def test_defaults_are_valid():
    config = CuttlefishConfig()
    assert config.mode == "cuttlefish"
    assert config.rank_rule == "auto"  # the controller picks per model; see test_pretrained_rule.py
    assert config.activation_fractions == {"attention": 0.4, "ffn": 0.7}
    assert config.target_modules == "auto"
    assert config.rank_pattern == {}
    assert MODES == ("cuttlefish", "pufferfish", "si_fd")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rule", CONFIG_RANK_RULES)
def test_every_mode_and_rule_is_accepted(mode, rule):
    assert CuttlefishConfig(mode=mode, rank_rule=rule).mode == mode


@pytest.mark.parametrize(
    "kwargs,field,fix",
    [
        (dict(mode="lora"), "mode", "choose one of"),
        (dict(rank_rule="svd"), "rank_rule", "choose one of"),
        (dict(activation_fractions={"mlp": 0.5}), "activation_fractions", "keys among"),
        (dict(activation_fractions={"ffn": 0.0}), "activation_fractions", "in (0, 1]"),
        (dict(activation_fractions=[0.4, 0.7]), "activation_fractions", "keys among"),
        (dict(activation_tokens=0), "activation_tokens", "integer >= 1"),
        (dict(xi_reference="pretrained"), "xi_reference", "choose one of"),
        (dict(target_modules="(query"), "target_modules", "not a valid regular expression"),
        (dict(target_modules=["query", 3]), "target_modules", "regex string or a list of module names"),
        (dict(exclude_modules="[pooler"), "exclude_modules", "not a valid regular expression"),
        (dict(rank_pattern={"(query": 8}), "rank_pattern", "not a valid regular expression"),
        (dict(rank_pattern={"query": 8.5}), "rank_pattern", "positive int"),
        (dict(rank_pattern={"query": "8"}), "rank_pattern", "positive int"),
        (dict(rank_pattern={"query": 0}), "rank_pattern", "positive int"),
        (dict(rank_pattern={"query": True}), "rank_pattern", "positive int"),
        (dict(rank_pattern=[("query", 8)]), "rank_pattern", "must be a dict"),
        (dict(energy_threshold=0.0), "energy_threshold", "a number > 0 and <= 1"),
        (dict(energy_threshold=1.01), "energy_threshold", "a number > 0 and <= 1"),
        (dict(energy_threshold="0.9"), "energy_threshold", "a number > 0 and <= 1"),
        (dict(rank_ratio=0.0), "rank_ratio", "a number > 0 and <= 1"),
        (dict(rank_ratio=1.5), "rank_ratio", "a number > 0 and <= 1"),
        (dict(max_warmup_fraction=0.0), "max_warmup_fraction", "a number > 0 and <= 1"),
        (dict(fixed_warmup_fraction=-0.1), "fixed_warmup_fraction", "a number >= 0 and <= 1"),
        (dict(ema_decay=1.0), "ema_decay", "a number >= 0 and < 1"),
        (dict(ema_decay=float("nan")), "ema_decay", "a number >= 0 and < 1"),
        (dict(eps_relative=-0.001), "eps_relative", "a number >= 0 and <= 1"),
        (dict(eps_relative=float("nan")), "eps_relative", "a number >= 0 and <= 1"),
        (dict(window=0), "window", "integer >= 1"),
        (dict(window=2.5), "window", "integer >= 1"),
        (dict(min_rank=0), "min_rank", "integer >= 1"),
        (dict(min_warmup_measurements=0), "min_warmup_measurements", "integer >= 1"),
        (dict(power_iterations=0), "power_iterations", "integer >= 1"),
        (dict(measure_every_steps=0), "measure_every_steps", "or None to measure once per epoch"),
        (dict(measure_every_steps=2.5), "measure_every_steps", "an integer >= 1"),
        (dict(rewarmup_steps=-1), "rewarmup_steps", "integer >= 0"),
        (dict(skip_first_blocks=-1), "skip_first_blocks", "integer >= 0"),
        (dict(frobenius_decay=-1e-4), "frobenius_decay", "a number >= 0 and <= 1, or None"),
        (dict(extra_bn=True, frobenius_decay=1e-4), "extra_bn and frobenius_decay", "set frobenius_decay=0"),
        # pufferfish turns extra_bn on by default: an explicit Frobenius decay conflicts with it too.
        (dict(mode="pufferfish", frobenius_decay=1e-4), "extra_bn and frobenius_decay", "extra_bn=False"),
    ],
)
def test_bad_values_raise_naming_field_and_fix(kwargs, field, fix):
    with pytest.raises(ValueError) as info:
        CuttlefishConfig(**kwargs)
    message = str(info.value)
    assert field in message
    assert fix in message


def test_compatible_extra_bn_and_decay_combinations():
    assert CuttlefishConfig(extra_bn=True, frobenius_decay=0.0).resolved_extra_bn
    assert CuttlefishConfig(mode="pufferfish", extra_bn=False, frobenius_decay=1e-4).resolved_frobenius_decay == 1e-4


def test_valid_edge_values():
    config = CuttlefishConfig(energy_threshold=1.0, rank_ratio=1.0, eps_relative=0.0, ema_decay=0.0,
                              fixed_warmup_fraction=0.0, max_warmup_fraction=1.0, measure_every_steps=1,
                              skip_first_blocks=0, target_modules=None, exclude_modules=["pooler"],
                              rank_pattern={r"attention\.self\.(query|key)$": 8})
    assert config.rank_pattern == {r"attention\.self\.(query|key)$": 8}


@pytest.mark.parametrize(
    "mode,frobenius,extra_bn,skip,rule",
    [
        ("cuttlefish", 1e-4, False, 0, "auto"),
        ("pufferfish", 0.0, True, 1, "fixed_ratio"),
        ("si_fd", 1e-4, False, 0, "fixed_ratio"),
    ],
)
def test_resolved_mode_defaults(mode, frobenius, extra_bn, skip, rule):
    config = CuttlefishConfig(mode=mode)
    assert config.resolved_frobenius_decay == frobenius
    assert config.resolved_extra_bn is extra_bn
    assert config.resolved_skip_first_blocks == skip
    assert config.resolved_rank_rule == rule
    assert (config.frobenius_decay, config.extra_bn, config.skip_first_blocks) == (None, None, None)


def test_resolved_explicit_values_win():
    config = CuttlefishConfig(mode="pufferfish", extra_bn=False, skip_first_blocks=3, rank_rule="energy")
    assert config.resolved_extra_bn is False
    assert config.resolved_skip_first_blocks == 3
    assert config.resolved_rank_rule == "fixed_ratio"  # pufferfish always uses the fixed ratio
    assert CuttlefishConfig(extra_bn=True).resolved_frobenius_decay == 0.0  # extra BN turns decay off
    assert CuttlefishConfig(frobenius_decay=3e-4).resolved_frobenius_decay == 3e-4
    assert CuttlefishConfig(rank_rule="energy").resolved_rank_rule == "energy"


def _non_default() -> CuttlefishConfig:
    return CuttlefishConfig(mode="cuttlefish", target_modules=["query", "value"], exclude_modules=r".*pooler.*",
                            rank_pattern={"intermediate.dense": 48}, rank_rule="energy", energy_threshold=0.95,
                            measure_every_steps=50, window=3, eps_relative=0.002, rewarmup_steps=10, seed=7,
                            frobenius_decay=0.0, extra_bn=True)


def test_json_round_trip():
    config = _non_default()
    text = config.to_json_string()
    assert text.endswith("\n")
    data = json.loads(text)
    assert set(data) == {f.name for f in fields(CuttlefishConfig)}
    assert data["rank_pattern"] == {"intermediate.dense": 48}
    again = CuttlefishConfig.from_dict(data)
    assert again == config
    assert again.to_json_string() == text
    assert CuttlefishConfig.from_dict(CuttlefishConfig().to_dict()) == CuttlefishConfig()


def test_save_and_load_pretrained(tmp_path):
    config = _non_default()
    path = config.save_pretrained(tmp_path / "run" / "nested")
    assert os.path.basename(path) == CONFIG_NAME and os.path.isfile(path)
    assert CuttlefishConfig.from_pretrained(tmp_path / "run" / "nested") == config
    assert CuttlefishConfig.from_pretrained(str(tmp_path / "run" / "nested")) == config


def test_from_pretrained_missing_raises(tmp_path):
    with pytest.raises(ValueError, match=CONFIG_NAME):
        CuttlefishConfig.from_pretrained(tmp_path)


def test_unknown_keys_ignored_with_warning(tmp_path, caplog):
    data = CuttlefishConfig(window=4).to_dict() | {"future_knob": 1, "another": "x"}
    with caplog.at_level(logging.WARNING, logger="cuttlefish_hf.config"):
        config = CuttlefishConfig.from_dict(data)
    assert config == CuttlefishConfig(window=4)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "future_knob" in warnings[0].getMessage() and "another" in warnings[0].getMessage()
    (tmp_path / CONFIG_NAME).write_text(json.dumps(data))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cuttlefish_hf.config"):
        assert CuttlefishConfig.from_pretrained(tmp_path) == CuttlefishConfig(window=4)
    assert "future_knob" in caplog.text


def test_from_dict_validates():
    with pytest.raises(ValueError, match="window"):
        CuttlefishConfig.from_dict({"window": 0})


def test_every_field_has_help():
    for f in fields(CuttlefishConfig):
        assert f.metadata.get("help"), f.name


# --------------------------------------------------------------------------- every field: types, finiteness, bounds
FLOAT_FIELDS = ("energy_threshold", "rank_ratio", "eps_relative", "ema_decay", "max_warmup_fraction",
                "fixed_warmup_fraction", "profile_margin", "frobenius_decay")


@pytest.mark.parametrize("name", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_floats_are_refused(name, value):
    # frobenius_decay=inf used to be accepted and turned the factors into NaN at the first step after the switch.
    with pytest.raises(ValueError) as info:
        CuttlefishConfig(**{name: value})
    message = str(info.value)
    assert message.startswith(f"{name} must be a number >")
    assert message.endswith(f"got {value!r}.")


@pytest.mark.parametrize(
    "kwargs,fix",
    [
        # a string is truthy: extra_bn="false" turned BatchNorm on and Frobenius decay off
        (dict(extra_bn="false"), "extra_bn must be True, False or None"),
        (dict(extra_bn=0), "extra_bn must be True, False or None"),
        (dict(seed="0"), "seed must be an integer >= 0 and <= 18446744073709551615"),
        (dict(seed=1.0), "seed must be an integer >= 0"),
        (dict(seed=True), "seed must be an integer >= 0"),
        (dict(seed=-1), "seed must be an integer >= 0"),
        (dict(seed=2**64), "seed must be an integer >= 0"),
        (dict(window=True), "window must be an integer >= 1 and <= 1000"),
        (dict(window=10**6), "window must be an integer >= 1 and <= 1000"),
        (dict(power_iterations=10**9), "power_iterations must be an integer >= 1 and <= 1000 (each one is a pass"),
        (dict(power_iterations=4.0), "power_iterations must be an integer"),
        (dict(profile_tokens_per_batch=10**12), "profile_tokens_per_batch must be an integer >= 1 and <= 16777216"),
        (dict(profile_tokens_per_batch=1e12), "profile_tokens_per_batch must be an integer"),
        (dict(activation_tokens=10**12), "activation_tokens must be an integer >= 1 and <= 16777216"),
        (dict(min_warmup_measurements=10**9), "min_warmup_measurements must be an integer >= 1 and <= 1000000"),
        (dict(min_rank=2**40), "min_rank must be an integer >= 1 and <= 1048576"),
        (dict(rewarmup_steps=10**12), "rewarmup_steps must be an integer >= 0 and <= 10000000"),
        (dict(measure_every_steps=10**12), "measure_every_steps must be an integer >= 1 and <= 10000000, or None"),
        (dict(measure_every_steps=True), "measure_every_steps must be an integer"),
        (dict(skip_first_blocks=True), "skip_first_blocks must be an integer >= 0"),
        (dict(skip_first_blocks="2"), "skip_first_blocks must be an integer >= 0, 'auto' (keep dense"),
        (dict(frobenius_decay=True), "frobenius_decay must be a number >= 0 and <= 1, or None for"),
        (dict(frobenius_decay=10**400), "frobenius_decay must be a number >= 0 and <= 1"),
        (dict(eps_relative=2.0), "eps_relative must be a number >= 0 and <= 1 (1 already"),
        (dict(energy_threshold=True), "energy_threshold must be a number > 0 and <= 1"),
        (dict(mode=None), "mode=None is not valid; choose one of"),
        (dict(rank_rule=["energy"]), "rank_rule=['energy'] is not valid; choose one of"),
        (dict(profile_dtype="None"), "profile_dtype='None' is not valid; choose one of"),
        (dict(profile_dtype=True), "profile_dtype=True is not valid; choose one of"),
        (dict(rank_pattern={3: 8}), "rank_pattern keys must be regex strings or name suffixes, got 3."),
        # re.compile raises RecursionError / OverflowError for these, not re.error
        (dict(target_modules="(" * 5000 + ")" * 5000), "is not a valid regular expression: maximum recursion"),
        (dict(rank_pattern={"a{99999999999}": 2}), "is not a valid regular expression: the repetition number"),
        (dict(activation_fractions={"ffn": True}), "activation_fractions['ffn'] must be a number in (0, 1], got True."),
        (dict(activation_fractions={"ffn": float("inf")}),
         "activation_fractions['ffn'] must be a number in (0, 1], got inf."),
    ],
)
def test_wrong_types_and_absurd_values_are_refused(kwargs, fix):
    (name, value), = kwargs.items()
    with pytest.raises(ValueError) as info:
        CuttlefishConfig(**kwargs)
    message = str(info.value)
    assert fix in message
    if not isinstance(value, dict):  # (dicts: their bad entry is in `fix`)
        assert repr(value)[:70] in message  # the value given, shown back


def test_every_field_is_validated():
    # A new field without a check would take any value; this fails until one is added.
    for f in fields(CuttlefishConfig):
        with pytest.raises(ValueError, match=f.name):
            CuttlefishConfig(**{f.name: object()})


def test_bounds_themselves_are_accepted_and_long_values_are_shortened():
    config = CuttlefishConfig(power_iterations=1000, profile_tokens_per_batch=2**24, activation_tokens=2**24,
                              window=1000, seed=2**64 - 1, min_rank=2**20, eps_relative=1, frobenius_decay=1,
                              rewarmup_steps=10**7, measure_every_steps=10**7, skip_first_blocks="auto")
    assert CuttlefishConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError) as info:
        CuttlefishConfig(target_modules=[[str(i)] for i in range(1000)])
    assert len(str(info.value)) < 200 and str(info.value).endswith("...")
