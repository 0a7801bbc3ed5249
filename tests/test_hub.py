"""Tests for cuttlefish_hf.hub: save -> reload, model cards, Hub uploads (offline), bad loads, merging."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
import transformers as tf
from safetensors import safe_open

from cuttlefish_hf import __version__, factorize_, factorized_plan, find_targets, merge_
from cuttlefish_hf import hub
from cuttlefish_hf.hub import upload as hub_upload
from cuttlefish_hf.hub import (
    CuttlefishCheckpointConfig,
    CuttlefishHfQuantizer,
    load_timm,
    record_plan_,
    save_pretrained,
    save_timm,
)
from cuttlefish_hf.surgery import FactorizationReport
import helpers

RANK = 4
REPO_ROOT = Path(__file__).resolve().parents[1]


# -- tiny models ----------------------------------------------------------------------------------------------
def tiny_bert() -> tf.BertForSequenceClassification:
    return helpers.tiny_bert().eval()


def tiny_hf_deit() -> tf.DeiTForImageClassification:
    return helpers.tiny_hf_deit(seed=None).eval()


def tiny_timm_deit() -> torch.nn.Module:
    return helpers.tiny_timm_deit(seed=None).eval()


def factorized(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    factorize_(model, {name: RANK for name in find_targets(model)})
    return model


def text_input() -> torch.Tensor:
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))


def image_input() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def run_python(code: str, tmp_path: Path) -> str:
    """Run ``code`` in a fresh interpreter (offline, with its own module cache); return its stdout."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


@pytest.fixture(scope="module")
def saved_bert(tmp_path_factory):
    model = factorized(tiny_bert())
    folder = tmp_path_factory.mktemp("saved") / "bert"
    save_pretrained(model, folder, training_notes={"task": "toy"}, repo_id="me/bert-cuttlefish")
    return model, folder


@pytest.fixture
def bert_folder(saved_bert, tmp_path):
    """A factorized tiny BERT and a folder saved from it, both fresh copies each test may change."""
    model, folder = saved_bert
    shutil.copytree(folder, tmp_path / "bert")
    return copy.deepcopy(model), tmp_path / "bert"


def edit_config(folder: Path, edit) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


# -- the saved folder -----------------------------------------------------------------------------------------
def test_saved_folder_holds_factors_record_card_and_custom_code(bert_folder):
    model, folder = bert_folder
    plan = factorized_plan(model)
    assert sorted(os.listdir(folder)) == ["README.md", "config.json", "model.safetensors", "modeling_cuttlefish.py"]
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "cuttlefish", "version": __version__, "plan": plan,
                                             "extra_bn": False}
    assert config["auto_map"] == {
        "AutoModelForSequenceClassification": "modeling_cuttlefish.CuttlefishBertForSequenceClassification"}
    with safe_open(str(folder / "model.safetensors"), framework="pt") as weights:
        shapes = {key: weights.get_slice(key).get_shape() for key in weights.keys()}
    query = "bert.encoder.layer.0.attention.self.query"
    assert shapes[f"{query}.first.weight"] == [RANK, 32]
    assert shapes[f"{query}.second.weight"] == [32, RANK]
    assert f"{query}.weight" not in shapes
    assert len([key for key in shapes if key.endswith(".first.weight")]) == len(plan) == 12


def test_model_card_has_the_factorization_table_totals_and_loading_code(bert_folder):
    model, folder = bert_folder
    card = (folder / "README.md").read_text()
    report = hub.factorization_report(model)
    assert card.startswith("---\n") and "- cuttlefish" in card and "library_name: transformers" in card
    rows = [line for line in card.splitlines() if line.startswith("| `")]
    assert len(rows) == len(report.layers) == 12
    assert rows[0] == "| `bert.encoder.layer.0.attention.self.query` | 32x32 | 4 | 1,056 | 288 |"
    assert "| `bert.encoder.layer.0.intermediate.dense` | 64x32 | 4 | 2,112 | 448 |" in rows
    assert f"| **total** |  |  | **{report.target_params_before:,}** | **{report.target_params_after:,}** |" in card
    assert report.model_params_after == sum(p.numel() for p in model.parameters())
    assert report.model_params_before == sum(p.numel() for p in tiny_bert().parameters())
    assert f"Whole model: {report.model_params_before:,} -> {report.model_params_after:,} parameters" in card
    assert "- **task**: toy" in card
    assert 'AutoModelForSequenceClassification.from_pretrained("me/bert-cuttlefish")' in card
    assert "trust_remote_code=True" in card


