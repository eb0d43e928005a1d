#!/usr/bin/env bash
# A short device call (about 4 minutes) that looks into the fast path: benchmarks.fast_path_profile
# (each stage of GPU decoding and augmentation timed alone), then the CIFAR-10 fast path against its
# compute bound, then the ResNet-50 fast path alone. Results under $OUT; needs benchmarks/data
# (see gpu_suite.sh). Device call (repository root):
#   run(command="bash benchmarks/gpu_profile.sh", carry=["benchmarks/data"], timeout_s=330)
set -u -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-$PWD/benchmarks/out/profile}; WORK=${SUITE_WORK:-/tmp/simsiam-profile}; PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}; WORKERS=${WORKERS:-$(nproc)}; SMALL=${SMALL:-0}
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/profile.log") 2>&1
START=$(date +%s); echo "== start $(date -u)"
nvidia-smi -L 2>/dev/null
[ -d "$WORK/cifar10/train" ] || { mkdir -p "$WORK/cifar10" && tar xzf benchmarks/data/cifar10-jpeg.tar.gz -C "$WORK/cifar10"; } || exit 1
IMAGES=2048; STEPS=(--warmup 3 --steps 64); R50_STEPS=(--warmup 2 --steps 16); BATCH=(); R50_BATCH=(); PROFILE=()
if [ "$SMALL" = 1 ]; then IMAGES=64; STEPS=(--warmup 1 --steps 2 --batch-size 16); R50_STEPS=(--warmup 1 --steps 1 --batch-size 4); PROFILE=(--batch-size 16 --no-compile); fi
JPEG=$WORK/jpeg-$IMAGES; rm -rf "$JPEG.partial"  # named by its count; an interrupted one is remade
[ -d "$JPEG" ] || $PYTHON -m benchmarks.make_jpeg_folder "$WORK/cifar10/train" "$JPEG" --images $IMAGES || exit 1
echo "== setup done at $(( $(date +%s) - START )) s"
timeout 70 $PYTHON -m benchmarks.fast_path_profile --jpeg "$JPEG" --out "$OUT" --device $DEVICE --workers $WORKERS "${PROFILE[@]}" \
  || echo "== profile: exit $?"
echo "== profile done at $(( $(date +%s) - START )) s"
COMMON=(--device $DEVICE --workers $WORKERS --out "$OUT" --results-md "$OUT/RESULTS-gpu.md")
timeout 130 $PYTHON -m benchmarks.throughput --config cifar-r18 --data "$WORK/cifar10/train" --methods fast "${STEPS[@]}" \
  "${COMMON[@]}" --compile-timeout 100 --deadline $(( $(date +%s) + 120 )) || echo "== cifar fast: exit $?"
echo "== cifar done at $(( $(date +%s) - START )) s"
timeout 80 $PYTHON -m benchmarks.throughput --config r50-224 --data "$JPEG" --methods fast "${R50_STEPS[@]}" \
  "${COMMON[@]}" --workers $(( WORKERS < 8 ? WORKERS : 8 )) --no-compile --deadline $(( $(date +%s) + 70 )) || echo "== r50 fast: exit $?"
echo "== all done at $(( $(date +%s) - START )) s"
