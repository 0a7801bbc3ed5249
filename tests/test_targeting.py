"""Tests for cuttlefish_hf.targeting: which Linear/Conv2d layers get factorized."""

from __future__ import annotations

import functools

import pytest
import timm
import transformers as tf
from torch import nn

from cuttlefish_hf.targeting import (
    TargetReport,
    block_indices,
    describe_targets,
    find_targets,
    layer_kind,
    matches,
)
from helpers import tiny_timm_deit

TINY_TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100)
TINY_VISION = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8,
    num_labels=3,
)


class _Named(nn.Module):
    """A module whose children are given as keyword arguments (to reproduce a name layout)."""

    def __init__(self, **children: nn.Module) -> None:
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)


def _pre59_hf_vit(root: str) -> nn.Module:
    """The pre-transformers-5.9 ViT/DeiT module-name layout, built by hand (d=32, 2 layers)."""

    def layer() -> nn.Module:
        return _Named(
            attention=_Named(
                attention=_Named(query=nn.Linear(32, 32), key=nn.Linear(32, 32), value=nn.Linear(32, 32)),
                output=_Named(dense=nn.Linear(32, 32)),
            ),
            intermediate=_Named(dense=nn.Linear(32, 64)),
            output=_Named(dense=nn.Linear(64, 32)),
            layernorm_before=nn.LayerNorm(32),
            layernorm_after=nn.LayerNorm(32),
        )

    backbone = _Named(
        embeddings=_Named(patch_embeddings=_Named(projection=nn.Conv2d(3, 32, kernel_size=8, stride=8))),
        encoder=_Named(layer=nn.ModuleList([layer(), layer()])),
        layernorm=nn.LayerNorm(32),
    )
    return _Named(**{root: backbone}, classifier=nn.Linear(32, 3))


def _blocks_model() -> nn.Module:
    """Two conv blocks with a 3x3 conv, a 1x1 conv and a depthwise conv each."""

    def block() -> nn.Module:
        return _Named(
            conv=nn.Conv2d(8, 8, 3, padding=1),
            pw=nn.Conv2d(8, 8, 1),
            dw=nn.Conv2d(8, 8, 3, padding=1, groups=8),
            norm=nn.BatchNorm2d(8),
        )

    return _Named(stem=nn.Conv2d(3, 8, 3), stages=nn.Sequential(block(), block()), fc=nn.Linear(8, 2))


_BUILDERS = {
    "bert": lambda: tf.BertForSequenceClassification(tf.BertConfig(**TINY_TEXT)),
    "roberta": lambda: tf.RobertaForSequenceClassification(tf.RobertaConfig(**TINY_TEXT)),
    "hf_vit": lambda: tf.ViTForImageClassification(tf.ViTConfig(**TINY_VISION)),
    "hf_deit": lambda: tf.DeiTForImageClassification(tf.DeiTConfig(**TINY_VISION)),
    "pre59_vit": lambda: _pre59_hf_vit("vit"),
    "pre59_deit": lambda: _pre59_hf_vit("deit"),
    "timm_deit": lambda: tiny_timm_deit(seed=None),
    "timm_resnet18": lambda: timm.create_model("resnet18", pretrained=False, num_classes=3),
    "blocks": _blocks_model,
}


@functools.cache
def build(key: str) -> nn.Module:
    return _BUILDERS[key]()


def _per_block(prefix: str, n_blocks: int, suffixes: list[str]) -> list[str]:
    return [f"{prefix}.{i}.{s}" for i in range(n_blocks) for s in suffixes]


BERT_SUFFIXES = [
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
]
HF5_VIT_SUFFIXES = [
    "attention.q_proj",
    "attention.k_proj",
    "attention.v_proj",
    "attention.o_proj",
    "mlp.fc1",
    "mlp.fc2",
]
PRE59_VIT_SUFFIXES = [
    "attention.attention.query",
    "attention.attention.key",
    "attention.attention.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
]