def test_model_card_from_a_report_shows_stable_ranks():
    report = FactorizationReport.from_dict({
        "layers": [{"name": "blocks.0.mlp.fc1", "shape": [64, 32], "rank": 4, "params_before": 2112,
                    "params_after": 448, "stable_rank": 3.25}],
        "model_params_before": 5000, "model_params_after": 3336})
    card = hub.model_card(report, "Fine-tuned 3 epochs.", repo_id="me/x", library_name="timm")
    assert "| layer | shape | stable rank | rank | params (dense) | params (factorized) |" in card
    assert "| `blocks.0.mlp.fc1` | 64x32 | 3.2 | 4 | 2,112 | 448 |" in card
    assert "(1.50x smaller)" in card and "Fine-tuned 3 epochs." in card and 'load_timm("hf-hub:me/x")' in card


# -- reload ---------------------------------------------------------------------------------------------------
def test_reload_in_a_fresh_process_gives_identical_logits(tmp_path):
    """tiny BERT and HF DeiT through the transformers auto classes, timm DeiT through load_timm."""
    cases = {"bert": (factorized(tiny_bert()), text_input()), "hf_deit": (factorized(tiny_hf_deit()), image_input()),
             "timm_deit": (factorized(tiny_timm_deit()), image_input())}
    for name, (model, x) in cases.items():
        save_pretrained(model, tmp_path / name)
        torch.save({"x": x, "logits": logits(model, x), "plan": factorized_plan(model)}, tmp_path / f"{name}.pt")
    out = run_python("""
        import torch
        import cuttlefish_hf
        from cuttlefish_hf.hub import load_timm
        from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification
        from cuttlefish_hf import factorized_plan

        loaders = {"bert": AutoModelForSequenceClassification.from_pretrained,
                   "hf_deit": AutoModelForImageClassification.from_pretrained, "timm_deit": load_timm}
        for name, load in loaders.items():
            model, expected = load(name), torch.load(name + ".pt")
            out = model(expected["x"])
            out = out if isinstance(out, torch.Tensor) else out.logits
            assert torch.equal(out, expected["logits"]), name
            assert factorized_plan(model) == expected["plan"], name
            print(name, "ok")
    """, tmp_path)
    assert out.split() == ["bert", "ok", "hf_deit", "ok", "timm_deit", "ok"]


def test_importing_the_package_registers_the_loader(tmp_path):
    out = run_python("""
        import cuttlefish_hf
        from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
        print("cuttlefish" in AUTO_QUANTIZER_MAPPING)
    """, tmp_path)
    assert out.strip() == "True", "`import cuttlefish_hf` must register the loader (hub.registration.install) so " \
                                  "that AutoModel*.from_pretrained restores factorized checkpoints"


def test_plain_transformers_loads_with_trust_remote_code_and_silently_reinitializes_without(bert_folder, tmp_path):
    model, folder = bert_folder
    x = text_input()
    torch.save({"x": x, "logits": logits(model, x)}, tmp_path / "expected.pt")
    out = run_python(f"""
        import sys
        sys.modules["cuttlefish_hf"] = None  # a machine without cuttlefish_hf
        import torch
        from transformers import AutoModelForSequenceClassification

        expected = torch.load("expected.pt")
        remote = AutoModelForSequenceClassification.from_pretrained({str(folder)!r}, trust_remote_code=True)
        print(type(remote).__name__, torch.equal(remote(expected["x"]).logits, expected["logits"]))
        plain = AutoModelForSequenceClassification.from_pretrained({str(folder)!r})
        print(type(plain).__name__, torch.equal(plain(expected["x"]).logits, expected["logits"]))
    """, tmp_path)
    assert out.splitlines() == ["CuttlefishBertForSequenceClassification True",
                                # What the model card warns about: transformers only logs a LOAD REPORT.
                                "BertForSequenceClassification False"]


def test_remote_code_defines_every_name_it_uses():
    """modeling_cuttlefish.py carries the source of cuttlefish_hf.layers: everything it calls must come along."""
    import builtins
    import symtable

    from cuttlefish_hf.hub.remote_code import REMOTE_CODE_FILE, remote_code

    top = symtable.symtable(remote_code("BertForSequenceClassification"), REMOTE_CODE_FILE, "exec")
    defined = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()} | set(dir(builtins))

    def used(table) -> set[str]:
        names = {s.get_name() for s in table.get_symbols() if s.is_referenced() and (table is top or s.is_global())}
        return names.union(*(used(child) for child in table.get_children()))

    assert used(top) - defined == set()


