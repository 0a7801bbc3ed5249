"""transformers' ``Conv1D`` (GPT-2's Linear with an ``(in, out)`` weight) is supported wherever ``nn.Linear`` is."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_gpt2
from transformers import AutoModelForCausalLM, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from cuttlefish_hf import Cuttlefish, CuttlefishConfig, factorize_, factorized_plan, find_targets, merge_, stable_rank
from cuttlefish_hf.layers import FactorizedLinear, dense_matrix, dense_shape
from cuttlefish_hf.surgery import count_parameters

BLOCK = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def tokens() -> torch.Tensor:
    return torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens()).logits


def conv1d(seed: int = 0) -> Conv1D:
    torch.manual_seed(seed)
    return Conv1D(12, 20)  # 12 outputs, 20 inputs: weight (20, 12)


def test_conv1d_shape_matrix_and_stable_rank_read_the_layer_as_out_x_in():
    layer = conv1d()
    linear = torch.nn.Linear(20, 12)
    linear.weight.data = layer.weight.data.T.clone()
    assert dense_shape(layer) == (12, 20) and dense_matrix(layer).shape == (12, 20)
    assert torch.equal(dense_matrix(layer), linear.weight)
    assert stable_rank(dense_matrix(layer)) == pytest.approx(stable_rank(linear.weight), rel=1e-6)


@pytest.mark.parametrize("rank,atol", [(12, 1e-5), (4, None)])
def test_conv1d_factorizes_like_the_linear_it_is_and_merges_back_to_a_conv1d(rank, atol):
    layer = conv1d()
    model = torch.nn.Sequential(layer)
    x = torch.randn(3, 5, 20)
    with torch.no_grad():
        dense_out = layer(x)
    report = factorize_(model, {"0": rank})
    factorized = model[0]
    assert isinstance(factorized, FactorizedLinear) and factorized.rank == rank
    assert factorized.second.bias is layer.bias  # the bias Parameter (and its optimizer state) is kept
    assert report.layers[0].shape == (12, 20) and report.layers[0].params_after == rank * 32 + 12
    with torch.no_grad():
        low_rank_out = factorized(x)
        if atol is not None:
            torch.testing.assert_close(low_rank_out, dense_out, atol=atol, rtol=0)
        else:  # Eckart-Young: the rank-4 error is the tail of the singular values
            values = torch.linalg.svdvals(layer.weight.T)
            error = torch.linalg.matrix_norm(factorized.merged_weight() - layer.weight.T)
            assert error.item() == pytest.approx(values[rank:].norm().item(), rel=1e-4)
    assert merge_(model) == 1
    merged = model[0]
    assert isinstance(merged, Conv1D) and merged.weight.shape == (20, 12) and merged.bias is layer.bias
    with torch.no_grad():
        torch.testing.assert_close(merged(x), low_rank_out, atol=1e-5, rtol=0)


def test_gpt2_auto_targets_its_block_conv1ds_and_never_the_tied_head():
    model = tiny_gpt2()
    targets = find_targets(model)
    assert targets == [f"transformer.h.{i}.{suffix}" for i in range(2) for suffix in BLOCK]
    assert find_targets(model, ["c_attn"]) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]


def test_gpt2_factorized_saves_and_reloads_with_identical_logits(tmp_path):
    import cuttlefish_hf  # noqa: F401  (the loader of factorized checkpoints)

    model = tiny_gpt2().eval()
    before = count_parameters(model)
    plan = {name: 8 for name in find_targets(model)}
    factorize_(model, plan)
    assert count_parameters(model) < before
    model.save_pretrained(tmp_path / "gpt2")
    assert json.loads((tmp_path / "gpt2" / "config.json").read_text())["quantization_config"]["plan"] == plan
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2").eval()
    assert factorized_plan(loaded) == plan
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # still tied
    torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)
    merge_(loaded)
    loaded.save_pretrained(tmp_path / "dense")
    dense = GPT2LMHeadModel.from_pretrained(tmp_path / "dense").eval()  # a plain GPT-2 checkpoint again
    assert isinstance(dense.transformer.h[0].attn.c_attn, Conv1D)
    torch.testing.assert_close(logits(dense), logits(model), atol=1e-5, rtol=0)


@pytest.mark.parametrize("rank_rule", ["stable_rank", "kind_fractions"])
def test_controller_switches_a_gpt2_with_the_matrices_the_layers_apply(rank_rule):
    model = tiny_gpt2()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    config = CuttlefishConfig(rank_rule=rank_rule, measure_every_steps=1, min_warmup_measurements=2, window=1,
                              eps_relative=1.0)
    controller = Cuttlefish(model, config, total_steps=10)
    controller.begin(optimizer)
    for step in range(1, 4):
        loss = model(tokens(), labels=tokens()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if controller.step_end(step, optimizer):
            break
    assert controller.switched and set(controller.report.plan) == set(find_targets(tiny_gpt2()))
    assert all(layer.shape == (96, 32) for layer in controller.report.layers if layer.name.endswith("c_attn"))
    loss = model(tokens(), labels=tokens()).loss
    loss.backward()
    optimizer.step()  # the factors are in the optimizer and train
    assert torch.isfinite(loss)


def test_gpt2_folder_loads_with_trust_remote_code_without_cuttlefish_hf(tmp_path):
    from test_hub import run_python

    from cuttlefish_hf import hub

    model = tiny_gpt2().eval()
    factorize_(model, {name: 8 for name in find_targets(model)})
    hub.save_pretrained(model, tmp_path / "gpt2")
    torch.save({"x": tokens(), "logits": logits(model)}, tmp_path / "expected.pt")
    out = run_python(f"""
        import sys
        sys.modules["cuttlefish_hf"] = None  # a machine without cuttlefish_hf
        import torch
        from transformers import AutoModelForCausalLM

        expected = torch.load("expected.pt")
        remote = AutoModelForCausalLM.from_pretrained({str(tmp_path / "gpt2")!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            print(type(remote).__name__, torch.equal(remote(expected["x"]).logits, expected["logits"]))
    """, tmp_path)
    assert out.splitlines() == ["CuttlefishGPT2LMHeadModel True"]
