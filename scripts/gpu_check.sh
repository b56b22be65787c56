#!/usr/bin/env bash
# GPU readiness check, about 5 minutes on one H100 (at most 8):
#   1. JAX must see a GPU. If it does not, try `pip install jax[cuda12]==0.10.2` once (a GPU
#      machine without internet fails here, clearly, instead of benchmarking the CPU).
#   2. The training-step benchmark (`python -m alexnet_jax.bench`: the real pmapped train_step on
#      synthetic data made on the device, compilation excluded, median of 20 steps) at global
#      batch 128, 256 and 512, in float32 and bfloat16.
#   3. The input-pipeline benchmark `scripts/bench_input.py`, if it exists (skipped otherwise).
# Results go to $OUT if set, else runs/gpu_check/: bench_train.jsonl (one JSON line per setting),
# bench_input.txt and gpu_check.log (everything printed).
#
#   bash scripts/gpu_check.sh            # or: OUT=/some/dir bash scripts/gpu_check.sh
# A dry run of the script itself on a CPU:
#   ALLOW_CPU=1 BATCH_SIZES=8 STEPS=2 INPUT_ARGS="--images 96 --batch 16 --steps 2 --rounds 1" \
#     bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR="${OUT:-runs/gpu_check}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1
PY="${PYTHON:-python}"
JAX_CUDA="${JAX_CUDA:-jax[cuda12]==0.10.2}"  # keep in step with requirements.txt's jax pin
BATCH_SIZES="${BATCH_SIZES:-128,256,512}"
STEPS="${STEPS:-20}"
read -r -a INPUT_ARGS <<<"${INPUT_ARGS:---cores 1}"

fail() {
  echo "gpu_check: FAILED: $*"
  exit 1
}

gpu_devices() {  # prints the GPU devices JAX sees; exit status 0 if there is at least one
  "$PY" - <<'EOF'
import sys
import jax
gpus = [d for d in jax.devices() if d.platform == "gpu"]
print(f"jax {jax.__version__}: {jax.devices()}")
sys.exit(0 if gpus else 1)
EOF
}

echo "gpu_check: $(date -u +%FT%TZ) on $(hostname); results in $OUT_DIR"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv,noheader

if [[ "${ALLOW_CPU:-0}" == 1 ]]; then
  echo "gpu_check: ALLOW_CPU=1: running on whatever JAX sees (a dry run of this script)"
elif ! gpu_devices; then
  echo "gpu_check: JAX sees no GPU; trying: pip install '$JAX_CUDA' (needs internet or a wheel dir)"
  timeout 120 "$PY" -m pip install --quiet --retries 0 --timeout 15 "$JAX_CUDA" \
    || fail "JAX has no CUDA backend and '$JAX_CUDA' could not be installed (no internet?). \
Install it where there is a network (or point PIP_FIND_LINKS at its wheels), then rerun."
  gpu_devices || fail "'$JAX_CUDA' is installed but JAX still sees no GPU: check the NVIDIA \
driver (nvidia-smi) and CUDA 12 libraries; the error above says which."
fi

echo "gpu_check: training-step benchmark (batch $BATCH_SIZES; float32, bfloat16)"
rm -f "$OUT_DIR/bench_train.jsonl"
timeout 300 "$PY" -m alexnet_jax.bench --batch_sizes "$BATCH_SIZES" --dtypes float32,bfloat16 \
  --steps "$STEPS" --warmup 3 --no_torch --out "$OUT_DIR/bench_train.jsonl" \
  || fail "the training-step benchmark failed or ran past 5 minutes (see $LOG)"

if [[ -f scripts/bench_input.py ]]; then
  echo "gpu_check: input-pipeline benchmark (scripts/bench_input.py)"
  timeout 150 "$PY" scripts/bench_input.py "${INPUT_ARGS[@]}" | tee "$OUT_DIR/bench_input.txt" \
    || echo "gpu_check: the input benchmark failed or timed out (not fatal; see $LOG)"
else
  echo "gpu_check: scripts/bench_input.py not found; input benchmark skipped"
fi
echo "gpu_check: done; results in $OUT_DIR"
