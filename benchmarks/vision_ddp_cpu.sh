#!/usr/bin/env bash
# Two CPU processes (DDP over gloo) through `accelerate launch`: examples/vision/train.py in Cuttlefish mode on a
# Fashion-MNIST subset. Rank 0 decides the plan and broadcasts it; the loop re-wraps the model in a new DDP after
# the switch. Each process reports its switch step, plan and a fingerprint of its weights after training on its
# own data shard; the output is committed as benchmarks/results/vision_ddp_cpu.txt.
#
#   bash benchmarks/vision_ddp_cpu.sh [DATA_DIR]      # default: /usr/share/datasets/fashion-mnist (~2 min)
#
# On a machine without GPUs, `accelerate launch --multi_gpu` starts the processes like torchrun and the script's
# --cpu makes Accelerate use gloo (`--cpu --num_processes 2` alone starts one process unless mpirun is configured).
# `torchrun --nproc_per_node 2 examples/vision/train.py --cpu ...` does the same.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR=${1:-/usr/share/datasets/fashion-mnist}
OUT=outputs/vision_ddp_cpu
RESULT=benchmarks/results/vision_ddp_cpu.txt
PYTHON=${PYTHON:-.venv/bin/python}
rm -rf "$OUT"
mkdir -p "$OUT" benchmarks/results

COMMAND=(-m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no
         --dynamo_backend no --main_process_port 29581 examples/vision/train.py --cpu --data-dir "$DATA_DIR"
         --output-dir "$OUT" --mode cuttlefish --model deit_tiny_patch16_224 --img-size 28 --patch-size 7
         --in-chans 1 --embed-dim 64 --depth 2 --num-heads 2 --epochs 4 --batch-size 64 --train-subset 4096
         --eval-subset 2000 --crop-scale 0.8 1.0 --color-jitter 0 --num-workers 0 --lr 2e-3)
OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 "$PYTHON" "${COMMAND[@]}" > "$OUT/log.txt" 2>&1

"$PYTHON" - "$OUT/results.json" "${COMMAND[*]}" <<'EOF' | tee "$RESULT"
import json, sys

results = json.load(open(sys.argv[1]))
first, second = results["processes"]
machine = results["machine"]
print("Cuttlefish with 2 CPU processes (DDP, gloo) through accelerate launch")
print(f"command: python {sys.argv[2]}")
print(f"machine: {machine['cpu_count']} cores, device {machine['device']}, {machine['num_processes']} processes, "
      f"mixed precision {machine['mixed_precision']}, versions {machine['versions']}")
print(f"per-process optimizer steps: {results['steps']} (batch 64 per process, 4,096 training images)")
for view in results["processes"]:
    print(f"process {view['process_index']}: switch step {view['switch_step']}, {len(view['plan'])} layers "
          f"factorized, ranks {sorted(view['plan'].values())}, weights sum {view['weights_sum']!r}, "
          f"norm {view['weights_norm']!r}")
print(f"same switch step: {first['switch_step'] == second['switch_step']}")
print(f"same plan: {first['plan'] == second['plan']} ({first['plan']})")
print(f"steps after the switch: {results['steps_after_switch']}")
same = first["weights_sum"] == second["weights_sum"] and first["weights_norm"] == second["weights_norm"]
print(f"identical weights after training on different shards (bitwise sum and norm): {same}")
print(f"parameters: {results['params_before']:,} -> {results['params_after']:,}; "
      f"test accuracy (2,000 images) per epoch: {[round(e['eval_accuracy'], 2) for e in results['epochs']]}")
print(f"wall time {results['wall_seconds']:.1f} s (shared machine; noisy)")
EOF