def test_remote_code_layers_match_the_library():
    from cuttlefish_hf.hub.remote_code import remote_code
    from cuttlefish_hf.layers import factorized_like

    namespace: dict = {}
    exec(compile(remote_code("BertModel"), "modeling_cuttlefish.py", "exec"), namespace)
    for dense, x in [(torch.nn.Linear(8, 6), torch.randn(3, 8)),
                     (torch.nn.Conv2d(4, 6, 3, stride=2, padding=1), torch.randn(1, 4, 9, 9))]:
        ours = factorized_like(dense, 2, extra_bn=True)
        theirs = namespace["factorized_like"](dense, 2, extra_bn=True)
        assert type(theirs).__name__ == type(ours).__name__ and repr(theirs) == repr(ours)
        theirs.load_state_dict(ours.state_dict())
        assert torch.equal(theirs.eval()(x), ours.eval()(x))


def test_auto_model_reload_is_trainable_castable_and_keeps_its_record(bert_folder):
    model, folder = bert_folder
    loaded = tf.AutoModelForSequenceClassification.from_pretrained(folder)
    assert torch.equal(logits(loaded, text_input()), logits(model, text_input()))
    assert factorized_plan(loaded) == factorized_plan(model)
    assert not getattr(loaded, "is_quantized", False) and isinstance(loaded.hf_quantizer, CuttlefishHfQuantizer)
    from transformers.trainer_utils import validate_quantization_for_training

    validate_quantization_for_training(loaded)  # Trainer would refuse a model flagged as quantized
    loaded.half().float()
    assert loaded.config.quantization_config.plan == factorized_plan(model)


def test_from_pretrained_restores_a_folder_saved_without_the_record(tmp_path):
    model = factorized(tiny_bert())
    model.save_pretrained(tmp_path / "plain")
    # A folder without the record (older versions, hand-edited configs): only the factor shapes tell the plan.
    edit_config(tmp_path / "plain", lambda config: config.pop("quantization_config"))
    loaded = hub.from_pretrained(tf.AutoModelForSequenceClassification, tmp_path / "plain")
    assert torch.equal(logits(loaded, text_input()), logits(model, text_input()))
    loaded.save_pretrained(tmp_path / "resaved")  # and now it is recorded
    record = json.loads((tmp_path / "resaved" / "config.json").read_text())["quantization_config"]
    assert record["plan"] == factorized_plan(model)


def test_from_pretrained_of_a_dense_checkpoint_is_a_plain_load(tmp_path):
    model = tiny_bert()
    model.save_pretrained(tmp_path / "dense")
    loaded = hub.from_pretrained(tf.BertForSequenceClassification, tmp_path / "dense")
    assert torch.equal(logits(loaded, text_input()), logits(model, text_input()))
    assert getattr(loaded, "hf_quantizer", None) is None and not hasattr(loaded.config, "quantization_config")


def test_base_model_loads_the_factors_of_a_checkpoint_with_a_head(bert_folder):
    model, folder = bert_folder
    base = tf.AutoModel.from_pretrained(folder)
    assert factorized_plan(base) == {name.removeprefix("bert."): rank for name, rank in factorized_plan(model).items()}
    x = text_input()
    with torch.no_grad():
        assert torch.equal(base(x).last_hidden_state, model.bert(x).last_hidden_state)


# -- loads that cannot restore the model raise ----------------------------------------------------------------
def _rename_in_plan(old: str, new: str):
    def edit(config):
        plan = config["quantization_config"]["plan"]
        plan[new] = plan.pop(old)
    return edit


