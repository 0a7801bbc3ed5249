"""Two CPU processes (gloo) through CuttlefishTrainer: one plan, identical factors, gradients synchronized."""

import os
import subprocess
import sys

import pytest
import torch
from helpers import free_port


@pytest.mark.parametrize("weights, rank_rule", [("scratch", "stable_rank"), ("pretrained", "kind_fractions"),
                                                ("compiled", "stable_rank")])
def test_two_process_ddp_run_factorizes_identically(tmp_path, weights, rank_rule):
    here = os.path.dirname(__file__)
    env = {**os.environ, "PYTHONPATH": here + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), os.path.join(here, "ddp_train.py"), str(tmp_path), weights]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{i}.pt") for i in range(2)]
    assert ranks[0]["plan"] and ranks[0]["plan"] == ranks[1]["plan"]
    assert 0 < ranks[0]["switch_step"] == ranks[1]["switch_step"] < ranks[0]["max_steps"]
    assert ranks[0]["wrapped"] == "DistributedDataParallel"
    # torch_compile=True: the DDP wrapper built at the switch is compiled too, and traced once more
    assert ranks[0]["compiled"] is (weights == "compiled")
    assert (ranks[0]["compiled_graphs_low_rank"] >= 1) is (weights == "compiled")
    assert ranks[0]["rank_rule"] == ranks[1]["rank_rule"] == rank_rule
    # Trained for several steps after the switch on different data shards: equal only if gradients were synced.
    for key, value in ranks[0]["factors"].items():
        torch.testing.assert_close(ranks[1]["factors"][key], value, rtol=0, atol=1e-6)
