#!/usr/bin/env bash
# One prepared GPU check (at most ~10 minutes on one H100/H200-class card): the layer-speed grid in bf16 and fp16,
# and a short CuttlefishTrainer run on random-init BERT-base and DeiT-small sizes (step time before/after the switch).
# Results: one JSON (+ markdown table) per check, named after the card, and gpu_check_<card>.json with all of them.
#   bash benchmarks/gpu_check.sh                      # writes to benchmarks/results/
#   OUT_DIR=/tmp/gpu bash benchmarks/gpu_check.sh     # somewhere else
# Needs torch with CUDA, transformers and timm; runs from the checkout (no install needed). A failed check is
# reported and the others still run.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
OUT=${OUT_DIR:-benchmarks/results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv || true
$PY -c "import torch, transformers, timm; print('torch', torch.__version__, 'transformers', transformers.__version__, 'timm', timm.__version__)"
card=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))") || exit 1
failed=()
check() {  # check NAME COMMAND...: run one check under a time limit, note a failure, go on
  local name=$1; shift
  echo "== $name"
  local start=$SECONDS
  timeout 100 "$@" || failed+=("$name")
  echo "== $name took $((SECONDS - start)) s"
}
for dtype in bf16 fp16; do
  check "layer_speed $dtype" $PY benchmarks/layer_speed.py --device cuda --dtype "$dtype" \
    --output "$OUT/layer_speed_cuda_${dtype}_${card}.json"
done
# Two batch sizes each: at small batches an H100 step is bound by kernel launches, not arithmetic.
for batch in 32 128; do
  check "step_time bert-base batch $batch" $PY benchmarks/step_time.py --model bert-base --device cuda --dtype bf16 \
    --batch-size $batch --steps 300 --output "$OUT/step_time_bert-base_cuda_bf16_b${batch}_${card}.json"
done
for batch in 128 256; do
  check "step_time deit-small batch $batch" $PY benchmarks/step_time.py --model deit-small --device cuda --dtype bf16 \
    --batch-size $batch --steps 300 --output "$OUT/step_time_deit-small_cuda_bf16_b${batch}_${card}.json"
done
$PY - "$OUT" "$card" <<'PY'
import glob, json, sys
out, card = sys.argv[1], sys.argv[2]
summary = {path.rsplit("/", 1)[-1]: json.load(open(path)) for path in sorted(glob.glob(f"{out}/*_cuda_*{card}.json"))}
json.dump(summary, open(f"{out}/gpu_check_{card}.json", "w"), indent=2)
print(f"wrote {out}/gpu_check_{card}.json with {len(summary)} results")
PY
if ((${#failed[@]})); then echo "FAILED: ${failed[*]}"; exit 1; fi
