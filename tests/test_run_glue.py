"""examples/glue/run_glue.py end to end on a tiny BERT and a tiny CSV (offline), and its flag errors."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import random
import re
import runpy
import shlex
import string
import sys
from pathlib import Path

import pytest
from helpers import tiny_bert
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, BertTokenizer

from cuttlefish_hf import CuttlefishConfig, factorized_plan

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "glue" / "run_glue.py"
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [f"w{i}" for i in range(64 - len(SPECIAL_TOKENS))]  # tiny_bert has a 64-token vocabulary
KEYWORD = WORDS[0]


def load_script():
    spec = importlib.util.spec_from_file_location("run_glue", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_glue"] = module  # as an import would: dataclasses and pickle look the module up there
    spec.loader.exec_module(module)
    return module


run_glue = load_script()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny BERT and a word-level tokenizer for its vocabulary, saved like a Hub model folder."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    tiny_bert().save_pretrained(folder)
    BertTokenizer(vocab={token: i for i, token in enumerate(SPECIAL_TOKENS + WORDS)}).save_pretrained(folder)
    return folder


def write_csv(path: Path, rows: int, seed: int, pairs: bool = False, classes: tuple = (0, 1)) -> Path:
    """Label ``classes[1]`` when the text contains KEYWORD, else ``classes[0]``; pairs split the same eight words
    four and four."""
    rng = random.Random(seed)
    columns = ["sentence1", "sentence2", "label"] if pairs else ["sentence", "label"]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in range(rows):
            label = row % 2
            words = rng.choices(WORDS[1:], k=8)
            if label:
                words[rng.randrange(8)] = KEYWORD
            texts = [" ".join(words[:4]), " ".join(words[4:])] if pairs else [" ".join(words)]
            writer.writerow([*texts, classes[label]])
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    write_csv(folder / "train.csv", 64, seed=0)
    write_csv(folder / "validation.csv", 32, seed=1)
    return folder


def flags(model_dir: Path, data_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", str(model_dir), "--train_file", str(data_dir / "train.csv"),
            "--validation_file", str(data_dir / "validation.csv"), "--do_train", "--do_eval",
            "--output_dir", str(output_dir), "--max_seq_length", "16", "--per_device_train_batch_size", "8",
            "--num_train_epochs", "4", "--learning_rate", "2e-3", "--save_strategy", "no", "--use_cpu",
            "--disable_tqdm", "true", "--seed", "0", *extra]


CUTTLEFISH_FLAGS = ("--cuttlefish", "--measure_every_steps", "2", "--window", "2", "--min_warmup_measurements", "3",
                    "--eps_relative", "0.05", "--rank_rule", "stable_rank")


def test_cuttlefish_run_switches_writes_results_and_plot_and_reloads(model_dir, data_dir, tmp_path):
    output_dir = tmp_path / "out"
    results = run_glue.main(flags(model_dir, data_dir, output_dir, *CUTTLEFISH_FLAGS, "--report_to", "tensorboard"))

    saved = json.loads((output_dir / "eval_results.json").read_text())
    summary = saved["cuttlefish"]
    assert summary == results["cuttlefish"]
    assert 0 < summary["switch_step"] < 32  # 64 rows / batch 8 x 4 epochs
    assert summary["plan"] and summary["model_params_after"] < summary["model_params_before"]
    assert summary["measure_seconds"] > 0 and summary["surgery_seconds"] > 0
    assert 0.0 <= saved["eval_accuracy"] <= 1.0 and "eval_f1" in saved
    assert json.loads((output_dir / "train_results.json").read_text())["cuttlefish"] == summary
    assert (output_dir / "stable_ranks.png").read_bytes().startswith(b"\x89PNG")
    assert list((output_dir / "runs").rglob("events.out.tfevents.*"))
    assert "Cuttlefish low-rank factorization" in (output_dir / "README.md").read_text()

    reloaded = AutoModelForSequenceClassification.from_pretrained(output_dir).eval()
    assert factorized_plan(reloaded) == summary["plan"]
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    batch = tokenizer([f"{KEYWORD} w3 w4", "w5 w6"], padding=True, return_tensors="pt")
    assert reloaded(**batch).logits.shape == (2, 2)


def test_loss_is_logged_at_measurement_steps(model_dir, data_dir, tmp_path):
    run_glue.main(flags(model_dir, data_dir, tmp_path, *CUTTLEFISH_FLAGS, "--num_train_epochs", "1",
                        "--logging_steps", "2"))
    history = json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "loss" in entry] == [2, 4, 6, 8]


def test_vanilla_run_on_sentence_pairs(model_dir, tmp_path):
    write_csv(tmp_path / "train.csv", 32, seed=0, pairs=True)
    write_csv(tmp_path / "validation.csv", 16, seed=1, pairs=True)
    results = run_glue.main(flags(model_dir, tmp_path, tmp_path / "out", "--num_train_epochs", "1"))
    assert "cuttlefish" not in results and "eval_accuracy" in results
    assert not (tmp_path / "out" / "stable_ranks.png").exists()
    assert factorized_plan(AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")) == {}


def test_string_labels_get_sorted_ids_saved_in_the_config(model_dir, tmp_path):
    write_csv(tmp_path / "train.csv", 32, seed=0, classes=("yes", "no"))  # first seen "yes", sorted "no" first
    write_csv(tmp_path / "validation.csv", 16, seed=1, classes=("yes", "no"))
    data_args = run_glue.parse_arguments(flags(model_dir, tmp_path, tmp_path / "out"))[1]
    raw = run_glue.load_raw_datasets(data_args, None)
    labels = run_glue.label_names(raw, None)
    assert labels == ["no", "yes"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    splits = run_glue.tokenize(raw, tokenizer, ("sentence", None), data_args, labels)
    assert splits["train"]["label"][:4] == [1, 0, 1, 0] and splits["train"].features["label"].dtype == "int64"

    results = run_glue.main(flags(model_dir, tmp_path, tmp_path / "out", "--num_train_epochs", "1"))
    assert 0.0 <= results["eval_accuracy"] <= 1.0
    config = AutoConfig.from_pretrained(tmp_path / "out")
    assert config.id2label == {0: "no", 1: "yes"} and config.label2id == {"no": 0, "yes": 1}


def test_validation_labels_unseen_in_training_are_refused(tmp_path):
    write_csv(tmp_path / "train.csv", 8, seed=0, classes=("yes", "no"))
    write_csv(tmp_path / "validation.csv", 8, seed=1, classes=("yes", "maybe"))
    # The model does not exist: the labels must be checked before it loads (an OSError otherwise).
    with pytest.raises(ValueError, match=r"validation.csv has labels \['maybe'\] that .*train.csv never has"):
        run_glue.main(flags(tmp_path / "no-model", tmp_path, tmp_path / "out"))


def test_json_file_gives_the_same_config_as_flags(tmp_path, data_dir):
    command_line = ["--model_name_or_path", "unused", "--train_file", str(data_dir / "train.csv"),
                    "--output_dir", str(tmp_path), "--cuttlefish", "--target_modules", '["query", "value"]',
                    "--rank_pattern", '{"value": 4}', "--skip_first_blocks", "1", "--power_iteration_seed", "3",
                    "--extra_bn", "false", "--seed", "11"]
    training_args, from_flags = run_glue.parse_arguments(command_line)[-2:]
    assert training_args.seed == 11  # Trainer's --seed, apart from the config's power_iteration_seed
    (tmp_path / "args.json").write_text(json.dumps({
        "model_name_or_path": "unused", "train_file": str(data_dir / "train.csv"), "output_dir": str(tmp_path),
        "cuttlefish": True, "target_modules": ["query", "value"], "rank_pattern": {"value": 4},
        "skip_first_blocks": 1, "power_iteration_seed": 3, "extra_bn": False, "seed": 11}))
    from_file = run_glue.parse_arguments([str(tmp_path / "args.json")])[-1]
    assert from_flags == from_file == CuttlefishConfig(target_modules=["query", "value"], rank_pattern={"value": 4},
                                                       skip_first_blocks=1, power_iteration_seed=3,
                                                       extra_bn=False)
    assert run_glue.parse_arguments(command_line[:6])[-1] is None  # without --cuttlefish: a vanilla run


@pytest.mark.parametrize("extra,message", [
    (["--cuttlefish", "--rank_rule", "biggest"], "rank_rule='biggest' is not valid; choose one of"),
    (["--cuttlefish", "--eps_relative", "-0.1"], "eps_relative must be a number >= 0"),
    (["--cuttlefish", "--frobenius_decay", "-1"], "frobenius_decay must be a number >= 0"),
    (["--cuttlefish", "--window", "0"], "window must be an integer >= 1"),
    (["--cuttlefish", "--rank_pattern", '{"query": 0}'], "rank_pattern['query'] must be a positive int rank"),
    (["--cuttlefish", "--skip_first_blocks", "some"], "skip_first_blocks must be an integer >= 0, 'auto'"),
    (["--train_file", "missing.csv"], "--train_file missing.csv: no such file"),
    (["--train_file", "train.txt"], "--train_file train.txt: expected a .csv or .json file"),
    (["--task_name", "sst3"], "--task_name 'sst3' is not a GLUE task"),
    ([], "Give --task_name (a GLUE task) or --train_file"),
    (["--task_name", "sst2", "--no_such_flag", "1"], "--no_such_flag"),
])
def test_bad_flags_exit_with_argparse_errors_before_loading_anything(extra, message, data_dir, tmp_path, capsys):
    if extra[:1] == ["--cuttlefish"]:
        extra = ["--train_file", str(data_dir / "train.csv"), *extra]
    # The model does not exist: reaching the model loading would raise OSError, not exit with status 2.
    with pytest.raises(SystemExit) as exit_info:
        run_glue.main(["--model_name_or_path", str(tmp_path / "no-model"), "--output_dir", str(tmp_path), *extra])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "usage: " in error and message in error


def test_do_eval_without_validation_data_is_a_flag_error(data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_glue.main(["--model_name_or_path", "unused", "--train_file", str(data_dir / "train.csv"), "--do_eval",
                       "--output_dir", str(tmp_path)])
    assert exit_info.value.code == 2 and "--do_eval needs --validation_file" in capsys.readouterr().err


def test_help_lists_every_cuttlefish_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_glue.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    group = text[text.index("Cuttlefish (the fields of CuttlefishConfig):"):]
    for f in dataclasses.fields(CuttlefishConfig):
        assert f"--{f.name} " in group, f.name  # the field's own name, under the Cuttlefish heading
    assert "--cuttlefish [CUTTLEFISH]" in text and text.count("\n  --seed SEED") == 1  # Trainer's


def test_the_program_exits_with_status_2_on_a_bad_flag(data_dir, tmp_path, monkeypatch, capsys):
    """``python run_glue.py ...``: runpy runs the file as ``__main__`` in this process, without a fresh
    interpreter's seconds of imports (the README recipe test runs it as a program)."""
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--model_name_or_path", "unused", "--train_file",
                                      str(data_dir / "train.csv"), "--output_dir", str(tmp_path), "--cuttlefish",
                                      "--rank_rule", "biggest"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert exit_info.value.code == 2 and "rank_rule='biggest' is not valid" in capsys.readouterr().err


