"""The README recipes as written: commands are read out of the Markdown, never copied into the test.

``examples/glue/README.md``'s offline recipe (the packaged all-MiniLM-L6-v2 on debian-sections) runs up to and
including its first ``run_glue.py`` command, in a scratch folder laid out like the repository (``examples/`` and
``.venv`` linked, ``../shared/data/debian-sections`` holding a tiny CSV pair written here), with flags appended that
cut it to two optimizer steps on 32 rows and send the output to the scratch folder. The real model is used, so the
test fails when the recipe cannot find it (for instance when ``make install`` does not install its package and the
model path comes out empty).
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
GLUE_README = ROOT / "examples" / "glue" / "README.md"
LABELS = 8  # debian-sections: admin, games, graphics, net, science, sound, text, utils
SHORT_RUN = ("--max_train_samples", "32", "--max_eval_samples", "16", "--max_steps", "2", "--disable_tqdm", "true")


def bash_block(readme: Path, heading: str) -> str:
    """The first fenced bash block after the heading that starts with ``heading``."""
    text = readme.read_text(encoding="utf-8")
    section = re.search(rf"^#+ {re.escape(heading)}.*?$(.*?)(?=^#+ |\Z)", text, re.M | re.S)
    assert section, f"no section {heading!r} in {readme}"
    block = re.search(r"^```bash\n(.*?)^```", section.group(1), re.M | re.S)
    assert block, f"no ```bash block in section {heading!r} of {readme}"
    return block.group(1)


def through_first_command(script: str, program: str) -> tuple[str, str]:
    """(the script up to the end of the first command that runs ``program``, that command as one line)."""
    lines, start = script.splitlines(), 0
    for end, line in enumerate(lines):
        if line.endswith("\\"):
            continue  # the command goes on
        command = " ".join(part.rstrip("\\").strip() for part in lines[start:end + 1])
        if program in command and not command.lstrip().startswith("#"):
            return "\n".join(lines[:end + 1]), command
        start = end + 1
    raise AssertionError(f"no command runs {program}")


def write_csv(path: Path, rows: int) -> None:
    """``sentence,label`` rows cycling through the eight label ids, as in debian-sections."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sentence", "label"])
        for row in range(rows):
            writer.writerow([f"tool number {row} for the package section {row % LABELS}", row % LABELS])


def test_offline_recipe_imports_only_what_make_install_installs():
    """Each module the offline recipe imports comes from a distribution that the ``dev`` extra (``make install``)
    names and ``constraints.txt`` pins."""
    from setuptools.config.setupcfg import read_configuration

    script = bash_block(GLUE_README, "Offline")
    modules = set(re.findall(r"\bimport ([\w, ]+?);", script))
    modules = {name.strip() for group in modules for name in group.split(",")} - set(sys.stdlib_module_names)
    assert modules, "the offline recipe no longer finds its model through a Python package"
    dev = {re.split(r"[<>=!~ ;\[]", req, maxsplit=1)[0].lower().replace("_", "-")
           for req in read_configuration(str(ROOT / "setup.cfg"))["options"]["extras_require"]["dev"]}
    pins = {line.split("==")[0].strip().lower().replace("_", "-")
            for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line}
    makefile = (ROOT / "Makefile").read_text()
    assert '-e ".[dev]"' in makefile and "-c constraints.txt" in makefile
    for module in modules:
        distributions = [name.lower().replace("_", "-") for name in packages_distributions().get(module, [])]
        assert distributions, f"the offline recipe imports {module}, which is not installed"
        assert any(name in dev for name in distributions), f"{distributions} not in the dev extra of setup.cfg"
        assert any(name in pins for name in distributions), f"{distributions} not pinned in constraints.txt"


def test_glue_offline_recipe_first_command_runs_as_written(tmp_path):
    script, command = through_first_command(bash_block(GLUE_README, "Offline"), "run_glue.py")
    assert "--model_name_or_path $MODEL" in script and "../shared/data/debian-sections" in script

    repo, data = tmp_path / "repo", tmp_path / "shared" / "data" / "debian-sections"
    repo.mkdir()
    data.mkdir(parents=True)
    (repo / "examples").symlink_to(ROOT / "examples")
    (repo / ".venv").symlink_to(sys.prefix)  # the recipe's .venv/bin/python: the interpreter running the tests
    write_csv(data / "train.csv", 32)
    write_csv(data / "validation.csv", 16)
    output = tmp_path / "out"
    run = (f"set -eu\n{script} {' '.join(SHORT_RUN)} --output_dir {output}\n"
           'printf "MODEL=%s\\n" "$MODEL"\n')
    env = dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(tmp_path), HF_DATASETS_CACHE=str(tmp_path / "cache"))
    env.pop("PYTHONPATH", None)
    completed = subprocess.run(["bash", "-c", run], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, f"{command}\n{completed.stderr[-4000:]}"

    model = completed.stdout.rsplit("MODEL=", 1)[-1].strip()
    assert model and Path(model).is_dir(), f"the recipe's model path is {model!r}"
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt"} <= set(os.listdir(model))

    config = json.loads((output / "config.json").read_text())
    assert config["model_type"] == "bert" and config["hidden_size"] == 384 and config["num_hidden_layers"] == 6
    assert sorted(map(int, config["id2label"])) == list(range(LABELS))
    results = json.loads((output / "eval_results.json").read_text())
    assert 0.0 <= results["eval_accuracy"] <= 1.0 and "cuttlefish" not in results  # the vanilla run
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 2
    assert not (repo / "outputs").exists()  # --output_dir appended last wins over the recipe's
