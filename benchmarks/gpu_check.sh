#!/usr/bin/env bash
# One prepared GPU check (at most ~10 minutes on one H100/H200-class card): the layer-speed grid in bf16 and fp16,
# and a short CuttlefishTrainer run on random-init BERT-base and DeiT-small sizes (step time before/after the switch).
# Results: benchmarks/results/*_cuda_*.json, named after the card in gpu_check_<card>.json.
#   bash benchmarks/gpu_check.sh            # needs torch with CUDA, transformers, timm installed (pip install -e .[dev])
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
OUT=${OUT_DIR:-benchmarks/results}
card=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
mkdir -p "$OUT"
for dtype in bf16 fp16; do
  timeout 150 $PY benchmarks/layer_speed.py --device cuda --dtype "$dtype" --output "$OUT/layer_speed_cuda_${dtype}_${card}.json"
done
timeout 150 $PY benchmarks/step_time.py --model bert-base --device cuda --dtype bf16 --batch-size 32 --steps 120 \
  --output "$OUT/step_time_bert-base_cuda_bf16_${card}.json"
timeout 150 $PY benchmarks/step_time.py --model deit-small --device cuda --dtype bf16 --batch-size 128 --steps 120 \
  --output "$OUT/step_time_deit-small_cuda_bf16_${card}.json"
$PY - "$OUT" "$card" <<'PY'
import glob, json, sys
out, card = sys.argv[1], sys.argv[2]
summary = {path: json.load(open(path)) for path in sorted(glob.glob(f"{out}/*_cuda_*{card}.json"))}
json.dump(summary, open(f"{out}/gpu_check_{card}.json", "w"), indent=2)
print(f"wrote {out}/gpu_check_{card}.json")
PY
