#!/usr/bin/env bash
# Every GPU check in one script, for a session that is lent a GPU machine (15 minutes a session,
# so everything runs concurrently on the one card, time-boxed to $LIMIT seconds):
#
#   phase A  pretrain the ANCHORS-size Fashion-MNIST base (6.8M params) and the shipped-size
#            one (1.1M) side by side, each with a wall-clock budget; train the faithfulness
#            reference classifier
#   phase B  on the 6.8M base: the faithfulness sweep; the SSL gain protocol: for 3
#            independent repetitions (own split, seeds, adapters and samples), the pipeline's
#            stages up to the shards, then supervised, baseline, augmented and control arms,
#            one process each on the card; the second round (augmented-r2, selftrain)
#            after each baseline; the paired table (bench/ssl_gain.py) at the end
#            generative transfer (bench/transfer.py) on both bases, if time is left
#   phase C  if time is left: the speed benches, alone on the card (the
#            FixMatch step pipelined vs the model-only ceiling, grouped vs dense augmentation;
#            4 classifier units side by side vs 1; masked sampling eager and compiled vs
#            DDIMPipeline fp16 and the compiled forward ceiling)
#
# The GPU machine has torch but not our other dependencies and no internet: the call carries
# wheels (.whl) and Fashion-MNIST (.fmnist, xz), made here by `bash bench/gpu_prepare.sh`,
# and this script installs them:
#   run(command="bash bench/gpu_all.sh", carry=[".whl", ".fmnist"], timeout_s=600)
# Knobs (environment): LIMIT (seconds, default 545), LARGE_S (6.8M pretraining budget, 200),
# SSL_STEPS (4096), LOOP_K (round-2 pseudo-labels per class, 50), SKIP_SMALL=1 (do not retrain
# the 1.1M model), ONLY_SPEED=1 (skip phases A and B: the speed figures in one short call).
# TINY=1 runs the same steps at toy sizes on CPU (PY=.venv/bin/python), to test this script
# before spending GPU time. Results: $OUT/summary.txt, $OUT/results.tar.gz (logs, sweep cells,
# sample grids, arm metrics; refreshed every 20 s), $OUT/base_*.tar (the new base models).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-runs/gpu_all}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
TINY=${TINY:-0}
LIMIT=${LIMIT:-545}   # seconds from start; every job is killed by then, results packed after
W=${WORK:-/tmp/gpu_all}
rm -rf "$W"; mkdir -p "$W/logs"
start=$SECONDS
left() { echo $((LIMIT - (SECONDS - start))); }
say() { echo "[$((SECONDS - start)) s] $*" | tee -a "$OUT/summary.txt"; }
export HF_HUB_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false TQDM_DISABLE=1 PYTHONUNBUFFERED=1

