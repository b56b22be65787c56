#!/usr/bin/env bash
# GPU check, one run under 8 minutes on one H100/H200; writes ONE JSON file, $OUT/gpu_check.json:
#   1. JAX must see a GPU. If it does not, try `pip install jax[cuda12]==0.10.2` once (a GPU
#      machine without internet fails here, clearly, instead of benchmarking the CPU).
#   2. "train_step": the training-step benchmark (`python -m alexnet_jax.bench`: the real pmapped
#      train_step on synthetic data made on the device, compilation excluded, median of STEPS) at
#      global batch 128, 256, 512, float32 and bfloat16, with both `model.kernels` forms
#      (portable: XLA's feature_group_count and select_and_scatter; cpu: split groups and the
#      pooled-grid max-pool gradient).
#   3. "input": `scripts/bench_input.py` pinned to 1 core (per core) and on all cores.
#   4. "train_loop": the real training loop (launch.py, device augmentation) on a generated
#      prepared copy (ArrayRecord, 256x256 JPEGs), with its input_wait_fraction per log line.
# Everything printed also goes to $OUT/gpu_check.log.
#
#   bash scripts/gpu_check.sh            # or: OUT=/some/dir bash scripts/gpu_check.sh
# A dry run of the script itself on a CPU (tiny sizes):
#   ALLOW_CPU=1 BATCH_SIZES=8 STEPS=2 INPUT_ARGS="--images 96 --batch 16 --steps 2 --rounds 1" \
#     LOOP_IMAGES=256 LOOP_BATCH=16 LOOP_STEPS=6 bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR="${OUT:-runs/gpu_check}"
mkdir -p "$OUT_DIR"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
LOG="$OUT_DIR/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1
PY="${PYTHON:-python}"
JAX_CUDA="${JAX_CUDA:-jax[cuda12]==0.10.2}"  # keep in step with requirements.txt's jax pin
BATCH_SIZES="${BATCH_SIZES:-128,256,512}"
STEPS="${STEPS:-10}"
read -r -a INPUT_ARGS <<<"${INPUT_ARGS:---images 512 --batch 32 --steps 12 --rounds 1}"
LOOP_IMAGES="${LOOP_IMAGES:-8192}"
LOOP_BATCH="${LOOP_BATCH:-256}"
LOOP_STEPS="${LOOP_STEPS:-60}"

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
  --format=csv,noheader | tee "$WORK/gpu.txt"

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

for kernels in portable cpu; do
  echo "gpu_check: training step, model.kernels=$kernels (batch $BATCH_SIZES; float32, bfloat16)"
  timeout 170 "$PY" -m alexnet_jax.bench --batch_sizes "$BATCH_SIZES" --dtypes float32,bfloat16 \
    --steps "$STEPS" --warmup 2 --no_torch --out "$WORK/step_$kernels.jsonl" \
    "--config.model.kernels=$kernels" \
    || echo "gpu_check: the step benchmark with kernels=$kernels failed or timed out (see $LOG)"
done

echo "gpu_check: input pipeline, per core and on all $(nproc) cores"
timeout 100 "$PY" scripts/bench_input.py "${INPUT_ARGS[@]}" --cores 1 --json "$WORK/input_1.jsonl" \
  || echo "gpu_check: the per-core input benchmark failed or timed out (see $LOG)"
timeout 100 "$PY" scripts/bench_input.py "${INPUT_ARGS[@]}" --cores "$(nproc)" \
  --json "$WORK/input_all.jsonl" \
  || echo "gpu_check: the all-core input benchmark failed or timed out (see $LOG)"

echo "gpu_check: training loop on a generated prepared copy ($LOOP_IMAGES images)"
timeout 90 "$PY" scripts/bench_resume.py --images "$LOOP_IMAGES" --write_only "$WORK/copy" \
  >/dev/null || echo "gpu_check: writing the prepared copy failed"
timeout 150 "$PY" launch.py experiments/imagenet.py --workdir "$WORK/run" \
  "--config.data.prepared_dir=$WORK/copy" --config.data.train_split=train \
  "--config.data.val_split=train[:1%]" --config.data.test_split=validation \
  "--config.batch_size=$LOOP_BATCH" "--config.num_train_steps=$LOOP_STEPS" \
  --config.log_every_steps=10 --config.eval_every_steps=0 --config.checkpoint_every_steps=0 \
  --config.eval.crops=1 "--config.eval.batch_size=$LOOP_BATCH" \
  || echo "gpu_check: the training loop failed or timed out (see $LOG)"

"$PY" - "$WORK" "$OUT_DIR/gpu_check.json" <<'EOF'
import json, pathlib, sys

work, out = pathlib.Path(sys.argv[1]), sys.argv[2]

def lines(path, **extra):
    if not path.exists():
        return []
    return [json.loads(l) | extra for l in path.read_text().splitlines() if l.strip()]

result = {
    "gpu": (work / "gpu.txt").read_text().strip() if (work / "gpu.txt").exists() else None,
    "train_step": lines(work / "step_portable.jsonl", kernels="portable")
    + lines(work / "step_cpu.jsonl", kernels="cpu"),
    "input": lines(work / "input_1.jsonl", scope="per_core")
    + lines(work / "input_all.jsonl", scope="all_cores"),
    "train_loop": [
        {k: m.get(k) for k in ("step", "loss", "images_per_sec", "input_wait_fraction",
                               "input_images_per_sec")}
        for m in lines(work / "run" / "metrics.jsonl") if m.get("split") == "train"
    ],
}
summary = work / "run" / "summary.md"
result["train_loop_summary"] = summary.read_text() if summary.exists() else None
pathlib.Path(out).write_text(json.dumps(result, indent=1) + "\n")
print(f"gpu_check: wrote {out}")
EOF
echo "gpu_check: done; results in $OUT_DIR/gpu_check.json"
