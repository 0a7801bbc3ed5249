"""Tests for the ``cuttlefish-hf`` command line: every subcommand on tiny local models, errors, ``--help``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import timm
import torch
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

from cuttlefish_hf import factorize_
from cuttlefish_hf.cli.main import SUBCOMMANDS, main
from cuttlefish_hf.hub import save_pretrained, save_timm

TIMM_KWARGS = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)
BERT_PLAN = {"bert.encoder.layer.1.attention.self.query": 4, "bert.encoder.layer.1.intermediate.dense": 8}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Folders of a tiny BERT and a tiny timm ViT, each dense and factorized."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                    intermediate_size=64, vocab_size=100))
    bert.save_pretrained(root / "bert")
    (root / "bert" / "vocab.txt").write_text("[PAD]\n")  # a tokenizer file merge should carry along
    factorize_(bert, BERT_PLAN)
    save_pretrained(bert, root / "bert_factorized")
    (root / "bert_factorized" / "vocab.txt").write_text("[PAD]\n")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TIMM_KWARGS)
    save_timm(vit, root / "vit")
    factorize_(vit, {"blocks.1.mlp.fc1": 4})
    save_timm(vit, root / "vit_factorized")
    return {"root": root, "bert": bert.eval(), "vit": vit.eval()}


def cli(*argv: str, capsys) -> tuple[int, str, str]:
    """Run ``cuttlefish-hf argv`` in this process: (exit code, stdout, stderr)."""
    try:
        code = main([str(arg) for arg in argv])
    except SystemExit as exit_:  # argparse: --help and usage errors
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", [*SUBCOMMANDS, None])
def test_help(name, capsys):
    code, out, _ = cli(*([name] if name else []), "--help", capsys=capsys)
    assert code == 0 and "usage: cuttlefish-hf" in out
    if name is None:
        assert all(sub in out for sub in SUBCOMMANDS)


def test_inspect_transformers_folder_and_plot(models, capsys, tmp_path):
    code, out, err = cli("inspect", models["root"] / "bert", "--plot", tmp_path / "ranks.png", capsys=capsys)
    assert code == 0, err
    assert "bert.encoder.layer.1.output.dense" in out and "32x64" in out
    assert all(rule in out for rule in ("scaled_stable_rank", "stable_rank", "energy", "fixed_ratio"))
    assert "12 layers" in out and "FLOPs per token saved" in out
    assert (tmp_path / "ranks.png").read_bytes()[:4] == b"\x89PNG"


def test_inspect_factorized_folder_shows_current_ranks(models, capsys):
    code, out, err = cli("inspect", models["root"] / "bert_factorized", "--rule", "energy", capsys=capsys)
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.startswith("bert.encoder.layer.1.intermediate.dense"))
    assert row.split()[4] == "8"  # the "now" column
    assert "params at energy" in out


def test_inspect_timm_by_name_and_folder(models, capsys):
    code, out, err = cli("inspect", "timm:vit_tiny_patch16_224", "--model-kwargs", json.dumps(TIMM_KWARGS),
                         capsys=capsys)
    assert code == 0, err
    assert "blocks.1.mlp.fc2" in out and "8 layers" in out
    code, out, err = cli("inspect", models["root"] / "vit_factorized", capsys=capsys)
    assert code == 0, err
    assert next(line for line in out.splitlines() if line.startswith("blocks.1.mlp.fc1")).split()[4] == "4"


def test_profile_text_and_vision(models, capsys):
    fast = ("--repeats", "1", "--warmup", "0", "--device", "cpu")
    code, out, err = cli("profile", models["root"] / "bert", "--batch-size", "2", "--seq-len", "8", *fast,
                         capsys=capsys)
    assert code == 0, err
    assert "dense ms" in out and "profiling took" in out and "would keep dense:" in out
    assert "16x32" in out  # 2 sequences x 8 tokens per batch into a 32-wide layer
    code, out, err = cli("profile", models["root"] / "vit", "--batch-size", "2", "--image-size", "32",
                         "--rule", "stable_rank", *fast, capsys=capsys)
    assert code == 0, err
    assert "34x32" in out  # 2 images x (16 patches + class token)
    assert "leading blocks kept entirely dense:" in out


@pytest.mark.parametrize("kind", ["bert", "vit"])
def test_merge_gives_the_same_outputs(models, kind, capsys, tmp_path):
    code, out, err = cli("merge", models["root"] / f"{kind}_factorized", tmp_path / "dense", capsys=capsys)
    assert code == 0, err
    assert "merged 2 factorized layers" in out if kind == "bert" else "merged 1 factorized layer:" in out
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    torch.manual_seed(0)
    if kind == "bert":
        assert "quantization_config" not in config and "auto_map" not in config
        assert (tmp_path / "dense" / "vocab.txt").is_file()
        dense = AutoModelForSequenceClassification.from_pretrained(tmp_path / "dense").eval()
        ids = torch.randint(0, 100, (2, 7))
        expected, actual = models["bert"](input_ids=ids).logits, dense(input_ids=ids).logits
    else:
        dense = timm.create_model(f"local-dir:{tmp_path / 'dense'}", pretrained=True).eval()
        images = torch.randn(2, 3, 32, 32)
        expected, actual = models["vit"](images), dense(images)
    assert not any(type(m).__name__.startswith("Factorized") for m in dense.modules())
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("argv, code, message", [
    (["inspect", "{root}/missing"], 1, "no such folder"),
    (["inspect", "{root}"], 1, "has no config.json"),
    (["inspect", "owner/not-a-cached-model"], 1, "could not be fetched from the Hub"),
    (["inspect", "timm:no_such_model"], 1, "timm has no model 'no_such_model'"),
    (["inspect", "timm:vit_tiny_patch16_224", "--model-kwargs", '{"bogus": 1}'], 1, "do not fit timm model"),
    (["inspect", "timm:vit_tiny_patch16_224", "--model-kwargs", "{depth: 2}"], 2, "not valid JSON"),
    (["inspect", "{root}/bert", "--model-kwargs", '{"depth": 2}'], 1, "only applies to timm:NAME"),
    (["inspect", "{root}/bert", "--energy", "1.5"], 1, "--energy"),
    (["profile", "{root}/bert", "--batch-size", "0", "--seq-len", "8"], 2, "integer >= 1"),
    (["profile", "{root}/bert", "--batch-size", "2"], 2, "--seq-len --image-size is required"),
    (["profile", "{root}/bert", "--batch-size", "2", "--image-size", "32"], 1, "pass --seq-len for text"),
    (["profile", "{root}/vit", "--batch-size", "2", "--seq-len", "8"], 1, "pass --image-size"),
    (["profile", "{root}/bert", "--batch-size", "2", "--seq-len", "9999"], 1, "check --seq-len"),
    (["profile", "{root}/bert", "--batch-size", "2", "--seq-len", "8", "--margin", "1"], 1, "--margin"),
    (["profile", "{root}/bert", "--batch-size", "2", "--seq-len", "8", "--device", "gpu0"], 1, "is not a device"),
    (["merge", "{root}/bert", "{root}/out"], 1, "no factorized layers; nothing to merge"),
    (["merge", "{root}/bert_factorized", "{root}/bert"], 1, "pass --overwrite"),
    (["merge", "{root}/bert_factorized", "{root}/bert_factorized", "--overwrite"], 1, "DST must differ from SRC"),
    (["merge", "{root}/bert_factorized"], 2, "required: DST"),
    (["shrink", "{root}/bert"], 2, "invalid choice"),
])
def test_bad_input_exits_non_zero_with_a_message(models, argv, code, message, capsys):
    got, out, err = cli(*(arg.replace("{root}", str(models["root"])) for arg in argv), capsys=capsys)
    assert got == code
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]  # above it: argparse's usage, or transformers' loading progress
    assert last.startswith(f"cuttlefish-hf {argv[0]}: error:" if code == 1 else "cuttlefish-hf") and message in last


def test_console_script_reports_errors_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cuttlefish_hf.cli.main", "inspect", str(tmp_path / "none")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("cuttlefish-hf inspect: error:") and "Traceback" not in result.stderr


def test_demo_short_run_writes_results(tmp_path, capsys):
    """The main job on a tiny budget: both runs train, Cuttlefish switches, results.json and the plot appear."""
    assert main(["demo", "--epochs", "6", "--width", "32", "--depth", "2", "--lr", "5e-3",
                 "--output-dir", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    vanilla, cuttlefish = results["runs"]
    assert vanilla["mode"] == "vanilla" and cuttlefish["mode"] == "cuttlefish"
    assert vanilla["accuracy"] > 25 and cuttlefish["accuracy"] > 25  # chance is 10%
    summary = cuttlefish["cuttlefish"]
    assert summary["switch_epoch"] == 3 and summary["rank_rule"] == "scaled_stable_rank"  # the 50% bound
    assert cuttlefish["params"] < vanilla["params"] == cuttlefish["params_before"]
    assert summary["low_rank_step_seconds"] > 0 and results["machine"]["cpu_cores"] >= 1
    assert (tmp_path / "stable_ranks.png").stat().st_size > 0
    assert "Cuttlefish per-layer ranks" in capsys.readouterr().out
