"""Cuttlefish's log lines follow transformers' verbosity: ``transformers.logging.set_verbosity_*()`` and
``TrainingArguments(log_level=...)`` quiet or open them as they do transformers' own."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import transformers
from helpers import KeywordDataset, tiny_bert
from transformers import Trainer, TrainingArguments

from cuttlefish_hf import Cuttlefish, CuttlefishCallback, CuttlefishConfig

SWITCH_SUMMARY = "Cuttlefish switched to low rank"
RANK_RULE_LINE = "Cuttlefish will switch"  # INFO, at begin(): when, which rule, which init
UNKNOWN_KEYS_LINE = "Ignoring unknown CuttlefishConfig keys"  # WARNING


@pytest.fixture(autouse=True)
def default_verbosity():
    """Start at the defaults and put back what was there: both levels are process-wide."""
    library = logging.getLogger("cuttlefish_hf")
    saved = transformers.logging.get_verbosity(), library.level
    transformers.logging.set_verbosity_warning()
    library.setLevel(logging.NOTSET)
    yield
    transformers.logging.set_verbosity(saved[0])
    library.setLevel(saved[1])


def cuttlefish_lines(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name.startswith("cuttlefish_hf")]


def library_calls(caplog) -> str:
    """One INFO line and one WARNING line from plain library calls; returns what reached the root logger."""
    caplog.clear()
    Cuttlefish(tiny_bert(), CuttlefishConfig(rank_rule="stable_rank"), total_steps=100).begin()
    CuttlefishConfig.from_dict({"future_knob": 1})
    return "\n".join(cuttlefish_lines(caplog))


def test_library_calls_follow_transformers_verbosity(caplog):
    transformers.logging.set_verbosity_info()
    lines = library_calls(caplog)
    assert RANK_RULE_LINE in lines and UNKNOWN_KEYS_LINE in lines
    transformers.logging.set_verbosity_warning()
    lines = library_calls(caplog)
    assert RANK_RULE_LINE not in lines and UNKNOWN_KEYS_LINE in lines
    transformers.logging.set_verbosity_error()
    assert library_calls(caplog) == ""


@pytest.mark.parametrize("quiet", [None, "log_level", "set_verbosity_error"])
def test_trainer_shows_the_switch_summary_unless_told_to_be_quiet(tmp_path, caplog, quiet):
    if quiet == "set_verbosity_error":
        transformers.logging.set_verbosity_error()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=16, num_train_epochs=1,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                             log_level="error" if quiet == "log_level" else "passive")
    config = CuttlefishConfig(mode="pufferfish", rank_ratio=0.25, fixed_warmup_fraction=0.25)
    callback = CuttlefishCallback(config)
    Trainer(model=tiny_bert(), args=args, train_dataset=KeywordDataset(), callbacks=[callback]).train()
    assert callback.controller.switched
    lines = cuttlefish_lines(caplog)
    if quiet is None:  # Trainer shows warnings by default, and the callback logs the summary as one
        assert any(SWITCH_SUMMARY in line for line in lines)
    else:
        assert lines == []


def test_cuttlefish_verbosity_can_be_set_apart_from_transformers(caplog):
    from cuttlefish_hf import logging_utils

    transformers.logging.set_verbosity_error()
    logging_utils.set_verbosity_info()
    assert logging_utils.get_verbosity() == logging.INFO
    lines = library_calls(caplog)
    assert RANK_RULE_LINE in lines and UNKNOWN_KEYS_LINE in lines
    logging_utils.set_verbosity(logging.NOTSET)  # follow transformers again
    assert logging_utils.get_verbosity() == logging.ERROR
    assert library_calls(caplog) == ""


PROBE = """
import logging, sys, transformers
from cuttlefish_hf.logging_utils import get_logger
log = get_logger("cuttlefish_hf.probe")
for name in sys.argv[1:]:
    transformers.logging.set_verbosity(getattr(logging, name))
    log.info("info at %s", name)
    log.warning("warning at %s", name)
"""


def probes(*runs: tuple[list[str], dict[str, str]]) -> list[set[str]]:
    """For each run (transformers verbosities, environment variables): the lines a script that configures no
    logging prints to stderr at each verbosity. A fresh interpreter each, as the point is a process where nothing
    configured logging and the environment is read at import; they run side by side."""
    base = {key: value for key, value in os.environ.items() if key != "CUTTLEFISH_VERBOSITY"}
    processes = [subprocess.Popen([sys.executable, "-c", PROBE, *verbosities], env=base | env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for verbosities, env in runs]
    try:
        errors = [process.communicate(timeout=120)[1] for process in processes]
    finally:
        for process in processes:
            process.kill()  # a no-op once it has exited
            process.wait()
    assert [process.returncode for process in processes] == [0] * len(runs), errors
    return [{line for line in error.splitlines() if " at " in line} for error in errors]


def test_without_logging_configured_lines_print_at_transformers_verbosity_or_cuttlefish_verbosity():
    # Python's last resort prints only warnings; transformers' own handler prints what its verbosity lets through.
    following, own_level = probes((["WARNING", "INFO", "ERROR"], {}), (["ERROR"], {"CUTTLEFISH_VERBOSITY": "info"}))
    assert following == {"warning at WARNING", "info at INFO", "warning at INFO"}
    assert own_level == {"info at ERROR", "warning at ERROR"}
