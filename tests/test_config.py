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
    assert config.kind_fractions == {"attention": 0.4, "ffn": 0.7}
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
        (dict(kind_fractions={"mlp": 0.5}), "kind_fractions", "keys among"),
        (dict(kind_fractions={"ffn": 0.0}), "kind_fractions", "in (0, 1]"),
        (dict(kind_fractions=[0.4, 0.7]), "kind_fractions", "keys among"),
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
                            measure_every_steps=50, window=3, eps_relative=0.002, rewarmup_steps=10,
                            power_iteration_seed=7, frobenius_decay=0.0, extra_bn=True)


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
        (dict(power_iteration_seed="0"), "power_iteration_seed must be an integer >= 0 and <= 1844674407370955161"),
        (dict(power_iteration_seed=1.0), "power_iteration_seed must be an integer >= 0"),
        (dict(power_iteration_seed=True), "power_iteration_seed must be an integer >= 0"),
        (dict(power_iteration_seed=-1), "power_iteration_seed must be an integer >= 0"),
        (dict(power_iteration_seed=2**64), "power_iteration_seed must be an integer >= 0"),
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
        (dict(skip_first_blocks="2.5"), "skip_first_blocks must be an integer >= 0, 'auto' (keep dense"),
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
        (dict(kind_fractions={"ffn": True}), "kind_fractions['ffn'] must be a number in (0, 1], got True."),
        (dict(kind_fractions={"ffn": float("inf")}),
         "kind_fractions['ffn'] must be a number in (0, 1], got inf."),
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
                              window=1000, power_iteration_seed=2**64 - 1, min_rank=2**20, eps_relative=1,
                              frobenius_decay=1, rewarmup_steps=10**7, measure_every_steps=10**7,
                              skip_first_blocks="auto")
    assert CuttlefishConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError) as info:
        CuttlefishConfig(target_modules=[[str(i)] for i in range(1000)])
    assert len(str(info.value)) < 200 and str(info.value).endswith("...")


# --------------------------------------------------------------------------- HfArgumentParser: flags are the fields
def _parse(*flags: str, with_training_args: bool = False):
    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser((CuttlefishConfig, TrainingArguments) if with_training_args else CuttlefishConfig)
    return parser.parse_args_into_dataclasses(list(flags), look_for_args_file=False)


def test_hf_argument_parser_reads_every_kind_of_field():
    (config,) = _parse("--mode", "cuttlefish", "--target_modules", '["query", "value"]', "--exclude_modules",
                       r".*pooler.*", "--rank_pattern", '{"output.dense": 64}', "--kind_fractions",
                       '{"attention": 0.5, "ffn": 0.8}', "--skip_first_blocks", "2", "--extra_bn", "false",
                       "--frobenius_decay", "0", "--measure_every_steps", "50", "--profile_dtype", "bfloat16",
                       "--rank_rule", "energy", "--energy_threshold", "0.95", "--window", "3",
                       "--power_iteration_seed", "7")
    assert config == CuttlefishConfig(target_modules=["query", "value"], exclude_modules=r".*pooler.*",
                                      rank_pattern={"output.dense": 64},
                                      kind_fractions={"attention": 0.5, "ffn": 0.8}, skip_first_blocks=2,
                                      extra_bn=False, frobenius_decay=0.0, measure_every_steps=50,
                                      profile_dtype="bfloat16", rank_rule="energy", energy_threshold=0.95,
                                      window=3, power_iteration_seed=7)
    assert _parse() == (CuttlefishConfig(),)


def test_hf_argument_parser_next_to_training_arguments(tmp_path):
    config, training_args = _parse("--output_dir", str(tmp_path), "--seed", "5", "--power_iteration_seed", "9",
                                   "--skip_first_blocks", "auto", "--target_modules", "[qk]ey", "--extra_bn", "true",
                                   "--frobenius_decay", "0", "--measure_every_steps", "4", with_training_args=True)
    assert config == CuttlefishConfig(skip_first_blocks="auto", target_modules="[qk]ey", extra_bn=True,
                                      frobenius_decay=0.0, measure_every_steps=4, power_iteration_seed=9)
    assert training_args.seed == 5 and training_args.output_dir == str(tmp_path)
    # --help renders every field, its help text the field's own
    from transformers import HfArgumentParser
    text = HfArgumentParser(CuttlefishConfig).format_help()
    for f in fields(CuttlefishConfig):
        assert f"--{f.name} " in text, f.name
        assert "".join(f.metadata["help"].split())[:60] in "".join(text.split()), f.name  # (lines wrap)