@pytest.mark.parametrize("edit, message", [
    (_rename_in_plan("bert.encoder.layer.1.output.dense", "bert.encoder.layer.9.output.dense"),
     "does not have"),
    (lambda c: c["quantization_config"]["plan"].update({"bert.encoder.layer.1.output.dense": 999}),
     r"ranks \{4: 11, 999: 1\}"),
    (lambda c: c["quantization_config"]["plan"].update({"bert.pooler.dense": 4}), "config.json: 13 layers"),
    (lambda c: c["quantization_config"]["plan"].pop("bert.encoder.layer.0.output.dense"), "checkpoint:  12 layers"),
    # Same ranks, wrong module: the header check passes, the factors of the named module are not in the file.
    (_rename_in_plan("bert.encoder.layer.1.output.dense", "bert.pooler.dense"), "no weights for 3 factor tensors"),
    (lambda c: c["quantization_config"]["plan"].update({"bert.encoder.layer.1.output.dense": "4"}),
     "positive int ranks"),
], ids=["unknown-module", "rank-too-large", "extra-layer", "missing-layer", "wrong-module", "malformed"])
def test_a_record_that_does_not_match_raises(bert_folder, edit, message):
    _, folder = bert_folder
    edit_config(folder, edit)
    with pytest.raises(ValueError, match=message):
        tf.AutoModelForSequenceClassification.from_pretrained(folder)


def test_a_record_that_does_not_fit_the_model_class_raises(bert_folder):
    _, folder = bert_folder
    with pytest.raises(ValueError, match="does not fit DeiTForImageClassification"):
        tf.DeiTForImageClassification.from_pretrained(folder)


def test_unrecorded_factors_under_renamed_keys_raise(tmp_path):
    model = factorized(tiny_hf_deit())
    model.save_pretrained(tmp_path / "deit")  # transformers writes DeiT's legacy key names, e.g. attention.query
    edit_config(tmp_path / "deit", lambda config: config.pop("quantization_config"))
    with pytest.raises(ValueError, match="records no Cuttlefish plan"):
        hub.from_pretrained(tf.AutoModelForImageClassification, tmp_path / "deit")


