"""``CuttlefishConfig``: every knob of the method in one validated dataclass, a flag for ``HfArgumentParser``.

The leaf of the package (it imports only ``logging_utils``): the vocabulary every other module checks names
against lives here. (Slightly over the house's ~400 lines: each field's help text, which ``--help`` prints, and
its validation table entry are the bulk, and splitting them from the fields would separate a knob from its check.)
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, NamedTuple

from .logging_utils import get_logger

__all__ = ["CONFIG_INITS", "CONFIG_RANK_RULES", "CuttlefishConfig", "MODES"]

logger = get_logger(__name__)

# The vocabulary of the fields, here so that this module imports nothing of the library (a leaf): the
# registries of rank_rules.py and inits.py hold exactly these names.
MODES = ("cuttlefish", "pufferfish", "si_fd")
RANK_RULES = ("scaled_stable_rank", "stable_rank", "energy", "fixed_ratio", "kind_fractions")
INITS = ("svd", "whitened")
# What the fields accept: the registered names, "auto", and the name of 0.1's combined rule.
LEGACY_RANK_RULES = {"activation_aware": ("kind_fractions", "whitened")}  # rank_rule -> (rank_rule, init)
CONFIG_RANK_RULES = ("auto", *RANK_RULES, *LEGACY_RANK_RULES)
CONFIG_INITS = ("auto", *INITS)
XI_REFERENCES = ("auto", "init", "random_matrix")
WARMUPS = ("auto", "stable_ranks", "fixed")
LAYER_KINDS = ("attention", "ffn", "other")
# The measured default for fine-tuning pretrained transformers (benchmarks/pretrained_rank_rules.py): whitened
# init, FFN matrices keep 70% of their parameters and attention matrices 40% (60% overall with a 4x FFN).
DEFAULT_KIND_FRACTIONS = {"attention": 0.4, "ffn": 0.7}
PRETRAINED_FACTOR_LR_SCALE = 4.0  # factor_lr_scale="auto" for pretrained weights (README: the MiniLM fine-tune)
OTHER_KIND_FRACTION = 0.6  # layers of no known kind, unless kind_fractions names "other"
# Tokens (rows of a Linear's input, or spatial positions of a conv's input) per batch when the run's are unknown:
# e.g. batch 32 x 128 tokens of text, or batch 16 x 256 patches (a 224px ViT-B/14).
DEFAULT_TOKENS_PER_BATCH = 4096
PROFILE_DTYPES = (None, "float32", "float16", "bfloat16")
CONFIG_NAME = "cuttlefish_config.json"
# Keys of files written by older versions: `seed` clashed with TrainingArguments' --seed in one HfArgumentParser;
# `activation_fractions` became `kind_fractions` when the rule and the factor init were separated.
RENAMED_KEYS = {"seed": "power_iteration_seed", "activation_fractions": "kind_fractions"}
# Mode-dependent defaults for fields left as None: (frobenius_decay, extra_bn, skip_first_blocks).
MODE_DEFAULTS = {
    "cuttlefish": (1e-4, False, 0),
    "pufferfish": (0.0, True, 1),
    "si_fd": (1e-4, False, 0),
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    """An int or a finite float (never a bool: ``True`` is an int to Python, never a meant number)."""
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


def _is_one_of(value: Any, choices: tuple) -> bool:
    """``value in choices`` for choices of str and None, without ``==`` on arbitrary objects (arrays)."""
    return any(value is None if choice is None else isinstance(value, str) and value == choice
               for choice in choices)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# Command-line flags (and YAML/JSON args files read as text) give every value as a string. The fields that also
# take lists, dicts or words are annotated `X | str | None` with `str` second: HfArgumentParser then reads the
# flag as text, and __post_init__ turns the text into the value.
def _json_from_text(name: str, value: Any, example: str) -> Any:
    """A dict field given as text: its JSON value."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as error:
        raise ValueError(f"{name}={_show(value)} is not valid JSON ({error}); write a dict such as {example}."
                         ) from None