@pytest.mark.parametrize("kwargs,expected", [
    # text, as a flag or a JSON/YAML args file gives it, and the Python objects code passes
    (dict(skip_first_blocks="3"), dict(skip_first_blocks=3)),
    (dict(skip_first_blocks="none"), dict(skip_first_blocks=None)),
    (dict(skip_first_blocks="None"), dict(skip_first_blocks=None)),
    (dict(target_modules='["query", "value"]'), dict(target_modules=["query", "value"])),
    (dict(target_modules="[qk]ey"), dict(target_modules="[qk]ey")),  # not JSON: a regex
    (dict(exclude_modules='["pooler"]'), dict(exclude_modules=["pooler"])),
    (dict(rank_pattern='{"output.dense": 64}'), dict(rank_pattern={"output.dense": 64})),
    (dict(rank_pattern=None), dict(rank_pattern={})),
    (dict(kind_fractions='{"ffn": 0.5}'), dict(kind_fractions={"ffn": 0.5})),
    (dict(kind_fractions=None), dict()),  # the defaults
])
def test_text_values_are_read_like_their_python_objects(kwargs, expected):
    config = CuttlefishConfig(**kwargs)
    assert config == CuttlefishConfig(**expected)
    assert CuttlefishConfig.from_dict(json.loads(config.to_json_string())) == config


@pytest.mark.parametrize("flags,message", [
    (("--rank_pattern", '{"query": 8'), "rank_pattern='{\"query\": 8' is not valid JSON"),
    (("--rank_pattern", '{"query": 0}'), "rank_pattern['query'] must be a positive int rank, got 0."),
    (("--rank_pattern", "[8]"), "rank_pattern must be a dict {regex or name suffix: rank}, got [8]."),
    (("--kind_fractions", "ffn=0.5"), "kind_fractions='ffn=0.5' is not valid JSON"),
    (("--kind_fractions", '{"mlp": 0.5}'), "kind_fractions must be a dict with keys among"),
    (("--skip_first_blocks", "two"), "skip_first_blocks must be an integer >= 0, 'auto'"),
    (("--skip_first_blocks", "-1"), "skip_first_blocks must be an integer >= 0"),
    (("--target_modules", '["query", 3]'), "target_modules must be a regex string or a list of module names"),
    (("--target_modules", "(query"), "target_modules='(query' is not a valid regular expression"),
    (("--mode", "lora"), "mode='lora' is not valid; choose one of"),
    (("--profile_dtype", "fp8"), "profile_dtype='fp8' is not valid; choose one of"),
    (("--frobenius_decay", "2"), "frobenius_decay must be a number >= 0 and <= 1"),
])
def test_bad_flag_values_raise_naming_the_field(flags, message):
    with pytest.raises(ValueError) as info:
        _parse(*flags)
    assert message in str(info.value)


def test_a_bool_flag_takes_only_bool_words(capsys):
    with pytest.raises(SystemExit):
        _parse("--extra_bn", "maybe")
    assert "extra-bn: Truthy value expected: got maybe" in capsys.readouterr().err


def test_seed_was_renamed_and_old_files_still_load():
    # `seed` clashed with TrainingArguments' --seed in one HfArgumentParser.
    assert CuttlefishConfig.from_dict({"seed": 7}) == CuttlefishConfig(power_iteration_seed=7)
    assert "seed" not in CuttlefishConfig().to_dict()


# --------------------------------------------------------------------------- the Hub
class _FakeHub:
    """hf_hub_download / HfApi stand-ins recording their calls; uploads land in ``files``."""

    def __init__(self):
        self.calls, self.files = [], {}

    def hf_hub_download(self, repo_id, filename, **kwargs):
        self.calls.append(("hf_hub_download", repo_id, filename, kwargs))
        key = (repo_id, kwargs.get("subfolder") or "", kwargs.get("revision") or "main")
        if key not in self.files:
            from types import SimpleNamespace

            from huggingface_hub.errors import RemoteEntryNotFoundError

            raise RemoteEntryNotFoundError(f"404 Client Error. Entry Not Found for url: .../{repo_id}/{filename}",
                                           response=SimpleNamespace(headers={}, request=None, status_code=404))
        path = os.path.join(kwargs["cache_dir"] or ".", "downloaded.json")
        with open(path, "wb") as handle:
            handle.write(self.files[key])
        return path

    def create_repo(self, repo_id, **kwargs):
        from huggingface_hub import RepoUrl

        self.calls.append(("create_repo", repo_id, kwargs))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_file(self, **kwargs):
        self.calls.append(("upload_file", kwargs["repo_id"], kwargs))
        self.files[kwargs["repo_id"], "", kwargs.get("revision") or "main"] = kwargs["path_or_fileobj"]
        return "commit-info"


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    hub = _FakeHub()
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub.hf_hub_download)
    for name in ("create_repo", "create_branch", "upload_file"):  # (bound to `hub`: HfApi's self is not passed)
        monkeypatch.setattr(huggingface_hub.HfApi, name, getattr(hub, name))
    return hub


