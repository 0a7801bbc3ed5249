"""Tests for cuttlefish_hf.plotting: what the stable-rank figure shows at 16 and 144 layers, with one and no
measurements (read back from the Figure's axes, not from pixels)."""

from __future__ import annotations

import math

import pytest

from cuttlefish_hf.plotting import plot_kind, plot_stable_ranks, short_names, stable_rank_figure

BERT_PARTS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
              "intermediate.dense", "output.dense")
VIT_PARTS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def vit_names(blocks: int) -> list[str]:  # 4 per block: 4 blocks = 16 layers
    return [f"blocks.{b}.{part}" for b in range(blocks) for part in VIT_PARTS]


def bert_names(blocks: int) -> list[str]:  # 6 per block: 24 blocks = 144 layers (BERT-large)
    return [f"bert.encoder.layer.{b}.{part}" for b in range(blocks) for part in BERT_PARTS]


def synthetic(names: list[str], measurements: int, full: int = 64) -> tuple[dict, list[int], dict]:
    """Stable ranks that fall from ~0.8 to ~0.3 of full, one decay per layer; measured every 50 steps."""
    history = {name: [full * (0.3 + 0.5 * math.exp(-(i + 1) * (1 + j % 5) / 8)) for i in range(measurements)]
               for j, name in enumerate(names)}
    return history, [50 * (i + 1) for i in range(measurements)], {name: full for name in names}


def axes(figure, label: str):
    return next(axis for axis in figure.axes if axis.get_label() == label)


def switch_lines(axis) -> list[float]:
    return [line.get_xdata()[0] for line in axis.get_lines() if line.get_linestyle() == "--"]


def test_short_names_drop_the_shared_prefix():
    assert short_names(["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.11.output.dense"]) == {
        "bert.encoder.layer.0.attention.self.query": "0.attention.self.query",
        "bert.encoder.layer.11.output.dense": "11.output.dense"}
    assert short_names(["layer1.0.conv1", "layer2.0.conv1"]) == {"layer1.0.conv1": "layer1.0.conv1",
                                                                  "layer2.0.conv1": "layer2.0.conv1"}
    assert short_names(["a.b.c.fc"]) == {"a.b.c.fc": "a.b.c.fc"}  # nothing to tell apart: the whole name
    assert short_names(["blocks.0.mlp", "blocks.0.mlp.fc1"])["blocks.0.mlp"] == "mlp"


@pytest.mark.parametrize("name, kind", [
    ("bert.encoder.layer.0.attention.output.dense", "attention"), ("blocks.3.attn.qkv", "attention"),
    ("bert.encoder.layer.0.intermediate.dense", "FFN"), ("blocks.3.mlp.fc2", "FFN"),
    ("layer1.0.conv2", "conv"), ("features.3", "other"),
])
def test_plot_kind(name, kind):
    assert plot_kind(name) == kind


@pytest.mark.parametrize("names", [vit_names(4), bert_names(24)], ids=["16-layers", "144-layers"])
def test_heatmap_names_every_layer_and_marks_the_switch(names):
    history, steps, full = synthetic(names, 12)
    figure = stable_rank_figure(history, steps, switch_step=600, full_ranks=full)
    heat = axes(figure, "heatmap")
    assert [t.get_text() for t in heat.get_yticklabels()] == list(short_names(names).values())
    assert not any(t.get_text().startswith(("bert.", "blocks.")) for t in heat.get_yticklabels())
    assert heat.get_yticklabels()[0].get_text() == short_names(names)[names[0]]  # first layer on top
    assert heat.get_ylim()[0] > heat.get_ylim()[1]
    assert switch_lines(heat) == [600] and switch_lines(axes(figure, "curves")) == [600]
    assert heat.get_xlabel() == "optimizer step"
    colorbars = [axis for axis in figure.axes if axis.get_label() == "<colorbar>"]
    assert len(colorbars) == 1 and "stable rank / full rank" in (colorbars[0].get_xlabel() + colorbars[0].get_ylabel())
    mesh = heat.collections[0].get_array()
    assert mesh.shape == (len(names), 12) and mesh[0, -1] == pytest.approx(history[names[0]][-1] / 64)


def test_heatmap_scales_with_the_number_of_layers():
    small = stable_rank_figure(*synthetic(vit_names(3), 4)[:2])  # 12 layers
    large = stable_rank_figure(*synthetic(bert_names(25), 4)[:2])  # 150 layers
    small_font = axes(small, "heatmap").get_yticklabels()[0].get_fontsize()
    large_font = axes(large, "heatmap").get_yticklabels()[0].get_fontsize()
    assert 6 <= large_font < small_font <= 9
    assert large.get_figheight() > 3 * small.get_figheight()
    # a row stays taller than its label
    rows_inches = axes(large, "heatmap").get_position().height * large.get_figheight() / 150
    assert rows_inches * 72 > large_font


def test_curves_one_colour_per_kind_with_a_bold_mean():
    names = vit_names(4)
    history, steps, full = synthetic(names, 6)
    curves = axes(stable_rank_figure(history, steps, switch_step=300, full_ranks=full), "curves")
    legend = [text.get_text() for text in curves.get_legend().get_texts()]
    assert legend == ["attention: mean of 8 layers", "FFN: mean of 8 layers", "switch (step 300)"]
    lines = [line for line in curves.get_lines() if line.get_linestyle() != "--"]
    assert len(lines) == 16 + 2  # every layer, and one mean per kind
    bold = [line for line in lines if line.get_linewidth() > 2]
    assert len(bold) == 2 and len({line.get_color() for line in bold}) == 2
    assert {line.get_color() for line in lines} == {line.get_color() for line in bold}  # layers in their kind's colour
    attention = [history[n][0] / 64 for n in names if "attn" in n]
    assert bold[0].get_ydata()[0] == pytest.approx(sum(attention) / len(attention))
    assert curves.get_ylabel() == "stable rank / full rank"


def test_one_measurement_draws_a_bar_per_layer():
    """A GLUE run measured once: bars, not invisible one-point lines."""
    names = bert_names(2)
    history, steps, full = synthetic(names, 1)
    figure = stable_rank_figure(history, steps, switch_step=50, full_ranks=full)
    bars = axes(figure, "bars")
    assert [patch.get_width() for patch in bars.patches] == pytest.approx([history[n][0] / 64 for n in names])
    assert [t.get_text() for t in bars.get_yticklabels()] == list(short_names(names).values())
    assert [t.get_text() for t in bars.get_legend().get_texts()] == ["attention (8)", "FFN (4)"]
    assert "step 50" in bars.get_title() and "switch at step 50" in bars.get_title()


def test_no_measurement_says_so(tmp_path):
    history = {name: [] for name in vit_names(1)}
    figure = stable_rank_figure(history, [], switch_step=0)
    texts = [text.get_text() for text in axes(figure, "empty").texts]
    assert texts == ["No stable-rank measurements: switch at step 0, before the first one"]
    path = plot_stable_ranks(history, [], tmp_path / "none.png", switch_step=0)
    assert path == str(tmp_path / "none.png") and (tmp_path / "none.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_stable_ranks_writes_a_png(tmp_path):
    history, steps, full = synthetic(vit_names(2), 3)
    path = plot_stable_ranks(history, steps, tmp_path / "stable_ranks.png", 150, full, title="tiny ViT")
    assert path == str(tmp_path / "stable_ranks.png") and (tmp_path / "stable_ranks.png").read_bytes()[:4] == b"\x89PNG"
