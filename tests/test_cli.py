"""Tests for the ``cuttlefish-hf`` command line: every subcommand on tiny local models, errors, ``--help``."""

from __future__ import annotations

import json
import re
import runpy
import sys
import warnings
from importlib.metadata import entry_points

import pytest
import timm
import torch
from transformers import AutoModelForSequenceClassification

from cuttlefish_hf import factorize_
from cuttlefish_hf.cli.inspect import TABLE_RULES, WIDTH, LayerInfo, format_table
from cuttlefish_hf.cli.main import SUBCOMMANDS, main
from cuttlefish_hf.hub import save_pretrained, save_timm
from helpers import TINY_TIMM_KWARGS, pretrained_like, tiny_bert, tiny_timm_deit

BERT_PLAN = {"bert.encoder.layer.1.attention.self.query": 4, "bert.encoder.layer.1.intermediate.dense": 8}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Folders of a tiny BERT and a tiny timm ViT, each dense and factorized, and a pretrained-like BERT."""
    root = tmp_path_factory.mktemp("models")
    bert_config = dict(vocab_size=100, max_position_embeddings=512)
    pretrained_like(tiny_bert(seed=0, **bert_config)).save_pretrained(root / "bert_pretrained")
    bert = tiny_bert(seed=None, **bert_config)  # the generator goes on: weights unlike the first's
    bert.save_pretrained(root / "bert")
    (root / "bert" / "vocab.txt").write_text("[PAD]\n")  # a tokenizer file merge should carry along
    factorize_(bert, BERT_PLAN)
    save_pretrained(bert, root / "bert_factorized")
    (root / "bert_factorized" / "vocab.txt").write_text("[PAD]\n")
    vit = tiny_timm_deit(seed=None, model_name="vit_tiny_patch16_224")
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


def row_of(out: str, name: str) -> list[str]:
    return next(line for line in out.splitlines() if line.startswith(name + " ")).split()


def test_inspect_transformers_folder_and_plot(models, capsys, tmp_path):
    code, out, err = cli("inspect", models["root"] / "bert", "--plot", tmp_path / "ranks.png", capsys=capsys)
    assert code == 0, err
    assert row_of(out, "1.output.dense")[1] == "32x64"
    assert "without their common prefix 'bert.encoder.layer.'" in out
    assert "12 layers" in out and "FLOPs per token saved" in out
    assert (tmp_path / "ranks.png").read_bytes()[:4] == b"\x89PNG"


def test_inspect_fits_120_columns_and_wide_shows_every_column(models, capsys):
    code, out, err = cli("inspect", models["root"] / "bert", capsys=capsys)
    assert code == 0, err
    assert max(map(len, out.splitlines())) <= WIDTH == 120
    header = next(line for line in out.splitlines() if line.startswith("layer "))
    assert not any(rule in header.split() for rule in TABLE_RULES)  # one rank column, the chosen rule's
    code, out, err = cli("inspect", models["root"] / "bert", "--wide", capsys=capsys)
    assert code == 0, err
    header = next(line for line in out.splitlines() if line.startswith("layer "))
    for column in (*TABLE_RULES, "rank", "stable rank", "params dense", "params now", "params at rank",
                   "FLOPs/token saved"):
        assert column in header
    assert len(row_of(out, "bert.encoder.layer.1.output.dense")) == 15  # full names, a cell per column
    assert max(map(len, out.splitlines())) > WIDTH


def test_format_table_cuts_names_too_long_for_120_columns():
    names = [f"model.layers.{block}.{'a_deeply_nested_wrapper_module.' * 3}{leaf}"
             for block in range(2) for leaf in ("q_proj", "up_proj")]
    infos = [LayerInfo(name, (4096, 4096), 100.0, None, {"energy": 64}, {"energy": True}) for name in names]
    lines = format_table(infos, torch.nn.Linear(2, 2), "energy").splitlines()
    assert max(map(len, lines)) <= WIDTH
    rows = [line for line in lines if "4096x4096" in line]
    assert len(rows) == 4 and all("..." in row and row.split()[0].endswith(("q_proj", "up_proj")) for row in rows)
    assert len({row.split()[0] for row in rows}) == 4  # still told apart


@pytest.mark.parametrize("folder, rule, why", [
    ("bert_pretrained", "kind_fractions", "weights look pretrained"),
    ("bert", "scaled_stable_rank", "weights look randomly initialized"),
])
def test_inspect_defaults_to_the_rule_training_would_use(models, folder, rule, why, capsys):
    code, out, err = cli("inspect", models["root"] / folder, capsys=capsys)
    assert code == 0, err
    assert " ".join(out.split()).startswith(f"Ranks by the {rule} rule, the one training would use: "
                                            "rank_rule='auto' and init='auto' and warmup='auto' and "
                                            "factor_lr_scale='auto' and the")
    assert why in " ".join(out.split())
    if rule == "kind_fractions":  # attention keeps 0.4, FFN 0.7 of its parameters: floor(f*m*n/(m+n))
        assert row_of(out, "0.attention.self.query")[5] == "6" and row_of(out, "0.intermediate.dense")[5] == "14"
    code, out, err = cli("inspect", models["root"] / folder, "--rule", "energy", capsys=capsys)
    assert code == 0, err
    assert out.startswith("Ranks by the energy rule (--rule energy).")


@pytest.mark.parametrize("rule", ["auto", "scaled_stable_rank", "stable_rank", "energy", "fixed_ratio",
                                  "kind_fractions"])
def test_inspect_never_proposes_more_than_the_current_rank(models, rule, capsys):
    code, out, err = cli("inspect", models["root"] / "bert_factorized", "--wide", "--rule", rule, capsys=capsys)
    assert code == 0, err
    for name, now in (("bert.encoder.layer.1.attention.self.query", 4), ("bert.encoder.layer.1.intermediate.dense", 8)):
        row = row_of(out, name)
        assert row[4] == str(now)  # the "now" column
        ranks = [int(cell.rstrip("*")) for cell in row[5:11]]  # every rule's, and the chosen one
        assert len(ranks) == 6 and max(ranks) <= now
    model_now, model_at = (int(n.replace(",", "")) for n in re.search(r"model ([\d,]+) -> ([\d,]+)", out).groups())
    assert model_at <= model_now if rule != "auto" else model_at == model_now
    if rule == "auto":  # training keeps a factorized model as it is
        assert out.startswith("Ranks as training would keep them: the model was already factorized")
        assert row_of(out, "bert.encoder.layer.0.output.dense")[10] == "dense"


def test_inspect_factorized_folder_shows_current_ranks(models, capsys):
    code, out, err = cli("inspect", models["root"] / "bert_factorized", "--rule", "energy", capsys=capsys)
    assert code == 0, err
    assert row_of(out, "1.intermediate.dense")[4] == "8"  # the "now" column
    assert "params at rank" in out


def test_inspect_timm_by_name_and_folder(models, capsys):
    code, out, err = cli("inspect", "timm:vit_tiny_patch16_224", "--model-kwargs", json.dumps(TINY_TIMM_KWARGS),
                         capsys=capsys)
    assert code == 0, err
    assert row_of(out, "1.mlp.fc2")[1] == "32x128" and "8 layers" in out
    code, out, err = cli("inspect", models["root"] / "vit_factorized", capsys=capsys)
    assert code == 0, err
    assert row_of(out, "1.mlp.fc1")[4] == "4"


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
    code, out, err = cli("profile", models["root"] / "bert", "--batch-size", "2", "--seq-len", "8", *fast,
                         "--compile", capsys=capsys)
    assert code == 0, err
    assert "on cpu in float32, compiled;" in out and "(3 layers timed, 9 from the cache)" in out


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


def test_console_script_reports_errors_without_traceback(tmp_path, monkeypatch, capsys):
    """``cuttlefish-hf`` and ``python -m cuttlefish_hf.cli.main`` exit with main's code. Run in this process
    (runpy executes the module as ``__main__``): a fresh interpreter would add seconds of imports, not coverage."""
    (script,) = entry_points(group="console_scripts", name="cuttlefish-hf")
    assert script.load() is main
    monkeypatch.setattr(sys, "argv", ["cuttlefish-hf", "inspect", str(tmp_path / "none")])
    with warnings.catch_warnings(), pytest.raises(SystemExit) as exit_:
        warnings.filterwarnings("ignore", "'cuttlefish_hf.cli.main' found in sys.modules", RuntimeWarning)
        runpy.run_module("cuttlefish_hf.cli.main", run_name="__main__")
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # above it, main's note on torch threads
    assert last.startswith("cuttlefish-hf inspect: error:") and "Traceback" not in err


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


# --- torch thread count: --threads, then OMP_NUM_THREADS, then the cores free at start ---------------------------

from cuttlefish_hf.cli import main as cli_main  # noqa: E402


def fake_machine(monkeypatch, cores: int, busy: float | None, load: float | None = None, cpu_count: int | None = None):
    """``cores`` usable CPUs (of ``cpu_count``), ``busy`` CPUs' worth of other work now (None: /proc/stat
    unreadable), a 1-minute load average (None: unavailable)."""
    monkeypatch.setattr(cli_main.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(cli_main.os, "cpu_count", lambda: cpu_count or cores)

    def getloadavg():
        if load is None:
            raise OSError("no load average")
        return (load, load, load)

    monkeypatch.setattr(cli_main.os, "getloadavg", getloadavg)
    monkeypatch.setattr(cli_main, "busy_cores_now", lambda: busy)


@pytest.mark.parametrize("cores, busy, load, cpu_count, expected, why", [
    (2, 0.05, 2.0, None, 2, "2 usable cores, 0.05 busy with other work"),  # idle now, whatever ran a minute ago
    (2, 0.45, None, None, 2, "2 usable cores, 0.45 busy with other work"),  # a little noise rounds away
    (2, 0.60, None, None, 1, "2 usable cores, 0.60 busy with other work"),
    (2, 2.00, 0.2, None, 1, "2 usable cores, 2.00 busy with other work"),  # two busy processes just started
    (2, 2.00, None, None, 1, "2 usable cores, 2.00 busy with other work"),
    (8, 3.10, None, None, 5, "8 usable cores, 3.10 busy with other work"),
    (8, 9.00, None, None, 1, "8 usable cores, 9.00 busy with other work"),  # never fewer than one thread
    (2, None, 0.10, None, 2, "2 usable cores, 1-minute load 0.10"),  # no /proc/stat: the load average
    (2, None, 1.60, None, 1, "2 usable cores, 1-minute load 1.60"),
    (4, None, 32.0, 64, 2, "4 usable cores, 1-minute load 32.00"),  # a 4-CPU cpuset of 64: load scaled to it
    (2, None, None, None, 2, "2 usable cores, 1-minute load 0.00"),  # no load information: every usable core
])
def test_choose_threads_from_free_cores(monkeypatch, cores, busy, load, cpu_count, expected, why):
    fake_machine(monkeypatch, cores, busy, load, cpu_count)
    assert cli_main.choose_threads(None, environ={}) == (expected, why)


def test_threads_flag_then_omp_num_threads_win_over_the_load(monkeypatch):
    fake_machine(monkeypatch, cores=2, busy=2.0)
    assert cli_main.choose_threads(3, environ={"OMP_NUM_THREADS": "1"}) == (3, "--threads")
    assert cli_main.choose_threads(None, environ={"OMP_NUM_THREADS": " 4 "}) == (None, "OMP_NUM_THREADS=4")
    assert cli_main.choose_threads(None, environ={"OMP_NUM_THREADS": ""})[0] == 1  # empty: not set


def test_usable_cores_falls_back_to_cpu_count(monkeypatch):
    monkeypatch.delattr(cli_main.os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(cli_main.os, "cpu_count", lambda: 6)
    assert cli_main.usable_cores() == 6
    monkeypatch.setattr(cli_main.os, "cpu_count", lambda: None)
    assert cli_main.usable_cores() == 1


def test_busy_cores_now_reads_proc_stat_for_usable_cpus_only(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    # 100 ticks pass on each CPU: cpu0 75 busy (user/system/steal), cpu1 10 busy (90 idle + iowait), cpu2 all busy.
    snapshots = iter([
        "cpu  0 0 0 0 0 0 0 0 0 0\ncpu0 100 0 100 800 0 0 0 0 0 0\ncpu1 100 0 100 800 0 0 0 0 0 0\n"
        "cpu2 0 0 0 0 0 0 0 0 0 0\nintr 1 2 3\nprocs_running 3\n",
        "cpu  0 0 0 0 0 0 0 0 0 0\ncpu0 150 0 120 825 0 0 0 5 7 0\ncpu1 105 0 105 880 10 0 0 0 0 0\n"
        "cpu2 100 0 0 0 0 0 0 0 0 0\nintr 1 2 3\nprocs_running 3\n",
    ])
    real_sleep = cli_main.time.sleep
    monkeypatch.setattr(cli_main.time, "sleep", lambda seconds: stat.write_text(next(snapshots)))
    stat.write_text(next(snapshots))
    assert cli_main.busy_cores_now(window=0, cpus={0, 1}, path=str(stat)) == pytest.approx(0.85)
    monkeypatch.setattr(cli_main.time, "sleep", real_sleep)
    assert cli_main.busy_cores_now(window=0, cpus={0, 7}, path=str(stat)) is None  # cpu7 is not in the file
    assert cli_main.busy_cores_now(window=0, cpus={0}, path=str(tmp_path / "missing")) is None
    assert cli_main.busy_cores_now(window=0, cpus={0, 1}, path=str(stat)) == 0.0  # no ticks passed: nothing busy


@pytest.mark.parametrize("argv, env, busy, inside, why", [
    (["--threads", "3"], {"OMP_NUM_THREADS": "1"}, 2.0, 3, "--threads"),
    ([], {}, 2.0, 1, "2 usable cores, 2.00 busy with other work"),
    ([], {}, 0.1, 2, "2 usable cores, 0.10 busy with other work"),
    ([], {"OMP_NUM_THREADS": "1"}, 0.0, None, "OMP_NUM_THREADS=1"),
])
def test_main_sets_logs_records_and_restores_threads(monkeypatch, capsys, argv, env, busy, inside, why):
    fake_machine(monkeypatch, cores=2, busy=busy)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    seen = {}

    def run(args):
        seen.update(torch_threads=torch.get_num_threads(), threads=args.threads, why=args.threads_chosen_by)
        return 0

    monkeypatch.setattr(SUBCOMMANDS["demo"], "run", run)
    before = torch.get_num_threads()
    torch.set_num_threads(5)  # what an in-process caller had; main must give it back
    try:
        assert main(["demo", *argv]) == 0
        assert torch.get_num_threads() == 5
    finally:
        torch.set_num_threads(before)
    expected = 5 if inside is None else inside  # OMP_NUM_THREADS set: torch left as it is
    assert seen == {"torch_threads": expected, "threads": expected, "why": why}
    log = capsys.readouterr().err.strip().splitlines()[-1]
    assert log.startswith(f"cuttlefish-hf demo: {expected} torch thread{'s' * (expected != 1)} ({why}")
    assert ("set --threads N or OMP_NUM_THREADS to override" in log) == (why != "--threads")


def test_threads_flag_must_be_a_positive_integer(capsys):
    code, _, err = cli("demo", "--threads", "0", capsys=capsys)
    assert code == 2 and "--threads: expected an integer >= 1, got '0'" in err