def test_push_to_hub_then_from_pretrained_round_trips(fake_hub, tmp_path):
    config = _non_default()
    assert config.push_to_hub("me/cfg", commit_message="Add config", private=True, token="hf_x",
                              revision="v1", create_pr=True) == "commit-info"
    (_, repo, create), (_, _, branch), (_, _, upload) = fake_hub.calls
    assert (repo, create) == ("me/cfg", {"private": True, "exist_ok": True, "token": "hf_x"})
    assert branch == {"branch": "v1", "exist_ok": True, "token": "hf_x"}
    assert upload == {"path_or_fileobj": config.to_json_string().encode(), "path_in_repo": CONFIG_NAME,
                      "repo_id": "me/cfg", "commit_message": "Add config", "revision": "v1", "create_pr": True,
                      "token": "hf_x"}
    fake_hub.calls.clear()
    loaded = CuttlefishConfig.from_pretrained("me/cfg", revision="v1", cache_dir=str(tmp_path), token="hf_x",
                                              local_files_only=True)
    assert loaded == config
    assert fake_hub.calls == [("hf_hub_download", "me/cfg", CONFIG_NAME,
                               {"subfolder": None, "revision": "v1", "cache_dir": str(tmp_path), "token": "hf_x",
                                "local_files_only": True})]


def test_push_to_hub_defaults(fake_hub):
    CuttlefishConfig().push_to_hub("me/cfg")
    (_, _, create), (_, _, upload) = fake_hub.calls  # no revision: no branch to create
    assert create == {"private": None, "exist_ok": True, "token": None}
    assert upload["revision"] is None and upload["create_pr"] is False and upload["commit_message"]


def test_from_pretrained_subfolder_local_and_hub(fake_hub, tmp_path):
    config = CuttlefishConfig(window=4)
    config.save_pretrained(tmp_path / "run" / "cuttlefish")
    assert CuttlefishConfig.from_pretrained(tmp_path / "run", subfolder="cuttlefish") == config
    assert fake_hub.calls == []  # a local folder never reaches the Hub
    fake_hub.files["me/cfg", "cuttlefish", "main"] = config.to_json_string().encode()
    assert CuttlefishConfig.from_pretrained("me/cfg", subfolder="cuttlefish", cache_dir=str(tmp_path)) == config
    assert fake_hub.calls[-1][3]["subfolder"] == "cuttlefish" and fake_hub.calls[-1][3]["local_files_only"] is False


def test_from_pretrained_names_the_repo_when_the_hub_lacks_the_file(fake_hub, tmp_path):
    with pytest.raises(ValueError) as info:
        CuttlefishConfig.from_pretrained("me/empty", revision="v2", cache_dir=str(tmp_path))
    message = str(info.value)
    assert f"No {CONFIG_NAME} for 'me/empty'" in message and "Hub repo 'me/empty' (revision 'v2')" in message
    assert "Entry Not Found" in message  # the Hub's own reason
    with pytest.raises(ValueError, match=f"No {CONFIG_NAME} in {tmp_path}"):
        CuttlefishConfig.from_pretrained(tmp_path, subfolder="")  # an existing folder without it: local error


def test_from_pretrained_offline_and_invalid_ids(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id, filename, **kwargs):
        raise LocalEntryNotFoundError("Cannot find the requested files in the disk cache and outgoing traffic "
                                      "has been disabled.")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(ValueError, match=r"No cuttlefish_config.json for 'me/cfg': not a local folder, and the Hub "
                                         r"repo 'me/cfg' \(revision 'main'\) could not provide it: .*disk cache"):
        CuttlefishConfig.from_pretrained("me/cfg")
    monkeypatch.undo()  # the real hf_hub_download refuses a malformed id before any network call
    missing = str(tmp_path / "no" / "such" / "folder")
    with pytest.raises(ValueError, match=rf"No cuttlefish_config.json for '{missing}': not a local folder"):
        CuttlefishConfig.from_pretrained(missing)