# model key -> (exact auto targets in named_modules order, {never-targeted layer: reason substring})
AUTO_CASES = {
    "bert": (
        _per_block("bert.encoder.layer", 2, BERT_SUFFIXES),
        {"bert.pooler.dense": "pooler", "classifier": "classifier"},
    ),
    "roberta": (
        _per_block("roberta.encoder.layer", 2, BERT_SUFFIXES),
        {"classifier.dense": "classifier", "classifier.out_proj": "classifier"},
    ),
    "hf_vit": (
        _per_block("vit.layers", 2, HF5_VIT_SUFFIXES),
        {"vit.embeddings.patch_embeddings.projection": "embeddings", "classifier": "classifier"},
    ),
    "hf_deit": (
        _per_block("deit.layers", 2, HF5_VIT_SUFFIXES),
        {"deit.embeddings.patch_embeddings.projection": "embeddings", "classifier": "classifier"},
    ),
    "pre59_vit": (
        _per_block("vit.encoder.layer", 2, PRE59_VIT_SUFFIXES),
        {"vit.embeddings.patch_embeddings.projection": "embeddings", "classifier": "classifier"},
    ),
    "pre59_deit": (
        _per_block("deit.encoder.layer", 2, PRE59_VIT_SUFFIXES),
        {"deit.embeddings.patch_embeddings.projection": "embeddings", "classifier": "classifier"},
    ),
    "timm_deit": (
        _per_block("blocks", 2, ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]),
        {"patch_embed.proj": "patch_embed", "head": "head"},
    ),
    "timm_resnet18": (
        [f"layer{s}.{b}.conv{c}" for s in range(1, 5) for b in range(2) for c in (1, 2)],
        {
            "conv1": "outside a repeated block",
            "fc": "outside a repeated block",
            "layer2.0.downsample.0": "1x1 conv",
            "layer3.0.downsample.0": "1x1 conv",
            "layer4.0.downsample.0": "1x1 conv",
        },
    ),
    "blocks": (
        ["stages.0.conv", "stages.1.conv"],
        {
            "stem": "outside a repeated block",
            "fc": "outside a repeated block",
            "stages.0.pw": "1x1 conv",
            "stages.1.dw": "grouped conv (groups=8)",
        },
    ),
}


@pytest.mark.parametrize("key", list(AUTO_CASES))
@pytest.mark.parametrize("target_modules", ["auto", None])
def test_auto_targets_are_exact(key: str, target_modules: str | None) -> None:
    expected, never = AUTO_CASES[key]
    model = build(key)
    assert find_targets(model, target_modules) == expected
    report = describe_targets(model, target_modules)
    assert report.matched == expected
    for name, reason in never.items():
        assert reason in report.skipped[name], (name, report.skipped[name])
    linear_or_conv = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert sorted([*report.matched, *report.skipped]) == sorted(linear_or_conv)


def test_auto_target_counts() -> None:
    counts = {key: len(expected) for key, (expected, _) in AUTO_CASES.items()}
    assert counts == {
        "bert": 12,
        "roberta": 12,
        "hf_vit": 12,
        "hf_deit": 12,
        "pre59_vit": 12,
        "pre59_deit": 12,
        "timm_deit": 8,
        "timm_resnet18": 16,
        "blocks": 2,
    }


@pytest.mark.parametrize(
    ("name", "patterns", "expected"),
    [
        ("bert.encoder.layer.0.attention.self.query", r".*\.query", True),
        ("bert.encoder.layer.0.attention.self.query", r"query", False),  # regex must fullmatch
        ("bert.encoder.layer.0.attention.self.query", r".*layer\.[01]\..*(query|value)", True),
        ("bert.encoder.layer.0.attention.self.query", ["query"], True),  # '.'-suffix
        ("bert.encoder.layer.0.attention.self.query", ["self.query"], True),
        ("bert.encoder.layer.0.attention.self.query", ["uery"], False),  # not on a '.' boundary
        ("bert.encoder.layer.0.attention.self.query", ["bert.encoder.layer.0.attention.self.query"], True),
        ("classifier", ["classifier"], True),
        ("classifier", ["key", "value"], False),
        ("classifier", [], False),
    ],
)
def test_matches(name: str, patterns: str | list[str], expected: bool) -> None:
    assert matches(name, patterns) is expected


@pytest.mark.parametrize(
    ("target_modules", "exclude_modules", "expected_suffixes"),
    [
        (["query", "value"], None, ["attention.self.query", "attention.self.value"]),
        (r".*\.(query|key)", None, ["attention.self.query", "attention.self.key"]),
        (["dense"], ["pooler.dense"], ["attention.output.dense", "intermediate.dense", "output.dense"]),
        (["query", "key"], r".*\.key", ["attention.self.query"]),
        (
            "auto",
            ["output.dense", "intermediate.dense"],
            ["attention.self.query", "attention.self.key", "attention.self.value"],
        ),
    ],
)
def test_explicit_targets_and_exclude(
    target_modules: str | list[str], exclude_modules: str | list[str] | None, expected_suffixes: list[str]
) -> None:
    model = build("bert")
    expected = _per_block("bert.encoder.layer", 2, expected_suffixes)
    assert find_targets(model, target_modules, exclude_modules) == expected


def test_explicit_target_can_hit_layers_outside_blocks() -> None:
    assert find_targets(build("bert"), ["classifier", "pooler.dense"]) == ["bert.pooler.dense", "classifier"]


