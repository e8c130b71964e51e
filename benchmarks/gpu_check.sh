#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA GPU (not run in CI). Inside about 8 minutes it
#   1. runs the tests that need CUDA (the others skip or run on the CPU as in CI),
#   2. times `faspx prune` of SmolLM2-135M (quality, 128 x 2048 C4 tokens) against one dense bf16 forward
#      over the same tokens,
#   3. benchmarks dense vs pruned with torch, onnxruntime and vLLM on the GPU (vLLM where .venv-vllm or
#      FASPX_VLLM_PYTHON has a CUDA build; otherwise the report says it was skipped and why),
# writing everything into one folder (default gpu-check/). Usage: bash benchmarks/gpu_check.sh [OUT]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-check}
PY=${PY:-.venv/bin/python}
FASPX=${FASPX:-.venv/bin/faspx}
MODEL=${MODEL:-$($PY -m faspx.demo_model | tail -1)}
C4=${C4:-../shared/data/c4-validation-2k.parquet}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'" || exit 2

timeout 120 $PY -m pytest -q tests/test_prune.py -k cuda > "$OUT/tests-cuda.txt" 2>&1
echo "cuda tests: exit $?" | tee -a "$OUT/summary.txt"

# one dense bf16 forward over the calibration tokens: the unit of the prune's time
timeout 120 $PY - "$MODEL" "$C4" > "$OUT/dense-forward.json" <<'PYEOF'
import json, sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from faspx.data import calibration_ids
model_dir, calib = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(model_dir)
ids = calibration_ids(tok, calib, 128, 2048, seed=0)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
with torch.no_grad():
    model(ids[:1].cuda(), use_cache=False)  # warm-up
    torch.cuda.synchronize(); start = time.perf_counter()
    for row in ids:
        model(row[None].cuda(), use_cache=False)
    torch.cuda.synchronize()
print(json.dumps({"dense_forward_s": time.perf_counter() - start, "tokens": ids.numel(),
                  "gpu": torch.cuda.get_device_name()}))
PYEOF
echo "dense forward: $(cat "$OUT/dense-forward.json")" | tee -a "$OUT/summary.txt"

start=$(date +%s)
timeout 300 $FASPX build --model "$MODEL" --sparsity 0.3 --calib "$C4" --nsamples 128 --seqlen 2048 \
  --device cuda --target all --out "$OUT/build" --force -q > "$OUT/build.txt" 2>&1
echo "faspx build (quality, 0.3): exit $?, $(( $(date +%s) - start )) s wall; timings in $OUT/build/fasp.json" \
  | tee -a "$OUT/summary.txt"
$PY -c "import json,sys; print(json.load(open(sys.argv[1]))['timings'])" "$OUT/build/fasp.json" \
  | tee -a "$OUT/summary.txt"

timeout 240 $FASPX bench --dense "$MODEL" --pruned "$OUT/build" --backend torch,onnxruntime,vllm --device cuda \
  --batch 1,8 --repeats 3 --out "$OUT/bench" --force > "$OUT/bench.txt" 2>&1
echo "faspx bench: exit $?" | tee -a "$OUT/summary.txt"
cat "$OUT/bench.txt" >> "$OUT/summary.txt"