def test_timm_loads_that_cannot_restore_raise(tmp_path):
    model = factorized(tiny_timm_deit())
    save_timm(model, tmp_path / "timm")
    with pytest.raises(RuntimeError, match="Missing key"):  # timm's own loader is strict
        timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True)
    for name, edit, message in [
        ("unknown", lambda r: r["plan"].update({"blocks.7.mlp.fc1": 4}), "does not have"),
        ("too-large", lambda r: r["plan"].update({"blocks.0.mlp.fc1": 99}), r"must be an int in \[1, 32\]"),
        ("mismatch", lambda r: r["plan"].pop("blocks.0.mlp.fc1"), "does not match model.safetensors"),
    ]:
        folder = tmp_path / name
        shutil.copytree(tmp_path / "timm", folder)
        edit_config(folder, lambda c: edit(c["cuttlefish"]))
        with pytest.raises(ValueError, match=message):
            load_timm(folder)
    (tmp_path / "timm" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_timm(tmp_path / "timm")


def test_record_plan_rejects_non_transformers_models():
    with pytest.raises(TypeError, match="save_timm"):
        record_plan_(tiny_timm_deit())


# -- timm -----------------------------------------------------------------------------------------------------
def test_timm_layout_and_reload(tmp_path):
    model = factorized(tiny_timm_deit())
    save_timm(model, tmp_path / "timm", training_notes="toy")
    config = json.loads((tmp_path / "timm" / "config.json").read_text())
    assert config["architecture"] == "deit_tiny_patch16_224"
    assert config["model_args"]["embed_dim"] == 32 and config["num_classes"] == 3
    assert config["cuttlefish"] == {"version": __version__, "plan": factorized_plan(model), "extra_bn": False}
    assert "library_name: timm" in (tmp_path / "timm" / "README.md").read_text()
    loaded = load_timm(tmp_path / "timm")
    assert torch.equal(logits(loaded, image_input()), logits(model, image_input()))


class FakeTimmApi:
    """Stands in for timm's ``HfApi``: records the upload and keeps a copy of the folder."""

    def __init__(self, store: Path, **kwargs):
        self.store = store

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def file_exists(self, **kwargs):
        return False

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        shutil.copytree(folder_path, self.store / repo_id, dirs_exist_ok=True)
        return SimpleNamespace(repo_id=repo_id, kwargs=kwargs)


def test_timm_push_to_hf_hub_uploads_a_folder_load_timm_restores(tmp_path, monkeypatch):
    import timm.models._hub as timm_hub

    model = factorized(tiny_timm_deit())
    monkeypatch.setattr(timm_hub, "HfApi", lambda **kwargs: FakeTimmApi(tmp_path, **kwargs))
    timm_hub.push_to_hf_hub(model, "me/deit-plain")  # no record: the plan is read from the factor shapes
    timm_hub.push_to_hf_hub(model, "me/deit-recorded", model_config={"cuttlefish": hub.cuttlefish_record(model)})
    for repo in ("me/deit-plain", "me/deit-recorded"):
        loaded = load_timm(tmp_path / repo)
        assert torch.equal(logits(loaded, image_input()), logits(model, image_input()))


# -- push_to_hub (no network: the library's upload call is replaced) -------------------------------------------
class FakeHfApi(FakeTimmApi):
    calls: list = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        self.calls.append(("upload_folder", repo_id, kwargs))
        return super().upload_folder(repo_id=repo_id, folder_path=folder_path, **kwargs)


@pytest.mark.parametrize("make, x", [(tiny_bert, text_input), (tiny_timm_deit, image_input)], ids=["bert", "timm"])
def test_push_to_hub_uploads_the_saved_folder_and_card(tmp_path, monkeypatch, make, x):
    FakeHfApi.calls = []
    monkeypatch.setattr(hub_upload, "HfApi", lambda **kwargs: FakeHfApi(tmp_path, **kwargs))
    model = factorized(make())
    hub.push_to_hub(model, "me/model", training_notes="toy", private=True)
    assert [call[:2] for call in FakeHfApi.calls] == [("create_repo", "me/model"), ("upload_folder", "me/model")]
    assert FakeHfApi.calls[0][2]["private"] is True
    uploaded = tmp_path / "me" / "model"
    assert {"README.md", "config.json", "model.safetensors"} <= set(os.listdir(uploaded))
    card = (uploaded / "README.md").read_text()
    assert "| **total** |" in card and "me/model" in card
    loaded = load_timm(uploaded) if make is tiny_timm_deit else tf.AutoModel.from_pretrained(uploaded)
    assert factorized_plan(loaded) == {k.removeprefix("bert."): v for k, v in factorized_plan(model).items()}


def test_trainer_push_to_hub_uploads_record_and_card(tmp_path, monkeypatch):
    """CuttlefishTrainer records the plan at the switch and adds the Cuttlefish section to Trainer's card."""
    import transformers.trainer as trainer_module

    from cuttlefish_hf import CuttlefishConfig, CuttlefishTrainer
    from helpers import KeywordDataset

    api = FakeHfApi(tmp_path / "hub")
    FakeHfApi.calls = []
    monkeypatch.setattr(trainer_module, "hf_api", lambda: api)
    args = tf.TrainingArguments(output_dir=str(tmp_path / "out"), push_to_hub=True, hub_model_id="me/trained",
                                report_to=[], use_cpu=True, save_strategy="no", max_steps=3,
                                per_device_train_batch_size=8, disable_tqdm=True)
    trainer = CuttlefishTrainer(model=tiny_bert(), args=args, train_dataset=KeywordDataset(size=24),
                                cuttlefish_config=CuttlefishConfig(mode="si_fd"))
    trainer.train()
    trainer.push_to_hub()
    trainer.push_to_hub()  # a second card does not repeat the section
    uploaded = tmp_path / "hub" / "me" / "trained"
    card = (uploaded / "README.md").read_text()
    assert "generated_from_trainer" in card and "- cuttlefish" in card and "si_fd" in card
    assert card.count("## Cuttlefish low-rank factorization") == 1
    loaded = tf.AutoModelForSequenceClassification.from_pretrained(uploaded)
    assert factorized_plan(loaded) == factorized_plan(trainer.model)
    assert torch.equal(logits(loaded, text_input()), logits(trainer.model.eval(), text_input()))


# -- merge_ ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, x", [(tiny_bert, text_input), (tiny_hf_deit, image_input),
                                     (tiny_timm_deit, image_input)], ids=["bert", "hf_deit", "timm_deit"])
def test_merge_folds_factors_back_within_fp_tolerance(make, x):
    model = factorized(make())
    before = logits(model, x())
    assert merge_(model) == len(find_targets(make()))
    assert factorized_plan(model) == {}
    torch.testing.assert_close(logits(model, x()), before, atol=1e-5, rtol=1e-4)