def test_a_factorized_output_trains_on_with_cuttlefish_and_loads_as_its_card_says(model_dir, data_dir, tmp_path):
    first = run_glue.main(flags(model_dir, data_dir, tmp_path / "first", *CUTTLEFISH_FLAGS, "--num_train_epochs", "2"))
    assert first["cuttlefish"]["plan"]
    again = run_glue.main(flags(tmp_path / "first", data_dir, tmp_path / "again", *CUTTLEFISH_FLAGS,
                                "--num_train_epochs", "1"))
    summary = again["cuttlefish"]
    assert summary["switch_step"] == 0 and summary["measurements"] == 0
    assert summary["plan"] == first["cuttlefish"]["plan"]
    assert summary["rank_rule_reason"] == "the model was already factorized when training began"
    folder = tmp_path / "again"
    assert (folder / "modeling_cuttlefish.py").is_file() and "auto_map" in json.loads((folder / "config.json").read_text())
    remote = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    assert factorized_plan(remote) == summary["plan"]


# -- the README's commands ----------------------------------------------------------------------------------------
README = SCRIPT.parent / "README.md"


def readme_commands(readme: Path, script: str, values: dict[str, str]) -> list[list[str]]:
    """The arguments of each ``script`` command in the README's bash blocks; ``$NAME`` from ``values`` or from the
    block's own ``NAME="..."`` lines."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme.read_text(), re.DOTALL):
        variables = dict(values)
        for line in block.replace("\\\n", " ").splitlines():
            line = string.Template(line.strip()).safe_substitute(variables)
            assignment = re.fullmatch(r"(\w+)=(.*)", line)
            if assignment and assignment[1] not in variables:
                variables[assignment[1]] = shlex.split(assignment[2])[0]
            elif script in line:
                words = shlex.split(line, comments=True)
                commands.append(words[[w.endswith(script) for w in words].index(True) + 1:])
    return commands


def test_the_readme_commands_parse_to_the_configs_they_describe(data_dir, tmp_path):
    commands = readme_commands(README, "run_glue.py", {"MODEL": str(tmp_path / "model"), "DATA": str(data_dir)})
    configs = [run_glue.parse_arguments(command)[-1] for command in commands]
    assert configs == [None, CuttlefishConfig(measure_every_steps=100), None, CuttlefishConfig(measure_every_steps=25)]


def test_the_readme_flag_examples_parse(data_dir, tmp_path):
    text = README.read_text()
    base = ["--model_name_or_path", "unused", "--train_file", str(data_dir / "train.csv"), "--output_dir",
            str(tmp_path), "--cuttlefish"]
    examples = re.findall(r"`(--(\w+) '([^`]*)')`", text)
    assert {name for _, name, _ in examples} == {"target_modules", "rank_pattern", "kind_fractions"}
    for example, name, value in examples:
        config = run_glue.parse_arguments([*base, *shlex.split(example)])[-1]
        assert getattr(config, name) == (json.loads(value) if value[0] in "[{" else value), example  # else a regex
    mrpc = re.search(r"MRPC .*?: `(--task_name mrpc [^`]*)`", text, re.DOTALL)[1]
    config = run_glue.parse_arguments(["--model_name_or_path", "unused", "--output_dir", str(tmp_path),
                                       *shlex.split(mrpc)])[-1]
    assert config == CuttlefishConfig(measure_every_steps=20)
