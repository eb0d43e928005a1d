#!/usr/bin/env bash
# Every GPU benchmark of benchmarks/ in one call, for a lent H100 or H200, in under 8 minutes.
#
# It needs, in the ignored folder benchmarks/data/ (which the call must carry):
#   cifar10-jpeg.tar.gz          cp ../shared/data/cifar10-jpeg.tar.gz benchmarks/data/
#   wheels/lightly-*.whl         pip download --no-deps --only-binary=:all: lightly==1.6.0 -d benchmarks/data/wheels
# Device call (repository root):
#   run(command="bash benchmarks/gpu_suite.sh", carry=["benchmarks/data"], timeout_s=540)
# Results land in $OUT (at most 6 files): RESULTS-gpu.md (sections to paste into
# benchmarks/RESULTS.md), throughput.jsonl, time_to_accuracy.jsonl, extraction.jsonl, suite.log,
# nvidia-smi.txt.
#
# A reduced run on a CPU, to check the script itself (minutes, tiny batches):
#   SUITE_MODE=cpu-smoke PYTHON=/work/benchvenv/bin/python OUT=/tmp/suite bash benchmarks/gpu_suite.sh
#
# Order is by priority, and a benchmark is skipped (and said so in RESULTS-gpu.md) when fewer
# seconds are left of SUITE_BUDGET_S (470, setup included) than it needs: CIFAR-10 throughput,
# CIFAR-10 time to accuracy (10 epochs), ResNet-50 throughput, extraction; within a throughput
# benchmark, methods not started by its deadline are listed as not run. The ResNet-50 fast path
# and compute bound run eager unless SUITE_R50_COMPILE=1 (compiling costs about a minute).
set -u -o pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
REPO=$PWD
MODE=${SUITE_MODE:-gpu}
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$REPO/benchmarks/out/suite}
WORK=${SUITE_WORK:-/tmp/simsiam-suite}
BUDGET=${SUITE_BUDGET_S:-470}  # seconds of benchmarks; the device call's own limit is 600
mkdir -p "$OUT" "$WORK"
MD=$OUT/RESULTS-gpu.md
exec > >(tee -a "$OUT/suite.log") 2>&1
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET - $(elapsed) )); }

# step NAME SECONDS_NEEDED COMMAND...: run it with what is left of the budget, or skip it
step() {
  local name=$1 need=$2
  shift 2
  if [ "$(left)" -lt "$need" ]; then
    echo "== SKIPPED $name: $(left) s left of the budget, it needs about $need s"
    printf '\n- not measured (time budget): %s\n' "$name" >> "$MD"
    return 0
  fi
  echo "== $name, at $(elapsed) s"
  timeout "$(left)" "$@" || echo "== $name: failed or stopped (exit $?), at $(elapsed) s"
}

if [ "$MODE" = gpu ]; then
  DEVICE=cuda; WORKERS=$(nproc)
  CIFAR_ARGS=(--warmup 3 --steps 15); R50_ARGS=(--warmup 3 --steps 8); EXTRACT_ARGS=(--warmup 2 --steps 12)
  TTA_ARGS=(--epochs 10 --knn-every 5); JPEGS=4096; COMPILE=(); TIMEOUT=240
  # compiling ResNet-50 costs about a minute of the budget: eager (bf16, channels_last) unless asked
  if [ "${SUITE_R50_COMPILE:-0}" = 1 ]; then R50_COMPILE=(); else R50_COMPILE=(--no-compile); fi
else
  DEVICE=cpu; WORKERS=1
  CIFAR_ARGS=(--batch-size 8 --warmup 1 --steps 2); R50_ARGS=(--batch-size 2 --warmup 1 --steps 1)
  EXTRACT_ARGS=(--batch-size 4 --warmup 1 --steps 2); TTA_ARGS=(--epochs 2 --knn-every 1 --batch-size 32)
  JPEGS=32; COMPILE=(--no-compile); R50_COMPILE=(--no-compile); TIMEOUT=600; BUDGET=${SUITE_BUDGET_S:-3000}
fi

echo "== setup ($MODE), $(date -u)"
printf '## GPU suite run, %s (mode %s)\n' "$(date -u '+%Y-%m-%d %H:%M UTC')" "$MODE" > "$MD"
if command -v nvidia-smi > /dev/null; then nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1; head -15 "$OUT/nvidia-smi.txt"; fi
if ls benchmarks/data/wheels/*.whl > /dev/null 2>&1; then
  $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
    benchmarks/data/wheels/*.whl && export PYTHONPATH=$REPO:$WORK/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$REPO:${PYTHONPATH:-}
$PYTHON -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())"
$PYTHON -c "import lightly; print('lightly', lightly.__version__)" || echo "lightly is missing: its rows will say so"
if [ "$MODE" = gpu ]; then $PYTHON -c "import torch; assert torch.cuda.is_available(), 'no GPU visible'" || exit 1; fi
if [ ! -d "$WORK/cifar10/train" ]; then
  mkdir -p "$WORK/cifar10" && tar xzf benchmarks/data/cifar10-jpeg.tar.gz -C "$WORK/cifar10" || exit 1
fi
TRAIN=$WORK/cifar10/train; TEST=$WORK/cifar10/test
if [ "$MODE" != gpu ]; then  # a few images per class, so that the CPU gets through
  for split in train test; do
    for class in "$WORK/cifar10/$split"/*/; do
      mkdir -p "$WORK/small/$split/$(basename "$class")"
      ls "$class" | head -16 | while read -r f; do cp "$class/$f" "$WORK/small/$split/$(basename "$class")/"; done
    done
  done
  TRAIN=$WORK/small/train; TEST=$WORK/small/test
fi
[ -d "$WORK/jpeg" ] || $PYTHON -m benchmarks.make_jpeg_folder "$TRAIN" "$WORK/jpeg" --images $JPEGS
echo "== setup done at $(elapsed) s"

COMMON=(--device $DEVICE --workers $WORKERS --out "$OUT" --results-md "$MD")
step "CIFAR-10 ResNet-18 throughput (ours fast + compute bound, lightly, official, ours plain)" 150 \
  $PYTHON -m benchmarks.throughput --config cifar-r18 --data "$TRAIN" --methods fast,lightly,official,plain \
  "${CIFAR_ARGS[@]}" "${COMMON[@]}" --timeout $TIMEOUT --deadline $(( START + BUDGET * 2 / 5 )) "${COMPILE[@]}"
step "CIFAR-10 time to accuracy (ours, the real training loop)" 100 \
  $PYTHON -m benchmarks.time_to_accuracy --train "$TRAIN" --test "$TEST" "${TTA_ARGS[@]}" "${COMMON[@]}" "${COMPILE[@]}"
# ours first (the targets compare against them), then the others; none starts after the deadline,
# which keeps the extraction's last 60 s
step "ResNet-50 224 throughput (ours fast + compute bound, official, ours plain, lightly)" 150 \
  $PYTHON -m benchmarks.throughput --config r50-224 --data "$WORK/jpeg" --methods fast,official,plain,lightly \
  "${R50_ARGS[@]}" "${COMMON[@]}" --timeout $TIMEOUT --deadline $(( START + BUDGET - 60 )) "${R50_COMPILE[@]}"
step "Extraction ResNet-50 224 (official-style CPU decode, ours plain, ours GPU decode)" 40 \
  $PYTHON -m benchmarks.extraction --data "$WORK/jpeg" "${EXTRACT_ARGS[@]}" "${COMMON[@]}"
echo "== suite done at $(elapsed) s of a $BUDGET s budget"
cat "$MD"