def test_exclude_wins_over_target() -> None:
    model = build("bert")
    targets = find_targets(model, ["query"], exclude_modules=["layer.0.attention.self.query"])
    assert targets == ["bert.encoder.layer.1.attention.self.query"]
    report = describe_targets(model, ["query"], exclude_modules=["layer.0.attention.self.query"])
    assert report.skipped["bert.encoder.layer.0.attention.self.query"] == "excluded by exclude_modules"
    with pytest.raises(ValueError, match="exclude_modules"):
        find_targets(model, ["query"], exclude_modules=["query"])


def test_excluded_non_linear_match_does_not_raise() -> None:
    targets = find_targets(build("bert"), r".*layer\.0\.output\..*", exclude_modules=["LayerNorm", "dropout"])
    assert targets == ["bert.encoder.layer.0.output.dense"]


@pytest.mark.parametrize(
    ("target_modules", "bad_name"),
    [
        (["LayerNorm"], "bert.embeddings.LayerNorm"),
        (r".*layer\.1\.output\.LayerNorm", "bert.encoder.layer.1.output.LayerNorm"),
        (["attention"], "bert.encoder.layer.0.attention"),  # a container, not a Linear
        (["word_embeddings"], "bert.embeddings.word_embeddings"),
    ],
)
def test_explicit_non_linear_target_raises(target_modules: str | list[str], bad_name: str) -> None:
    with pytest.raises(ValueError, match=bad_name.replace(".", r"\.")) as err:
        find_targets(build("bert"), target_modules)
    assert "nn.Linear" in str(err.value) and "exclude_modules" in str(err.value)


def test_explicit_grouped_conv_raises() -> None:
    model = build("blocks")
    with pytest.raises(ValueError, match=r"stages\.0\.dw.*groups=8"):
        find_targets(model, ["dw"])
    assert describe_targets(model, ["dw"]).skipped["stages.0.dw"] == "grouped conv (groups=8)"
    assert find_targets(model, ["pw"]) == ["stages.0.pw", "stages.1.pw"]  # explicit 1x1 convs are allowed


@pytest.mark.parametrize("target_modules", [["qurey"], r".*qurey"])
def test_typo_raises_with_candidates(target_modules: str | list[str]) -> None:
    with pytest.raises(ValueError) as err:
        find_targets(build("bert"), target_modules)
    msg = str(err.value)
    assert "qurey" in msg  # says what was searched
    assert "bert.encoder.layer.0.attention.self.query" in msg  # lists candidates
    assert "'query'" in msg  # and suffixes one could pass


def test_auto_without_repeated_blocks_raises() -> None:
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))  # Linears *are* the list elements
    with pytest.raises(ValueError, match=r"'auto'.*Linear/Conv2d candidates: 0, 2"):
        find_targets(mlp)
    assert find_targets(mlp, ["0", "2"]) == ["0", "2"]


def test_model_without_linear_raises() -> None:
    with pytest.raises(ValueError, match="no nn.Linear, Conv1D or nn.Conv2d"):
        find_targets(nn.Sequential(nn.ReLU()))


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("bert", [0] * 6 + [1] * 6),
        ("pre59_vit", [0] * 6 + [1] * 6),
        ("hf_vit", [0] * 6 + [1] * 6),
        ("timm_deit", [0] * 4 + [1] * 4),
        ("timm_resnet18", [b for b in range(8) for _ in range(2)]),
    ],
)
def test_block_indices(key: str, expected: list[int]) -> None:
    model = build(key)
    targets = find_targets(model)
    assert block_indices(model, targets) == dict(zip(targets, expected))


def test_block_indices_counts_blocks_without_targets() -> None:
    model = build("bert")
    assert block_indices(model, ["bert.encoder.layer.1.output.dense"]) == {"bert.encoder.layer.1.output.dense": 1}
    # the 1x1 shortcut conv lives in the same block as layer2.0.conv1
    resnet = build("timm_resnet18")
    assert block_indices(resnet, ["layer2.0.downsample.0", "layer2.0.conv1"]) == {
        "layer2.0.downsample.0": 2,
        "layer2.0.conv1": 2,
    }


@pytest.mark.parametrize("name", ["classifier", "does.not.exist"])
def test_block_indices_rejects_names_outside_blocks(name: str) -> None:
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        block_indices(build("bert"), [name])


def test_describe_targets_table() -> None:
    report = describe_targets(build("bert"))
    assert isinstance(report, TargetReport)
    text = str(report)
    for name in report.matched:
        assert name in text
    classifier_row = next(line for line in text.splitlines() if line.startswith("classifier "))
    assert "Linear" in classifier_row and "2x32" in classifier_row  # num_labels=2
    assert "no" in classifier_row.split() and "never-target component 'classifier'" in classifier_row
    query_row = next(line for line in text.splitlines() if line.startswith("bert.encoder.layer.0.attention.self.query"))
    assert "yes" in query_row.split() and "32x32" in query_row
    assert "12 of 14" in text