def test_merged_or_dequantized_models_save_as_plain_checkpoints(bert_folder, tmp_path):
    model, folder = bert_folder
    x = text_input()
    merge_(model)  # the record made by save_pretrained follows the live model on the next save
    model.save_pretrained(tmp_path / "merged")
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    plain = tf.BertForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert torch.equal(logits(plain, x), logits(model, x))

    loaded = tf.AutoModelForSequenceClassification.from_pretrained(folder)
    expected = logits(loaded, x)
    loaded.dequantize()  # transformers' own verb folds the factors back too
    assert factorized_plan(loaded) == {} and not hasattr(loaded.config, "quantization_config")
    torch.testing.assert_close(logits(loaded, x), expected, atol=1e-5, rtol=1e-4)


def test_checkpoint_config_round_trips_and_tolerates_newer_keys():
    config = CuttlefishCheckpointConfig.from_dict({"quant_method": "cuttlefish", "plan": {"a": 2}, "extra_bn": True,
                                                   "version": "9.0", "from_the_future": 1})
    assert config.to_dict() == {"quant_method": "cuttlefish", "plan": {"a": 2}, "extra_bn": True, "version": "9.0"}


def test_merged_reload_saves_a_plain_folder_without_our_remote_code(tmp_path):
    hub.save_pretrained(factorized(tiny_bert()), tmp_path / "factorized")
    loaded = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "factorized")
    merge_(loaded)
    loaded.save_pretrained(tmp_path / "dense")
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "auto_map" not in config and "quantization_config" not in config
    dense = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "dense", trust_remote_code=True)
    torch.testing.assert_close(logits(dense, text_input()), logits(loaded, text_input()))


# -- the plan is recorded whatever the route to save_pretrained ------------------------------------------------
def test_plain_save_pretrained_after_factorize_records_the_plan(tmp_path):
    model = factorized(tiny_bert())
    model.save_pretrained(tmp_path / "out")  # no hub.save_pretrained, no record_plan_
    record = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert record["quant_method"] == "cuttlefish" and record["plan"] == factorized_plan(model)
    loaded = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert factorized_plan(loaded) == factorized_plan(model)
    assert torch.equal(logits(loaded, text_input()), logits(model, text_input()))


def test_compiled_model_in_trainer_saves_its_plan_without_compile_prefixes(tmp_path):
    from helpers import KeywordDataset
    from test_trainer_callback import FAST, training_args

    from cuttlefish_hf import CuttlefishCallback, CuttlefishConfig

    model = helpers.tiny_bert()
    callback = CuttlefishCallback(CuttlefishConfig(**FAST))
    # A compiled module's forward takes (*args, **kwargs): Trainer would drop every column.
    trainer = tf.Trainer(model=torch.compile(model, backend="eager"),
                         args=training_args(tmp_path, remove_unused_columns=False), train_dataset=KeywordDataset(),
                         callbacks=[callback])
    trainer.train()
    plan = callback.controller.report.plan
    assert plan and not any("_orig_mod" in name for name in plan) and factorized_plan(model) == plan
    trainer.save_model(str(tmp_path / "final"))
    with safe_open(str(tmp_path / "final" / "model.safetensors"), framework="pt") as handle:
        assert not any("_orig_mod" in key for key in handle.keys())
    loaded = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "final")
    assert factorized_plan(loaded) == plan
    assert torch.equal(logits(loaded, text_input()), logits(model.eval(), text_input()))


def test_cuttlefish_trainer_output_loads_with_trust_remote_code_as_its_card_says(tmp_path):
    from helpers import KeywordDataset
    from test_trainer_callback import FAST, training_args

    from cuttlefish_hf import CuttlefishConfig, CuttlefishTrainer

    trainer = CuttlefishTrainer(model=helpers.tiny_bert(), args=training_args(tmp_path), train_dataset=KeywordDataset(),
                                cuttlefish_config=CuttlefishConfig(**FAST))
    trainer.train()
    folder = tmp_path / "final"
    trainer.save_model(str(folder))
    trainer.create_model_card()
    assert "trust_remote_code=True" in (tmp_path / "out" / "README.md").read_text()
    config = json.loads((folder / "config.json").read_text())
    assert (folder / "modeling_cuttlefish.py").is_file()
    assert config["auto_map"]["AutoModelForSequenceClassification"].startswith("modeling_cuttlefish.")
    loaded = tf.AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    assert type(loaded).__name__ == "CuttlefishBertForSequenceClassification"
    assert torch.equal(logits(loaded, text_input()), logits(trainer.model.eval(), text_input()))
