#!/usr/bin/env bash
# Every GPU check in one script, for a session that is lent a GPU machine:
#   run(command="bash bench/gpu_all.sh", carry=[".venv"])   (results land in $OUT)
# TINY=1 runs the same steps at toy sizes on CPU, to test this script before spending GPU time.
# Each step's output goes to $OUT/<step>.txt; a failing step does not stop the others.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_all}
mkdir -p "$OUT"
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false TQDM_DISABLE=1
DEV=cuda
if [ "${TINY:-0}" = 1 ]; then DEV=cpu; fi

step() {  # step NAME COMMAND...
  local name=$1; shift
  echo "== $name: $*" | tee -a "$OUT/summary.txt"
  local t0=$SECONDS
  "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "   rc=$rc, $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
  tail -n 25 "$OUT/$name.txt"
}

{ nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"; } \
  > "$OUT/device.txt"
if [ "${TINY:-0}" = 1 ]; then
  step anl "$PY" -m bench.anl --device cpu --size small --batch 4 --steps 2 --train-steps 2 --threads 1
  step ssl "$PY" -m bench.ssl_step --device cpu --steps 2 --threads 1
  step pretrain "$PY" -m pipeline.pretrain --out "$OUT/base" --no-progress \
    --set steps=4 --set batch_size=8 --set sample_steps=2 --set checkpoint_every=2
else
  # Issue 3: sampling vs U-Net forward ceiling, adapter vs full tuning (DDPM-CIFAR10 + CLIP shapes).
  step anl "$PY" -m bench.anl --device cuda
  step anl_compile "$PY" -m bench.anl --device cuda --compile
  # Issue 4: FixMatch step at the USB shape (ANCHORS ceiling 65 steps/s on an H200).
  step ssl "$PY" -m bench.ssl_step --device cuda
  step ssl_compile "$PY" -m bench.ssl_step --device cuda --compile
  # Issue 7: the ANCHORS-size Fashion-MNIST base model (6.8M params); copy it to data/models
  # and rerun `python -m pipeline.model_card ... --force` afterwards.
  step pretrain "$PY" -m pipeline.pretrain --out "$OUT/fashion-mnist-ddpm-32" --no-progress \
    --set block_out_channels=[64,128,128] --set attention_levels=[1,2] --set layers_per_block=2 \
    --set steps=4000 --set batch_size=256 --set lr=2e-4 --set warmup_steps=500
fi
echo "results in $OUT"