# --- set-up: carried wheels and data (GPU machine only) ---
if [ -d .whl ] && [ "$TINY" != 1 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { say "wheel install failed"; exit 3; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
if [ -d .fmnist ] && [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  mkdir -p /usr/share/datasets/fashion-mnist
  for f in .fmnist/*.xz; do xz -dc "$f" > "/usr/share/datasets/fashion-mnist/$(basename "$f" .xz)"; done
  cp .fmnist/*.gz /usr/share/datasets/fashion-mnist/
fi
PY=${PY:-python3}
"$PY" - <<'EOF' 2>&1 | tee -a "$OUT/summary.txt" || exit 3
import diffusers, kornia, pydantic, torch, transformers
import bench.faithfulness, bench.ssl_gain, pipeline.stages  # noqa: F401
from pipeline.data.datasets import load_dataset
ds = load_dataset("fashion-mnist")
dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
print(f"torch {torch.__version__} on {dev}; diffusers {diffusers.__version__}, kornia "
      f"{kornia.__version__}, transformers {transformers.__version__}; "
      f"{len(ds.train_images)} train images")
EOF
[ "${PIPESTATUS[0]}" = 0 ] || { say "imports failed"; exit 3; }

if [ "$TINY" = 1 ]; then
  DEV=cpu; T=1
  LARGE=(--set 'block_out_channels=[16,32]' --set 'attention_levels=[1]' --set attention_head_dim=8
         --set steps=3 --set batch_size=8 --set sample_steps=2 --set time_limit_s=60)
  SMALL=(--set 'block_out_channels=[8,16]' --set 'attention_levels=[1]' --set attention_head_dim=8
         --set steps=3 --set batch_size=8 --set sample_steps=2 --set time_limit_s=60)
  REF=(--reference-width 4 --reference-epochs 1)
  SSL=(--steps 4 --batch-size 8 --mu 1 --curve-points 2 --set ssl.control_pool=200)
  LOOP=(--set loop.threshold=0 --set loop.per_class=3)  # a 4-step classifier is never sure
  TRANSFER=(--steps 2 --samples 8 --max-held-out 40)
  SYN=(--set tuning.steps=2 --set tuning.batch_size=4 --set sampling.per_condition=2
       --set sampling.num_inference_steps=2 --set sampling.batch_size=16 --set labels_per_class=2
       --set quality.reference.epochs=1 --set encoder=efficientnet-lite0@128
       --set neighbors.pool=200 --set filter.copy_pool=200)
  FAITH=(--classes 0,1 --tune-steps 2 --guidance 0,3 --mask-ratios 0,0.5 --per-condition 2
         --inference-steps 2 --real-per-class 10 --set tuning.batch_size=4
         --set labels_per_class=2 --set encoder=efficientnet-lite0@128 --set neighbors.pool=200
         --set filter.copy_pool=200)
  SSL+=(--set labels_per_class=2)
else
  DEV=cuda; T=2
  # ANCHORS.md recipe: 6.8M params, batch 256, AdamW 2e-4, bf16, EMA (3.3k steps in 225 s).
  LARGE=(--set 'block_out_channels=[64,128,128]' --set 'attention_levels=[1,2]'
         --set layers_per_block=2 --set steps=3300 --set batch_size=256 --set lr=0.0002
         --set warmup_steps=300 --set checkpoint_every=1000 --set time_limit_s=${LARGE_S:-200})
  # The shipped architecture (1.1M), with the GPU's batch: 3000 steps at batch 64 on CPU before.
  SMALL=(--set steps=12000 --set batch_size=256 --set warmup_steps=300
         --set checkpoint_every=2000 --set time_limit_s=200)
  REF=(--reference-width 32 --reference-epochs 8)
  SSL=(--steps "${SSL_STEPS:-4096}")
  LOOP=(--set loop.per_class="${LOOP_K:-50}" --set loop.per_condition=4)
  TRANSFER=(--steps 2000 --samples 500)
  SYN=(--set tuning.steps=300 --set sampling.per_condition=32 --set sampling.num_inference_steps=25)
  FAITH=(--tune-steps 300 --scopes per-class --token-sets patch --guidance 0,1,3
         --mask-ratios 0,0.5 --per-condition 16 --inference-steps 25)
fi
COMMON=(--device "$DEV" --threads "$T" --quiet)
REFCACHE=$W/reference

pack() {  # results.tar.gz: logs and small result files, written atomically
  tar -czf "$OUT/.results.tmp" -C "$W" --exclude='*.parquet' --exclude='*.pt' \
    --exclude='*.safetensors' --exclude='*.npy' --exclude='*.npz' --exclude='checkpoints' \
    --exclude='base_*' --exclude='reference' . 2>/dev/null && mv "$OUT/.results.tmp" "$OUT/results.tar.gz"
}
( while sleep 20; do pack; done ) & PACKER=$!

bg() {  # bg NAME COMMAND...: run in the background, time-boxed, log to $W/logs/NAME.log; pid in LAST
  local name=$1; shift
  local t; t=$(left); [ "$t" -gt 1 ] || t=1
  ( timeout --signal=INT --kill-after=10 "$t" "$@" < /dev/null
    echo "rc=$? at $((SECONDS - start)) s" ) > "$W/logs/$name.log" 2>&1 &
  LAST=$!
}
finished() { tail -n 1 "$W/logs/$1.log"; }

if [ "${ONLY_SPEED:-0}" != 1 ]; then
# --- phase A ---
say "phase A: pretrain x2, reference classifier"
bg pretrain_large "$PY" -m flows.cli pretrain --out "$W/base_large" --no-progress "${LARGE[@]}"
P_LARGE=$LAST
if [ "${SKIP_SMALL:-0}" = 1 ]; then mkdir -p "$W/base_small"; true & else
  bg pretrain_small "$PY" -m flows.cli pretrain --out "$W/base_small" --no-progress "${SMALL[@]}"; fi
P_SMALL=$!
cat > "$W/reference.py" <<'EOF'
import sys
from pipeline.data.datasets import load_dataset
from pipeline.evaluate.reference import ReferenceConfig, load_or_train_reference
cache, dev, width, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ref = load_or_train_reference(load_dataset("fashion-mnist"), cache,
                              ReferenceConfig(width=width, epochs=epochs), dev, False)
print(f"reference test accuracy {ref.test_accuracy:.4f} at {ref.path}")
EOF
bg reference "$PY" "$W/reference.py" "$REFCACHE" "$DEV" "${REF[1]}" "${REF[3]}"
P_REF=$LAST
SSL_ARGS=(--preset fashion-mnist-40labels "${SSL[@]}" --runs-dir "$W/ssl/runs"
          --set validation_per_class=500 --set loop.rounds=2 "${LOOP[@]}" "${COMMON[@]}")

wait "$P_LARGE"; say "pretrain_large: $(finished pretrain_large)"
tar -cf "$OUT/base_large.tar" -C "$W" --exclude=checkpoints base_large 2>/dev/null
wait "$P_REF"; say "reference: $(tail -n 2 "$W/logs/reference.log" | head -n 1)"

# --- phase B ---
say "phase B: faithfulness, synthetic shards, SSL arms (large base)"
bg faith_large "$PY" -m bench.faithfulness --base-model "$W/base_large" "${FAITH[@]}" \
  "${REF[@]}" --reference-cache "$REFCACHE" --out "$W/faith_large" "${COMMON[@]}"
P_FL=$LAST
# The SSL gain protocol: 3 independent repetitions (own split, seeds, adapters, samples), each
# with supervised, baseline, augmented and control arms, one process per arm on the card.
SSL_ARGS+=(--base-model "$W/base_large" "${SYN[@]}")
P_SYN=(); P_REAL=()
for r in 0 1 2; do
  bg "synth_$r" "$PY" -m bench.ssl_gain "${SSL_ARGS[@]}" --reps "$r" --generate-only
  P_SYN+=("$LAST")
done
wait "$P_SMALL"; [ "${SKIP_SMALL:-0}" = 1 ] || { say "pretrain_small: $(finished pretrain_small)"
tar -cf "$OUT/base_small.tar" -C "$W" --exclude=checkpoints base_small 2>/dev/null; }
for r in 0 1 2; do  # after its split exists: the real-data arms need nothing else
  wait "${P_SYN[$r]}"; say "synth_$r: $(finished "synth_$r")"
  for arm in supervised baseline augmented control; do
    bg "ssl_${arm}_$r" "$PY" -m bench.ssl_gain "${SSL_ARGS[@]}" --reps "$r" --arms "$arm"
    P_REAL+=("$LAST")
  done
done
# The second round: once a repetition's baseline is trained, its pseudo-labels,
# round-2 adapters, samples and shards, then augmented-r2 and selftrain (one process per rep).
P_R2=()
for r in 0 1 2; do
  wait "${P_REAL[$((4 * r + 1))]}"  # ssl_baseline_$r
  bg "ssl_round2_$r" "$PY" -m bench.ssl_gain "${SSL_ARGS[@]}" --reps "$r" \
    --arms augmented-r2,selftrain
  P_R2+=("$LAST")
done
for p in "${P_REAL[@]}" "${P_R2[@]}"; do wait "$p"; done
say "SSL arms: $(for r in 0 1 2; do for a in supervised baseline augmented control round2; do
  finished "ssl_${a}_$r"; done; done | tr '\n' ' ')"
# Every arm has finished (or run out of time): this only reads them for the paired table.
timeout 120 "$PY" -m bench.ssl_gain "${SSL_ARGS[@]}" --reps 0,1,2 --json "$W/ssl_gain.json" \
  --arms supervised,baseline,augmented,control,augmented-r2,selftrain \
  > "$W/logs/ssl_table.log" 2>&1
wait "$P_FL"; say "faith_large: $(finished faith_large)"

# Generative transfer at GPU size, on both bases: base untouched, ANL only, full
# fine-tuning and from scratch, at equal steps, 10 and 100 shots of sklearn's digits.
if [ "$(left)" -gt 60 ]; then
  for b in large small; do
    base=$W/base_$b; [ -d "$base" ] || base=$REPO/data/models/fashion-mnist-ddpm-32
    bg "transfer_$b" "$PY" -m bench.transfer --base-model "$base" "${TRANSFER[@]}" \
      --runs-dir "$W/transfer_$b" --set device="$DEV" --threads "$T" --quiet
  done
  wait "$LAST"; say "transfer: $(finished transfer_large) $(finished transfer_small)"
fi
fi  # ONLY_SPEED

# --- phase C: speed benches, alone on the card, in what time is left ---
if [ "$TINY" = 1 ]; then
  C_ANL=(--device cpu --size small --batch 4 --steps 2 --train-steps 2 --threads 1)
  C_SSL=(--device cpu --tiny --threads 1)
  C_ARMS=(--device cpu --tiny --units 1,2)
else
  C_ANL=(--device cuda); C_SSL=(--device cuda); C_ARMS=(--device cuda --units 1,4)
fi
if [ "$(left)" -gt 40 ]; then
  say "phase C: bench.ssl_step ($(left) s left)"
  timeout "$(($(left) - 10))" "$PY" -m bench.ssl_step "${C_SSL[@]}" > "$W/logs/bench_ssl_step.log" 2>&1
fi
if [ "$(left)" -gt 60 ]; then
  say "phase C: bench.arms_at_once ($(left) s left)"
  timeout "$(($(left) - 10))" "$PY" -m bench.arms_at_once "${C_ARMS[@]}" > "$W/logs/bench_arms.log" 2>&1
fi
if [ "$(left)" -gt 60 ]; then
  say "phase C: bench.anl ($(left) s left)"
  timeout "$(($(left) - 10))" "$PY" -m bench.anl "${C_ANL[@]}" > "$W/logs/bench_anl.log" 2>&1
fi
if [ "$(left)" -gt 90 ] && [ "$TINY" != 1 ]; then  # inductor takes minutes on a 2-core CPU
  say "phase C: bench.anl --compile ($(left) s left)"
  timeout "$(($(left) - 10))" "$PY" -m bench.anl "${C_ANL[@]}" --compile \
    > "$W/logs/bench_anl_compiled.log" 2>&1
fi

kill "$PACKER" 2>/dev/null
pack
say "done; logs in $OUT/results.tar.gz"
for f in "$W"/logs/*.log; do echo "== $(basename "$f")"; tail -n 30 "$f"; done > "$OUT/tails.txt"
# The last tables, for the call's output tail; a phase that did not run has no log (not a failure).
grep -h -A40 -E '^\| (tune steps|rep|pair) ' "$W/logs/faith_large.log" "$W/logs/ssl_table.log" \
  2>/dev/null | head -n 120 || true