def test_describe_targets_reports_unmatched_reason() -> None:
    report = describe_targets(build("bert"), ["query"])
    assert report.skipped["bert.encoder.layer.0.attention.self.key"] == "not matched by target_modules"
    assert describe_targets(build("bert"), ["qurey"]).matched == []  # describe does not raise


def test_target_report_str_without_layer_info() -> None:
    text = str(TargetReport(matched=["a.0.fc"], skipped={"head": "never-target component 'head'"}))
    assert "a.0.fc" in text and "never-target component 'head'" in text


def _shared_blocks_model() -> nn.Module:
    """Two blocks; block 1 reuses block 0's ``fc`` module and ties its ``out`` weight to block 0's ``out``."""
    blocks = nn.ModuleList([_Named(fc=nn.Linear(8, 8), out=nn.Linear(8, 8), own=nn.Linear(8, 8)) for _ in range(2)])
    blocks[1].fc = blocks[0].fc
    blocks[1].out.weight = blocks[0].out.weight
    return _Named(blocks=blocks)


def test_auto_skips_layers_with_shared_weights() -> None:
    model = _shared_blocks_model()
    assert find_targets(model) == ["blocks.0.own", "blocks.1.own"]
    skipped = describe_targets(model).skipped
    assert skipped == {
        "blocks.0.fc": "shares its weight with 'blocks.1.fc'",  # one module, listed once under its first name
        "blocks.0.out": "shares its weight with 'blocks.1.out'",
        "blocks.1.out": "shares its weight with 'blocks.0.out'",
    }


@pytest.mark.parametrize(
    ("target_modules", "name", "others"),
    [
        (["fc"], "blocks.0.fc", "'blocks.1.fc'"),
        (["blocks.1.fc"], "blocks.1.fc", "'blocks.0.fc'"),  # the second name of a module registered twice
        (r".*\.out", "blocks.0.out", "'blocks.1.out'"),
    ],
)
def test_explicit_shared_target_raises_like_factorize(target_modules: str | list[str], name: str, others: str) -> None:
    from cuttlefish_hf.surgery import factorize_

    model = _shared_blocks_model()
    with pytest.raises(ValueError, match=rf"'{name}' shares its weight with {others}.*exclude_modules") as err:
        find_targets(model, target_modules)
    with pytest.raises(ValueError) as from_factorize:
        factorize_(model, {name: 2})
    assert str(err.value) == str(from_factorize.value)  # one message, one helper
    assert find_targets(model, ["fc", "out", "own"], exclude_modules=["fc", "out"]) == ["blocks.0.own", "blocks.1.own"]


def test_tied_lm_decoder_is_never_a_target() -> None:
    model = tf.BertForMaskedLM(tf.BertConfig(**TINY_TEXT, tie_word_embeddings=True))
    assert find_targets(model) == _per_block("bert.encoder.layer", 2, BERT_SUFFIXES)
    with pytest.raises(ValueError, match=r"'cls\.predictions\.decoder'.*'bert\.embeddings\.word_embeddings'"):
        find_targets(model, ["decoder", "query"])
    reason = describe_targets(model, ["decoder"]).skipped["cls.predictions.decoder"]
    assert reason == "shares its weight with 'bert.embeddings.word_embeddings'"
    assert find_targets(model, ["decoder", "query"], exclude_modules=["decoder"]) == _per_block(
        "bert.encoder.layer", 2, ["attention.self.query"]
    )


def test_describe_targets_shows_its_table_in_a_repl_and_when_printed():
    report = describe_targets(build("bert"))
    assert repr(report) == str(report) and repr(report).startswith("module ")
    assert f"{len(report.matched)} of {len(report.layers)} Linear/Conv2d layers targeted" in repr(report)


def test_layer_kind_from_names():
    assert layer_kind("bert.encoder.layer.0.attention.self.query") == "attention"
    assert layer_kind("bert.encoder.layer.0.attention.output.dense") == "attention"
    assert layer_kind("bert.encoder.layer.0.intermediate.dense") == "ffn"
    assert layer_kind("bert.encoder.layer.0.output.dense") == "ffn"
    assert layer_kind("model.layers.3.self_attn.o_proj") == "attention"
    assert layer_kind("model.layers.3.mlp.down_proj") == "ffn"
    assert layer_kind("blocks.2.attn.qkv") == "attention" and layer_kind("blocks.2.mlp.fc1") == "ffn"
    assert layer_kind("transformer.h.0.mlp.c_proj") == "ffn" and layer_kind("transformer.h.0.attn.c_proj") == "attention"
    assert layer_kind("features.3.conv") == "other"
