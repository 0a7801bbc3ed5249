#!/usr/bin/env bash
# One prepared GPU check (about 10 minutes on one H100/H200-class card), for issue #14's GPU targets: training
# steps before/after the switch in bf16 with the fused AdamW, torch.compile'd (BERT-base seq 128, DeiT-base, and
# BERT-large as the wider model) and eager (BERT-base, DeiT-base), device busy time and kernels per step;
# inference of BERT-base factorized against dense, eager and compiled; the layer speed grid; whether rounding ranks
# to multiples of 8/16/64 pays (rank_multiple's default). Each compiled run compiles twice (dense, then the
# factorized model), most of its time.
# Results: one JSON per check named after the card, step_time.md refreshed, gpu_check_<card>.json with all.
#   bash benchmarks/gpu_check.sh                      # writes to benchmarks/results/
#   OUT_DIR=/tmp/gpu bash benchmarks/gpu_check.sh     # somewhere else
#   DEVICE=cpu SMOKE=1 OUT_DIR=/tmp/smoke bash benchmarks/gpu_check.sh   # the plumbing, on a tiny BERT, on CPU
# Rerun-safe: a check whose JSON exists is skipped, so a rerun after a timeout finishes the rest. A failed check
# is reported and the others still run. Needs torch (CUDA), transformers and timm; runs from the checkout.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
OUT=${OUT_DIR:-benchmarks/results}
DEVICE=${DEVICE:-cuda}
SMOKE=${SMOKE:-0}
mkdir -p "$OUT"
if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv || true
  card=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))") || exit 1
  dtype=bf16
else
  card=cpu_smoke
  dtype=fp32
fi
$PY -c "import torch, transformers, timm; print('torch', torch.__version__, 'transformers', transformers.__version__, 'timm', timm.__version__)"
failed=()
check() {  # check NAME SECONDS OUTPUT COMMAND...: run one check under a time limit unless OUTPUT exists
  local name=$1 limit=$2 output=$3; shift 3
  if [ -s "$output" ]; then echo "== $name: done before ($output)"; return; fi
  echo "== $name"
  local start=$SECONDS
  timeout "$limit" "$@" --output "$output" || failed+=("$name")
  echo "== $name took $((SECONDS - start)) s"
}
step_time() {  # step_time MODEL BATCH [--compile]
  local model=$1 batch=$2 steps=150 compiled=${3:-}
  if [ "$SMOKE" = 1 ]; then model=tiny-bert; batch=4; steps=20; fi
  check "step_time $1 batch $2 $([ -n "$compiled" ] && echo compiled || echo eager)" 300 \
    "$OUT/step_time_${1}_${DEVICE}_${dtype}_b${2}${compiled:+_compiled}_${card}.json" \
    $PY benchmarks/step_time.py --model "$model" --device "$DEVICE" --dtype $dtype --batch-size "$batch" \
    --steps $steps $compiled
}
inference() {  # inference MODEL BATCH
  local model=$1 batch=$2 repeats=20
  if [ "$SMOKE" = 1 ]; then model=tiny-bert; batch=4; repeats=2; fi
  check "inference $1 batch $2" 300 "$OUT/inference_${1}_${DEVICE}_${dtype}_b${2}_${card}.json" \
    $PY benchmarks/inference.py --model "$model" --device "$DEVICE" --dtype $dtype --batch-size "$batch" \
    --repeats $repeats
}
# Compiled first: they are the targets (>= 1.2x for BERT-base and DeiT-base, >= 0.7 of the ideal for BERT-large).
step_time bert-base 128 --compile
step_time deit-base 128 --compile
step_time bert-large 64 --compile
step_time bert-base 128
step_time deit-base 128
inference bert-base 256
if [ "$SMOKE" != 1 ]; then
  check "layer_speed bf16" 120 "$OUT/layer_speed_cuda_bf16_${card}.json" \
    $PY benchmarks/layer_speed.py --device cuda --dtype bf16
  check "rank_multiple bf16" 120 "$OUT/rank_multiple_cuda_bf16_${card}.json" \
    $PY benchmarks/rank_multiple.py --device cuda --dtype bf16
else
  check "rank_multiple" 120 "$OUT/rank_multiple_${DEVICE}_${dtype}_${card}.json" \
    $PY benchmarks/rank_multiple.py --device "$DEVICE" --dtype $dtype --shapes 1 --tokens 64 --repeats 2
fi
$PY - "$OUT" "$card" <<'PY'
import glob, json, sys
out, card = sys.argv[1], sys.argv[2]
summary = {path.rsplit("/", 1)[-1]: json.load(open(path)) for path in sorted(glob.glob(f"{out}/*_{card}.json"))
           if not path.rsplit("/", 1)[-1].startswith("gpu_check_")}
json.dump(summary, open(f"{out}/gpu_check_{card}.json", "w"), indent=2)
print(f"wrote {out}/gpu_check_{card}.json with {len(summary)} results")
PY
[ "$OUT" = benchmarks/results ] && $PY benchmarks/step_time_table.py > /dev/null
if ((${#failed[@]})); then echo "FAILED: ${failed[*]}"; exit 1; fi