def _patterns_from_text(value: Any) -> Any:
    """A JSON list of names given as text ('["query", "value"]') is that list; any other text is a regex."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            decoded = json.loads(value)
        except json.JSONDecodeError:  # a regex such as "[qk]ey"
            return value
        if isinstance(decoded, list):
            return decoded
    return value


class _Range(NamedTuple):
    """The accepted values of one numeric field, and what the error message says about them."""

    kind: type          # int, or float (which takes ints too); never bool
    low: float
    high: float         # math.inf: no upper bound
    ends: str = "[]"    # which ends of [low, high] are open, e.g. "(]"
    also: tuple = ()    # other accepted values (None, "auto")
    meaning: str = ""   # what those other values mean, for the message
    why: str = ""       # why the upper bound, for the message about a value above it


# Every numeric field. The upper bounds stop absurd values (a typo, a unit mix-up) that would otherwise hang a
# measurement, exhaust memory at the switch or never let training switch, long before they would.
_RANGES = {
    "energy_threshold": _Range(float, 0, 1, "(]"),
    "rank_ratio": _Range(float, 0, 1, "(]"),
    "activation_tokens": _Range(int, 1, 2**24, why="more only slows the input hooks; 16384 was no more accurate "
                                "than 4096"),
    "min_rank": _Range(int, 1, 2**20, why="wider than any layer; ranks are clipped to the layer's full rank"),
    "rank_multiple": _Range(int, 1, 1024, why="tensor-core tiles are at most 256 wide"),
    "measure_every_steps": _Range(int, 1, 10**7, also=(None,), meaning="or None to measure once per epoch",
                                  why="a longer period than any run would never measure, so never switch"),
    "window": _Range(int, 1, 1000, why="the reference uses 5 to 15 measurements"),
    "eps_relative": _Range(float, 0, 1, why="1 already calls every layer stable at once; switch early with a "
                           "small min_warmup_measurements instead"),
    "ema_decay": _Range(float, 0, 1, "[)"),
    "min_warmup_measurements": _Range(int, 1, 10**6, why="max_warmup_fraction caps the warm-up anyway"),
    "max_warmup_fraction": _Range(float, 0, 1, "(]"),
    "fixed_warmup_fraction": _Range(float, 0, 1),
    "skip_first_blocks": _Range(int, 0, math.inf, also=(None, "auto"), meaning=(
        "'auto' (keep dense the layers that factorizing does not speed up) or None (the mode's default)")),
    "profile_margin": _Range(float, 0, 1, "[)"),
    "profile_tokens_per_batch": _Range(int, 1, 2**24, why="the layers are timed on an input of that many rows; "
                                       "use your run's batch size x sequence length"),
    "frobenius_decay": _Range(float, 0, 1, also=(None,), meaning="or None for the mode's default",
                              why="the paper uses 1e-4; larger values swamp the loss's gradient"),
    "rewarmup_steps": _Range(int, 0, 10**7, why="longer than any run"),
    "factor_lr_scale": _Range(float, 0, 10, "(]", also=("auto",), meaning=(
        f"or 'auto' ({PRETRAINED_FACTOR_LR_SCALE:g} for pretrained weights, 1 from scratch)"),
        why="steps ten times the schedule's already diverge easily"),
    "power_iterations": _Range(int, 1, 1000, why="each one is a pass over every tracked weight at every "
                               "measurement; warm-started, 4 suffice"),
    "power_iteration_seed": _Range(int, 0, 2**64 - 1, why="torch generators take 64-bit seeds"),
}
# Fields taking one of a few values (str or None; compared by type too, so True is not 1 and "None" not None).
_CHOICES = {"mode": MODES, "rank_rule": CONFIG_RANK_RULES, "init": CONFIG_INITS, "xi_reference": XI_REFERENCES,
            "warmup": WARMUPS,
            "profile_dtype": PROFILE_DTYPES}


@dataclass
class CuttlefishConfig:
    """Configuration of Cuttlefish low-rank training (and the Pufferfish / SI&FD baselines).

    Every field is a flag of ``transformers.HfArgumentParser`` (``--window 3``, ``--rank_pattern
    '{"output.dense": 64}'``), alone or next to ``TrainingArguments``; text is read as the value it stands for.

    Example:
        >>> config = CuttlefishConfig(rank_rule="energy", energy_threshold=0.95)
        >>> CuttlefishConfig.from_dict(config.to_dict()) == config
        True
    """

    mode: str = field(default="cuttlefish", metadata={"help": (
        "'cuttlefish': switch to low rank when stable ranks settle, ranks from the rank rule; "
        "'pufferfish': fixed rank ratio after a fixed warm-up, first blocks kept full-rank; "
        "'si_fd': factorize at step 0 (spectral init) with Frobenius decay at a fixed rank ratio.")})
    target_modules: list[str] | str | None = field(default="auto", metadata={"help": (
        "Modules to factorize. 'auto' (or None): Linear layers and k x k convs inside repeated blocks (never "
        "embeddings, pooler or head). A string is a regex matched against the full module name; a list matches "
        "exact names or name suffixes (as text, a JSON list: '[\"query\", \"value\"]').")})
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": (
        "Modules never factorized, same syntax as target_modules; checked first.")})
    rank_pattern: dict[str, int] | str | None = field(default_factory=dict, metadata={"help": (
        "Fixed ranks for some layers: {regex or name suffix: rank}, overriding the rank rule (as text, JSON: "
        "'{\"output.dense\": 64}'; None: none).")})
    rank_rule: str = field(default="auto", metadata={"help": (
        "How ranks are chosen at the switch (cuttlefish mode). 'auto': 'kind_fractions' when the targets look "
        "pretrained at train begin (fine-tuning), else 'scaled_stable_rank' (the paper's rule, for training from "
        "scratch); the switch summary says which ran and why. 'kind_fractions': each layer keeps "
        f"kind_fractions of its parameters. Or one of {RANK_RULES[:4]}. ('activation_aware', 0.1's name, means "
        "'kind_fractions' with init='whitened'.)")})
    init: str = field(default="auto", metadata={"help": (
        "How the factors start: 'svd' (truncated SVD of the weight), 'whitened' (truncated in the metric of the "
        "layer's inputs recorded before the switch, SVD-LLM-style; Linear layers, others take 'svd') or 'auto' "
        "('whitened' when the targets look pretrained, else 'svd').")})
    xi_reference: str = field(default="auto", metadata={"help": (
        "Where scaled_stable_rank takes srank(W_0) from: 'init' (snapshot at train begin, for training from "
        "scratch), 'random_matrix' (a Gaussian matrix of the same shape, for pretrained weights) or 'auto' "
        "(per layer: 'random_matrix' when the weight looks pretrained).")})
    energy_threshold: float = field(default=0.9, metadata={"help": (
        "For rank_rule='energy': keep the smallest rank holding this fraction of sum(sigma^2).")})
    rank_ratio: float = field(default=0.25, metadata={"help": (
        "For rank_rule='fixed_ratio' and the pufferfish / si_fd modes: rank = ceil(ratio * full_rank).")})
    kind_fractions: dict[str, float] | str | None = field(
        default_factory=lambda: dict(DEFAULT_KIND_FRACTIONS), metadata={"help": (
            "For rank_rule='kind_fractions': the fraction of its parameters each layer keeps, by kind "
            f"({', '.join(LAYER_KINDS)}; a kind not listed keeps {OTHER_KIND_FRACTION}). As text, JSON: "
            "'{\"attention\": 0.5, \"ffn\": 0.8}'; None: the default.")})
    activation_tokens: int = field(default=4096, metadata={"help": (
        "For init='whitened': input tokens per layer whose second moments the factors are fitted to: recorded "
        "after each measurement, those of the period before the switch used (warmup='stable_ranks'), or on the "
        "last steps before the switch (warmup='fixed'). Recording costs about 1.5x the layers' forward pass per "
        "recorded batch; 16384 was no more accurate on the MiniLM benchmark.")})
    min_rank: int = field(default=1, metadata={"help": "Lower bound for every chosen rank."})
    rank_multiple: int = field(default=1, metadata={"help": (
        "Round each rule-chosen rank up to a multiple of this, unless rounding up would make the layer save no "
        "parameters; rank_pattern ranks are kept as given. On a 2-core CPU in fp32, 8 made factorized BERT/DeiT "
        "layers 1.08x faster for 1.02-1.03x the parameters, 64 slower (benchmarks/rank_multiple.py: measure on your "
        "device and dtype).")})
    measure_every_steps: int | None = field(default=None, metadata={"help": (
        "Measure stable ranks every N optimizer steps; None measures once per epoch.")})
    window: int = field(default=5, metadata={"help": (
        "Number of recent measurements whose mean rank change decides stability.")})
    eps_relative: float = field(default=0.001, metadata={"help": (
        "A layer is stable when its EMA-smoothed stable rank changes by at most eps_relative * full_rank per "
        "measurement (0.001 = 0.384 ranks on a 384-wide layer).")})
    ema_decay: float = field(default=0.5, metadata={"help": "EMA factor smoothing each stable-rank curve."})
    warmup: str = field(default="auto", metadata={"help": (
        "When cuttlefish mode switches. 'stable_ranks' (the paper's): train full-rank until the stable ranks "
        "settle, within min_warmup_measurements and max_warmup_fraction. 'fixed': after fixed_warmup_fraction of "
        "the planned steps, without stable-rank measurements (the whitened init's inputs are the last "
        "activation_tokens recorded before it): for pretrained weights, whose stable ranks barely move, so "
        "waiting for them only ties the switch to how often they are measured (per epoch: at the "
        "max_warmup_fraction bound, 0.55 points worse on the MiniLM benchmark). 'auto': 'fixed' when the "
        "targets look pretrained, else 'stable_ranks'.")})
    min_warmup_measurements: int = field(default=2, metadata={"help": (
        "Never switch before this many measurements.")})
    max_warmup_fraction: float = field(default=0.5, metadata={"help": (
        "Always switch once this fraction of the planned training steps is done (cuttlefish mode).")})
    fixed_warmup_fraction: float = field(default=0.25, metadata={"help": (
        "Pufferfish mode, and cuttlefish mode with warmup='fixed' (pretrained weights, by default): switch after "
        "this fraction of the planned training steps.")})
    skip_first_blocks: int | str | None = field(default=None, metadata={"help": (
        "Keep the first K repeated blocks full-rank (None or 'none': 0, or 1 for pufferfish). 'auto': at the "
        "switch, time each planned layer dense and factorized on the training device (through torch.compile when "
        "the run compiled its model) and keep full-rank every layer whose factorization is not faster by "
        "profile_margin (see cuttlefish_hf.profiling).")})
    profile_margin: float = field(default=0.1, metadata={"help": (
        "With skip_first_blocks='auto': a layer is factorized only when its factorized forward+backward takes at "
        "most (1 - profile_margin) of the dense time.")})
    profile_tokens_per_batch: int = field(default=DEFAULT_TOKENS_PER_BATCH, metadata={"help": (
        "With skip_first_blocks='auto': tokens per batch the layers are timed with (batch size x sequence length, "
        "or x patches for a ViT; for a conv, the spatial positions of its input). Set it to your run's.")})
    profile_dtype: str | None = field(default=None, metadata={"help": (
        "With skip_first_blocks='auto': 'float32', 'float16' or 'bfloat16', the dtype the layers compute in "
        "(set it under mixed precision); None: the weights' dtype.")})
    frobenius_decay: float | None = field(default=None, metadata={"help": (
        "Frobenius decay coefficient on factors after the switch (None: 1e-4 for cuttlefish/si_fd, 0 for "
        "pufferfish). Factors get no L2 weight decay when it is > 0.")})
    extra_bn: bool | None = field(default=None, metadata={"help": (
        "Insert a BatchNorm between the two convs of factorized Conv2d layers (None: True for pufferfish). "
        "Mutually exclusive with Frobenius decay.")})
    rewarmup_steps: int = field(default=0, metadata={"help": (
        "After the switch, ramp the learning rate linearly from 0 back to the schedule over this many steps.")})
    factor_lr_scale: float | str | None = field(default="auto", metadata={"help": (
        "After the switch, scale each optimizer step of the factors by this: a learning-rate multiplier for the "
        "factors alone, whatever the optimizer and schedule. 'auto': 4 for pretrained weights (a MiniLM "
        "fine-tune gained 2.06 points over 1; 2 and 8 gave +1.36 and +2.19), 1 from scratch (not measured there).")})
    power_iterations: int = field(default=4, metadata={"help": (
        "Power iterations per measurement for tracking (warm-started; the switch itself uses exact SVDs).")})
    power_iteration_seed: int = field(default=0, metadata={"help": (
        "Seed of the power-iteration start vectors (was `seed`, which clashed with TrainingArguments' --seed).")})

    # HfArgumentParser lists the fields' flags under this heading.
    _argument_group_name = "Cuttlefish (the fields of CuttlefishConfig)"

    def __post_init__(self) -> None:
        self._read_text_values()
        # Every field is checked, types included: a wrong type accepted here fails much later, or silently
        # means something else (extra_bn="false" is truthy: BatchNorm on, Frobenius decay off).
        for name, choices in _CHOICES.items():
            if not _is_one_of(getattr(self, name), choices):
                raise ValueError(f"{name}={_show(getattr(self, name))} is not valid; choose one of {choices}.")
        for name, spec in _RANGES.items():
            self._check_range(name, spec)
        if self.rank_rule in LEGACY_RANK_RULES:
            rule, init = LEGACY_RANK_RULES[self.rank_rule]
            self.rank_rule = rule
            if self.init == "auto" and self.mode == "cuttlefish":  # the baselines ignore the rank rule
                self.init = init
        if self.mode == "si_fd" and self.init == "whitened":
            raise ValueError("init='whitened' needs the layers' inputs recorded before the switch, but si_fd mode "
                             "factorizes at step 0; use init='svd' (or 'auto').")
        if not (self.extra_bn is None or isinstance(self.extra_bn, bool)):
            raise ValueError(f"extra_bn must be True, False or None (the mode's default), got {_show(self.extra_bn)}"
                             " (a string such as 'false' would count as True).")
        self._check_kind_fractions()
        for name in ("target_modules", "exclude_modules"):
            self._check_patterns(name, getattr(self, name))
        if not isinstance(self.rank_pattern, dict):
            raise ValueError(f"rank_pattern must be a dict {{regex or name suffix: rank}}, got "
                             f"{_show(self.rank_pattern)}.")
        for pattern, rank in self.rank_pattern.items():
            if not isinstance(pattern, str):
                raise ValueError(f"rank_pattern keys must be regex strings or name suffixes, got {_show(pattern)}.")
            self._check_patterns("rank_pattern", pattern)
            if not _is_int(rank) or rank < 1:
                raise ValueError(f"rank_pattern[{pattern!r}] must be a positive int rank, got {_show(rank)}.")
        # Check the resolved values: pufferfish turns extra_bn on by default, so an explicit frobenius_decay > 0
        # there conflicts too, not only an explicit extra_bn=True.
        if self.resolved_extra_bn and self.resolved_frobenius_decay > 0:
            raise ValueError("extra_bn and frobenius_decay are mutually exclusive (as in the reference code): "
                             "set frobenius_decay=0 to use extra_bn, or extra_bn=False to use frobenius_decay"
                             f" (mode={self.mode!r} defaults extra_bn to {MODE_DEFAULTS[self.mode][1]}).")

    def _read_text_values(self) -> None:
        """Text as flags give it (see _json_from_text) -> the values it stands for; the checks come after."""
        self.target_modules = _patterns_from_text(self.target_modules)
        self.exclude_modules = _patterns_from_text(self.exclude_modules)
        self.rank_pattern = _json_from_text("rank_pattern", self.rank_pattern, '\'{"output.dense": 64}\'')
        if self.rank_pattern is None:
            self.rank_pattern = {}
        self.kind_fractions = _json_from_text("kind_fractions", self.kind_fractions,
                                              '\'{"attention": 0.5, "ffn": 0.8}\'')
        if self.kind_fractions is None:
            self.kind_fractions = dict(DEFAULT_KIND_FRACTIONS)
        if isinstance(self.factor_lr_scale, str) and self.factor_lr_scale != "auto":
            try:
                self.factor_lr_scale = float(self.factor_lr_scale)
            except ValueError:
                pass  # the range check names the accepted values
        if isinstance(self.skip_first_blocks, str):
            if self.skip_first_blocks.lower() == "none":
                self.skip_first_blocks = None
            elif re.fullmatch("[0-9]+", self.skip_first_blocks):
                self.skip_first_blocks = int(self.skip_first_blocks)

    # -- resolved, mode-dependent values -------------------------------------------------------------
    @property
    def resolved_frobenius_decay(self) -> float:
        if self.frobenius_decay is not None:
            return self.frobenius_decay
        return 0.0 if self.extra_bn else MODE_DEFAULTS[self.mode][0]

    @property
    def resolved_extra_bn(self) -> bool:
        return MODE_DEFAULTS[self.mode][1] if self.extra_bn is None else self.extra_bn

    @property
    def resolved_skip_first_blocks(self) -> int | str:
        """Blocks kept full-rank by index, or 'auto' (decided by timing at the switch)."""
        return MODE_DEFAULTS[self.mode][2] if self.skip_first_blocks is None else self.skip_first_blocks

    @property
    def resolved_rank_rule(self) -> str:
        """The rank rule, or 'auto' (decided per model at train begin)."""
        return self.rank_rule if self.mode == "cuttlefish" else "fixed_ratio"

    @property
    def resolved_factor_lr_scale(self) -> float | str:
        """The factors' step multiplier, or 'auto' (decided per model at train begin; the baselines' is 1)."""
        return self.factor_lr_scale if self.mode == "cuttlefish" or self.factor_lr_scale != "auto" else 1.0

    @property
    def resolved_init(self) -> str:
        """The factor init, or 'auto' (decided per model at train begin; the baselines' is 'svd')."""
        return self.init if self.mode == "cuttlefish" or self.init != "auto" else "svd"

    # -- validation helpers -----------------------------------------------------------------------------
    def _check_kind_fractions(self) -> None:
        fractions = self.kind_fractions
        if not isinstance(fractions, dict) or not all(_is_one_of(kind, LAYER_KINDS) for kind in fractions):
            raise ValueError(f"kind_fractions must be a dict with keys among {LAYER_KINDS}, e.g. "
                             f"{DEFAULT_KIND_FRACTIONS}; got {_show(fractions)}.")
        for kind, fraction in fractions.items():
            if not _is_real(fraction) or not 0 < fraction <= 1:
                raise ValueError(f"kind_fractions[{kind!r}] must be a number in (0, 1], got {_show(fraction)}.")

    def _check_range(self, name: str, spec: _Range) -> None:
        value = getattr(self, name)
        if _is_one_of(value, spec.also):
            return
        if (_is_int(value) if spec.kind is int else _is_real(value)) and \
                (value > spec.low if spec.ends[0] == "(" else value >= spec.low) and \
                (value < spec.high if spec.ends[1] == ")" else value <= spec.high):
            return
        accepted = "an integer" if spec.kind is int else "a number"
        accepted += f" {'>' if spec.ends[0] == '(' else '>='} {spec.low}"
        if spec.high != math.inf:
            accepted += f" and {'<' if spec.ends[1] == ')' else '<='} {spec.high}"
        also = f", {spec.meaning}" if spec.meaning else ""
        why = f" ({spec.why})" if spec.why and _is_real(value) and value > spec.high else ""  # over the top
        raise ValueError(f"{name} must be {accepted}{also}{why}; got {_show(value)}.")

    @staticmethod
    def _check_patterns(name: str, patterns: Any) -> None:
        if patterns is None:
            return
        if isinstance(patterns, str):
            try:
                re.compile(patterns)
            except (re.error, RecursionError, OverflowError) as error:  # too deeply nested, or a{99999999999}
                raise ValueError(f"{name}={_show(patterns)} is not a valid regular expression: {error}.") from None
        elif not (isinstance(patterns, (list, tuple)) and all(isinstance(p, str) for p in patterns)):
            raise ValueError(f"{name} must be a regex string or a list of module names, got {_show(patterns)}.")

    # -- serialization ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CuttlefishConfig:
        """Build from a dict, ignoring (with a warning) keys written by newer versions."""
        data = dict(data)
        for old, new in RENAMED_KEYS.items():
            if old in data and new not in data:
                data[new] = data.pop(old)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning("Ignoring unknown CuttlefishConfig keys (written by a newer version?): %s", unknown)
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(self.to_json_string())
        return path

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, token: str | bool | None = None,
                        local_files_only: bool | None = None, subfolder: str = "") -> CuttlefishConfig:
        """Load ``cuttlefish_config.json`` from a local folder or a Hub repo (downloaded into the Hub cache).

        Example:
            >>> config = CuttlefishConfig.from_pretrained("me/bert-sst2-cuttlefish")  # doctest: +SKIP
        """
        if os.path.isdir(name_or_path):
            folder = os.path.join(name_or_path, subfolder)
            path = os.path.join(folder, CONFIG_NAME)
            if not os.path.isfile(path):
                raise ValueError(f"No {CONFIG_NAME} in {folder!s}; was it saved with config.save_pretrained()?")
        else:
            from huggingface_hub import hf_hub_download
            from huggingface_hub.errors import EntryNotFoundError, HFValidationError

            try:
                path = hf_hub_download(str(name_or_path), CONFIG_NAME, subfolder=subfolder or None,
                                       revision=revision, cache_dir=cache_dir, token=token,
                                       local_files_only=bool(local_files_only))
            # A missing file, repo or revision, no network and no cached copy, a malformed id: the Hub's message
            # says which.
            except (OSError, EntryNotFoundError, HFValidationError) as error:
                where = f"Hub repo {str(name_or_path)!r} (revision {revision or 'main'!r}" + (
                    f", subfolder {subfolder!r})" if subfolder else ")")
                raise ValueError(f"No {CONFIG_NAME} for {str(name_or_path)!r}: not a local folder, and the {where} "
                                 f"could not provide it: {error}") from error
        with open(path, encoding="utf-8") as handle:
            return cls.from_dict(json.load(handle))

    def push_to_hub(self, repo_id: str, commit_message: str = "Upload CuttlefishConfig", private: bool | None = None,
                    token: str | bool | None = None, revision: str | None = None, create_pr: bool = False) -> Any:
        """Upload ``cuttlefish_config.json`` to a Hub repo, created if needed; returns the commit info."""
        from huggingface_hub import HfApi

        api = HfApi()
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True, token=token).repo_id
        if revision is not None and not revision.startswith("refs/pr/"):
            api.create_branch(repo_id, branch=revision, exist_ok=True, token=token)
        return api.upload_file(path_or_fileobj=self.to_json_string().encode(), path_in_repo=CONFIG_NAME,
                               repo_id=repo_id, commit_message=commit_message, revision=revision,
                               create_pr=create_pr, token=token)
