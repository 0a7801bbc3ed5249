"""Tests for cuttlefish_hf.surgery: in-place factorization of a model, its report, and merging back."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_bert
from torch import nn
from transformers import BertForMaskedLM

from cuttlefish_hf.layers import FactorizedConv2d, FactorizedLinear
from cuttlefish_hf.surgery import (
    FactorizationReport,
    count_parameters,
    factorize_,
    factorized_plan,
    merge_,
)


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width, bias=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, x):
        return self.norm(x + self.fc2(torch.relu(self.fc1(x))))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(12, 16)
        self.blocks = nn.ModuleList([Block(16), Block(16)])
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, groups=4),
        )
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))


def _snapshot(model: nn.Module):
    return ({n: type(m) for n, m in model.named_modules()},
            {n: p.detach().clone() for n, p in model.named_parameters()},
            {n: id(p) for n, p in model.named_parameters()})


def _untouched(model: nn.Module, snapshot) -> bool:
    types, values, ids = snapshot
    now_types, now_values, now_ids = _snapshot(model)
    return (now_types == types and now_ids == ids and values.keys() == now_values.keys()
            and all(torch.equal(values[n], now_values[n]) for n in values))


def _linear_params(m: int, n: int, rank: int, bias: bool) -> int:
    return rank * (m + n) + (m if bias else 0)


# --------------------------------------------------------------------------- factorize_
def test_factorize_nested_model_forward_backward_and_counts():
    torch.manual_seed(0)
    model = Net()
    before = count_parameters(model)
    plan = {"blocks.0.fc1": 4, "blocks.1.fc2": 3, "stem": 5}
    report = factorize_(model, plan, stable_ranks={"stem": 2.5})
    assert isinstance(model.blocks[0].fc1, FactorizedLinear) and model.blocks[0].fc1.rank == 4
    assert isinstance(model.blocks[1].fc2, FactorizedLinear) and model.blocks[1].fc2.rank == 3
    assert isinstance(model.stem, FactorizedLinear)
    assert isinstance(model.blocks[0].fc2, nn.Linear) and isinstance(model.head[1], nn.Linear)

    expected = {"blocks.0.fc1": _linear_params(32, 16, 4, True),
                "blocks.1.fc2": _linear_params(16, 32, 3, False),
                "stem": _linear_params(16, 12, 5, True)}
    assert {layer.name: layer.params_after for layer in report.layers} == expected
    assert {layer.name: layer.params_before for layer in report.layers} == \
        {"blocks.0.fc1": 32 * 16 + 32, "blocks.1.fc2": 16 * 32, "stem": 16 * 12 + 16}
    assert {layer.name: layer.shape for layer in report.layers} == \
        {"blocks.0.fc1": (32, 16), "blocks.1.fc2": (16, 32), "stem": (16, 12)}
    assert report.plan == plan
    assert report.target_params_before == 32 * 16 + 32 + 16 * 32 + 16 * 12 + 16
    assert report.target_params_after == sum(expected.values())
    assert report.model_params_before == before
    assert report.model_params_after == count_parameters(model)
    assert before - count_parameters(model) == report.target_params_before - report.target_params_after
    assert [layer.stable_rank for layer in report.layers if layer.name == "stem"] == [2.5]
    assert factorized_plan(model) == plan

    x = torch.randn(7, 12)
    out = model(x)
    assert out.shape == (7, 3)
    out.square().sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name


def test_report_table_and_dict_round_trip():
    model = Net()
    report = factorize_(model, {"blocks.0.fc1": 4, "stem": 5}, stable_ranks={"stem": 2.54, "blocks.0.fc1": 1.0})
    text = str(report)
    lines = text.splitlines()
    assert "layer" in lines[0] and "rank" in lines[0] and "params after" in lines[0]
    assert set(lines[1]) == {"-"}
    row = next(line for line in lines if line.startswith("stem"))
    assert "16x12" in row and "2.5" in row and " 5 " in row and "208" in row and row.split()[-1] == f"{5 * (16 + 12) + 16:,}"
    assert any(line.startswith("blocks.0.fc1") and "32x16" in line for line in lines)
    assert lines[-1].startswith("factorized layers: ")
    assert f"{report.target_params_before:,} -> {report.target_params_after:,}" in lines[-1]
    assert f"{report.model_params_before:,} -> {report.model_params_after:,}" in lines[-1]
    ratio = report.model_params_before / report.model_params_after
    assert f"({ratio:.2f}x smaller)" in lines[-1]
    again = FactorizationReport.from_dict(report.to_dict())
    assert again == report
    assert report.to_dict()["target_params_after"] == report.target_params_after


def test_factorize_conv_model_counts_and_extra_bn():
    torch.manual_seed(0)
    model = ConvNet()
    report = factorize_(model, {"features.0": 5, "features.2": 4}, extra_bn=True)
    first, second = model.features[0], model.features[2]
    assert isinstance(first, FactorizedConv2d) and isinstance(second, FactorizedConv2d)
    assert isinstance(first.middle, nn.BatchNorm2d)
    # rank * (in*k*k + out) + bias + 2*rank (BN weight and bias)
    assert report.layers[0].params_after == 5 * (27 + 8) + 8 + 2 * 5
    assert report.layers[1].params_after == 4 * (72 + 16) + 0 + 2 * 4
    assert report.layers[1].shape == (16, 8, 3, 3)
    out = model(torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 4)
    out.sum().backward()
    with pytest.raises(ValueError, match="BatchNorm"):
        merge_(model)
    assert factorized_plan(model) == {"features.0": 5, "features.2": 4}  # nothing merged on failure


def test_merge_checks_every_layer_before_merging_any():
    model = ConvNet()
    factorize_(model, {"features.0": 5})  # mergeable, and first in module order
    factorize_(model, {"features.2": 4}, extra_bn=True)
    with pytest.raises(ValueError, match="features.2"):
        merge_(model)
    assert factorized_plan(model) == {"features.0": 5, "features.2": 4}


def test_merge_restores_outputs():
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(5, 12)
    dense_out = model(x).detach()
    names = ["stem", "blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2", "head.1"]
    full = {"stem": 12, "blocks.0.fc1": 16, "blocks.0.fc2": 16, "blocks.1.fc1": 16, "blocks.1.fc2": 16, "head.1": 3}
    factorize_(model, {name: full[name] for name in names})
    assert torch.allclose(model(x), dense_out, atol=1e-5)
    assert merge_(model) == 6
    assert factorized_plan(model) == {}
    assert all(type(model.get_submodule(name)) is nn.Linear for name in names)
    assert torch.allclose(model(x), dense_out, atol=1e-5)
    assert count_parameters(model) == count_parameters(Net())


def test_merge_at_low_rank_keeps_the_factorized_function():
    torch.manual_seed(0)
    model = ConvNet()
    factorize_(model, {"features.0": 2, "features.2": 3, "fc": 2})
    x = torch.randn(2, 3, 8, 8)
    low_out = model(x).detach()
    bias = model.features[0].second.bias
    assert merge_(model) == 3
    assert isinstance(model.features[2], nn.Conv2d) and model.features[2].stride == (2, 2)
    assert model.features[0].bias is bias
    assert torch.allclose(model(x), low_out, atol=1e-5)


def test_init_empty_builds_shapes_only():
    torch.manual_seed(0)
    model = Net()
    reference = copy.deepcopy(model)
    plan = {"blocks.0.fc1": 4, "stem": 5}
    report = factorize_(model, plan, init="empty")
    factorize_(reference, plan)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    assert shapes == {n: p.shape for n, p in reference.named_parameters()}
    assert factorized_plan(model) == plan
    assert [layer.params_after for layer in report.layers] == [_linear_params(32, 16, 4, True),
                                                               _linear_params(16, 12, 5, True)]
    # The weights are not the SVD factors: loading the reference's state dict makes them so.
    assert not torch.allclose(model.stem.first.weight, reference.stem.first.weight)
    model.load_state_dict(reference.state_dict())
    x = torch.randn(3, 12)
    assert torch.allclose(model(x), reference(x))
    conv = ConvNet()
    factorize_(conv, {"features.2": 3}, init="empty", extra_bn=True)
    assert isinstance(conv.features[2], FactorizedConv2d) and conv.features[2].second.bias is None
    assert conv.features[2].first.stride == (2, 2) and isinstance(conv.features[2].middle, nn.BatchNorm2d)


def test_bad_init_raises():
    with pytest.raises(ValueError, match="init"):
        factorize_(Net(), {"stem": 2}, init="random")


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"blocks.9.fc1": 2}, "does not have"),
        ({"blocks.0.norm": 2}, "LayerNorm"),
        ({"blocks.0": 2}, "Block"),
        ({"stem": 0}, "Rank 0"),
        ({"stem": 13}, "Rank 13"),  # stem is 16 x 12: full rank 12
        ({"stem": -1}, "Rank -1"),
        ({"stem": 2.0}, "Rank 2.0"),
        ({"stem": True}, "Rank True"),
    ],
)
def test_invalid_plan_raises_before_any_change(bad, match):
    model = Net()
    snapshot = _snapshot(model)
    plan = {"blocks.0.fc1": 4, "blocks.1.fc1": 4, **bad}  # valid entries first: they must not be applied
    with pytest.raises(ValueError, match=match):
        factorize_(model, plan)
    assert _untouched(model, snapshot)


def test_grouped_conv_in_plan_raises_before_any_change():
    model = ConvNet()
    snapshot = _snapshot(model)
    for init in ("svd", "empty"):
        with pytest.raises(ValueError, match="grouped"):
            factorize_(model, {"features.0": 2, "features.4": 2}, init=init)
        assert _untouched(model, snapshot)


def test_layers_inside_factorized_layers_are_rejected():
    model = Net()
    factorize_(model, {"stem": 4})
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match="already factorized"):
        factorize_(model, {"blocks.0.fc1": 2, "stem.first": 2})
    with pytest.raises(ValueError, match="FactorizedLinear"):
        factorize_(model, {"stem": 2})
    assert _untouched(model, snapshot)


def test_count_parameters_counts_shared_once():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    assert count_parameters(model) == 20
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    assert count_parameters(tied) == 16 + 4 + 4


def test_frozen_layer_stays_frozen():
    model = Net()
    model.stem.weight.requires_grad_(False)
    factorize_(model, {"stem": 3})
    assert not model.stem.first.weight.requires_grad and not model.stem.second.weight.requires_grad
    merge_(model)
    assert not model.stem.weight.requires_grad


# --------------------------------------------------------------------------- tiny BERT
def test_tiny_bert_full_rank_is_exact():
    model = tiny_bert(vocab_size=100, max_position_embeddings=512).eval()
    input_ids = torch.randint(1, 100, (2, 7))
    mask = torch.ones_like(input_ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=mask).logits
    before = count_parameters(model)
    plan = {name: min(m.weight.shape) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.startswith("bert.encoder.")}
    assert len(plan) == 12  # 2 layers x (query, key, value, attention out, intermediate, output)
    report = factorize_(model, plan)
    with torch.no_grad():
        got = model(input_ids=input_ids, attention_mask=mask).logits
    assert torch.allclose(got, expected, atol=1e-4)
    # Per layer: 4 square 32x32 (rank 32), 32->64 and 64->32 (rank 32): rank*(m+n) + bias.
    per_layer = 4 * (32 * 64 + 32) + (32 * 96 + 64) + (32 * 96 + 32)
    assert report.target_params_after == 2 * per_layer
    assert report.target_params_before == 2 * (4 * (32 * 32 + 32) + (64 * 32 + 64) + (32 * 64 + 32))
    assert count_parameters(model) == before - report.target_params_before + report.target_params_after
    assert report.model_params_after == count_parameters(model)
    assert factorized_plan(model) == plan


# --------------------------------------------------------------------------- shared / tied weights
def test_tied_decoder_in_plan_raises_before_any_change():
    model = tiny_bert(model_class=BertForMaskedLM).eval()  # tied: BERT's default
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    snapshot, params = _snapshot(model), count_parameters(model)
    plan = {"bert.encoder.layer.0.attention.self.query": 4, "cls.predictions.decoder": 4}  # valid entry first
    with pytest.raises(ValueError) as err:
        factorize_(model, plan)
    msg = str(err.value)
    assert "'cls.predictions.decoder'" in msg and "'bert.embeddings.word_embeddings'" in msg
    assert "exclude_modules=['cls.predictions.decoder']" in msg  # the embedding is no target: not suggested
    assert _untouched(model, snapshot) and count_parameters(model) == params
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight


def test_shared_linear_in_plan_raises_before_any_change():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(nn.Linear(4, 4), shared, nn.ReLU(), shared)  # one module under the names '1' and '3'
    snapshot = _snapshot(model)
    for name, other in (("1", "'3'"), ("3", "'1'")):  # the second name used to be reported as unknown
        with pytest.raises(ValueError, match=rf"'{name}' shares its weight with {other}.*exclude_modules"):
            factorize_(model, {"0": 2, name: 2})
        assert _untouched(model, snapshot) and count_parameters(model) == 2 * 20  # the shared one counted once
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))  # two modules, one weight Parameter
    tied[1].weight = tied[0].weight
    snapshot = _snapshot(tied)
    with pytest.raises(ValueError, match=r"'0' shares its weight with '1'.*exclude_modules=\['0', '1'\]"):
        factorize_(tied, {"0": 2})
    assert _untouched(tied, snapshot) and count_parameters(tied) == 16 + 4 + 4


def test_untied_decoder_still_factorizes():
    model = tiny_bert(model_class=BertForMaskedLM, tie_word_embeddings=False).eval()
    before = count_parameters(model)
    report = factorize_(model, {"cls.predictions.decoder": 4})
    assert isinstance(model.cls.predictions.decoder, FactorizedLinear)
    assert report.layers[0].params_after == 4 * (64 + 32) + 64
    assert count_parameters(model) == before - (64 * 32 + 64) + 4 * (64 + 32) + 64


def test_tied_masked_lm_auto_targets_save_and_reload(tmp_path):
    transformers = pytest.importorskip("transformers")
    from cuttlefish_hf import hub
    from cuttlefish_hf.targeting import find_targets

    model = tiny_bert(model_class=BertForMaskedLM).eval()
    targets = find_targets(model)
    assert len(targets) == 12 and all(name.startswith("bert.encoder.layer.") for name in targets)
    factorize_(model, {name: 4 for name in targets})
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    input_ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    hub.save_pretrained(model, tmp_path)
    again = hub.from_pretrained(transformers.AutoModelForMaskedLM, tmp_path).eval()
    assert factorized_plan(again) == {name: 4 for name in targets}
    decoder, embedding = again.cls.predictions.decoder.weight, again.bert.embeddings.word_embeddings.weight
    assert decoder.data_ptr() == embedding.data_ptr()  # still tied after the reload
    assert torch.equal(embedding, model.bert.embeddings.word_embeddings.weight)
    with torch.no_grad():
        got = again(input_ids=input_ids).logits
    assert (got - expected).abs().max().item() < 1e-6


# --------------------------------------------------------------------------- non-finite and extreme weights
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_raise_naming_the_layers_before_any_change(bad):
    # NaN used to fail inside torch.linalg.svd naming no layer; inf silently gave NaN factors.
    model = ConvNet()
    with torch.no_grad():
        model.features[2].weight[0, 0, 1, 1] = bad
        model.fc.weight[3, 5] = -bad
    types, _, ids = _snapshot(model)  # (values are not compared: NaN != NaN)
    with pytest.raises(ValueError) as info:
        factorize_(model, {"features.0": 2, "features.2": 4, "fc": 2})
    message = str(info.value)
    assert message.startswith("The weights of 'features.2', 'fc' are NaN/inf before factorizing")
    assert "'features.0'" not in message and "learning rate" in message
    assert _snapshot(model)[0] == types and _snapshot(model)[2] == ids  # nothing replaced, not even features.0
    # init="empty" reads no weight, so NaN ones do not stop it (the factors are loaded afterwards)
    factorize_(model, {"features.2": 4, "fc": 2}, init="empty")
    assert factorized_plan(model) == {"features.2": 4, "fc": 2}


@pytest.mark.parametrize("largest", [1e38, 1e-37])
def test_extreme_weights_factorize_to_finite_exact_factors(largest):
    # The fp32 SVD of a finite matrix of 1e38 entries overflows (NaN factors) unless it is normalized first.
    torch.manual_seed(0)
    model = ConvNet()
    with torch.no_grad():
        for name in ("features.2", "fc"):
            weight = model.get_submodule(name).weight
            weight.div_(weight.abs().max()).mul_(largest)
    dense = {name: model.get_submodule(name).weight.detach().clone() for name in ("features.2", "fc")}
    factorize_(model, {"features.2": 16, "fc": 4})  # full ranks: the factors must reproduce the weights
    for name, weight in dense.items():
        layer = model.get_submodule(name)
        assert all(torch.isfinite(p).all() for p in layer.parameters())
        root = largest ** 0.5  # the product itself may not fit fp32: compare the factors scaled down
        first = layer.first.weight.reshape(layer.rank, -1) / root
        second = layer.second.weight.reshape(-1, layer.rank) / root
        assert torch.allclose((second @ first).reshape_as(weight), weight / largest, rtol=1e-4, atol=1e-5)
