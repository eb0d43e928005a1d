#!/usr/bin/env bash
# Every GPU benchmark of benchmarks/ in one call, for a lent H100 or H200, in under 8 minutes.
#
# The lent machine has python3 with torch, torchvision, h5py, scikit-learn, click, rich and tqdm,
# and no network: everything else travels as a wheel, installed there with
# `pip install --no-index --no-deps --target`. It needs, in the ignored folder benchmarks/data/
# (which the call must carry):
#   cifar10-jpeg.tar.gz          cp ../shared/data/cifar10-jpeg.tar.gz benchmarks/data/
#   wheels/lightly-1.6.0-py3-none-any.whl, wheels/lightning_utilities-0.15.3-py3-none-any.whl,
#   wheels/packaging-26.4-py3-none-any.whl (what lightly.transforms, .models.modules and .loss
#   import beyond torch, torchvision, numpy, PIL, tqdm and typing_extensions; lightly's other
#   requirements, pytorch_lightning and hydra, are not imported by them):
#     pip download --no-deps --only-binary=:all: lightly==1.6.0 lightning-utilities==0.15.3 \
#       packaging==26.4 -d benchmarks/data/wheels
#   and, for the CUDA-only tests run first (skipped without them): pytest and what it imports
#     pip download --no-deps --only-binary=:all: pytest pluggy iniconfig pygments exceptiongroup \
#       -d benchmarks/data/wheels
# Checked in a venv with only those packages (torch 2.14.1, torchvision 0.29.1, h5py,
# scikit-learn, click, rich, tqdm) plus these wheels: the suite's cpu-smoke ran every step.
# Device call (repository root):
#   run(command="bash benchmarks/gpu_suite.sh", carry=["benchmarks/data"], timeout_s=540)
# Results land in $OUT (at most 7 files): RESULTS-gpu.md (sections to paste into
# benchmarks/RESULTS.md), throughput.jsonl, time_to_accuracy.jsonl, extraction.jsonl, suite.log,
# nvidia-smi.txt, cuda-tests.txt.
#
# A reduced run on a CPU, to check the script itself (15 minutes on 2 busy cores, tiny batches;
# the wheels are installed as on the GPU machine), in a venv that mimics the lent machine:
#   python3 -m venv /tmp/gpusim && /tmp/gpusim/bin/pip install torch==2.14.1 torchvision==0.29.1 \
#     h5py scikit-learn click rich tqdm
#   SUITE_MODE=cpu-smoke PYTHON=/tmp/gpusim/bin/python OUT=/tmp/suite bash benchmarks/gpu_suite.sh
#
# Timing (benchmarks/harness.py, PROTOCOL): warm-up steps on one iterator (compiling, cuDNN
# autotuning), dropped; a fresh iterator, its first batch untimed (worker start-up); then N
# timed steps. N is --steps for sources without DataLoader workers (compute bound, CIFAR data on
# the GPU) and at least 2 x workers x prefetch_factor batches, in whole rounds of the workers, for
# the others, so that the batches queued when timing starts cannot dominate. With 16 workers:
#   CIFAR-10 R18, batch 512, --steps 64: compute bound and ours-fast 64 steps (33k images, 2/3 of
#     an epoch); official and lightly (prefetch 2) 64; ours-plain (prefetch 4) 128 (66k images).
#     Estimated on an H100: ours-fast ~80 s (compiling ~60 s of it), official, lightly ~15 s each
#     (PIL at 32x32, ~10k images/s from 16 workers), ours-plain ~30 s (transforms v2 ~4k/s).
#   ResNet-50 224, batch 256, --steps 32: compute bound 32; official, lightly 64 (16k images,
#     ~1k images/s: ~30 s each with the two worker start-ups); ours-plain and ours-fast (GPU
#     decoding, its readers prefetch 4) 128 (33k images; ~50 s and ~30 s).
#   Extraction, batch 256, --steps 32: official-style 64, ours-plain and ours-gpu-decode 128.
# The datasets are listed several times over (the 4,096-image JPEG folder 9 times at batch 256)
# so that no epoch ends, and no worker restarts, inside a timed window.
#
# Order and budget (SUITE_BUDGET_S, 470 s, setup included): CIFAR-10 throughput, ResNet-50
# throughput, extraction, then CIFAR-10 time to accuracy (10 epochs), the longest and least
# predictable, last. Each step runs under a hard timeout of what is left minus what the later
# steps keep (RESERVE: their estimated needs), and is skipped (said so in RESULTS-gpu.md) when
# that is less than its minimum; within a throughput step, methods not started by its deadline
# are listed as not run. Estimated shares (none measured yet on a GPU; every method also pays
# ~6 s of process start and two worker start-ups): setup ~25 s (wheels, untar, the JPEG folder);
# the CUDA-only tests at most 30 s; CIFAR throughput up to ~130 s (needs ~140: its last row, ours
# plain, may be listed as not run); ResNet-50 throughput 150 kept (~145); extraction 45
# kept (~40); time to accuracy the rest, at least 90 kept (~80: data onto the GPU ~5 s,
# compiling ~20-60 s, partly cached by the CIFAR fast row, 10 epochs of <= 3 s, two kNN passes of
# ~5 s, a checkpoint written each epoch). Time to accuracy stops after the last epoch that fits what is left
# (--deadline) and reports the epochs it did. torch.compile (CIFAR fast path, compute bound, time
# to accuracy) falls back to eager, and says so in the rows, when compiling fails or takes over
# --compile-timeout. The ResNet-50 fast path and compute bound run eager unless
# SUITE_R50_COMPILE=1 (compiling costs about a minute).
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

# step NAME SECONDS_NEEDED RESERVE COMMAND...: run it for what is left of the budget less RESERVE
# (the later steps' share) under a hard timeout, or skip it when that is under SECONDS_NEEDED.
# The command gets --deadline (a time(), 10 s before the hard stop, to write its results by).
step() {
  local name=$1 need=$2 reserve=$3
  shift 3
  local seconds=$(( $(left) - reserve ))
  if [ "$seconds" -lt "$need" ]; then
    echo "== SKIPPED $name: $seconds s for it ($(left) s left, $reserve s kept for later steps), it needs $need s"
    printf '\n- not measured (time budget): %s\n' "$name" >> "$MD"
    return 0
  fi
  echo "== $name, at $(elapsed) s, $seconds s for it"
  timeout "$seconds" "$@" --deadline $(( $(date +%s) + seconds - 10 ))
  local status=$?
  if [ "$status" -ne 0 ]; then  # said in RESULTS-gpu.md too: a step killed before its table leaves no other trace there
    local how="failed (exit $status)"
    [ "$status" -eq 124 ] && how="killed at its time limit of $seconds s"
    echo "== $name: $how, at $(elapsed) s"
    printf '\n- %s: %s, at %s s of the suite; rows written before are above, the rest in suite.log\n' \
      "$name" "$how" "$(elapsed)" >> "$MD"
  fi
}

# NEED_*: a step's minimum; RESERVE_*: what the later steps keep (their estimated needs on an H100)
if [ "$MODE" = gpu ]; then
  DEVICE=cuda; WORKERS=$(nproc)
  CIFAR_ARGS=(--warmup 3 --steps 64); R50_ARGS=(--warmup 3 --steps 32); EXTRACT_ARGS=(--warmup 2 --steps 32)
  # compile timeouts below each step's slot, so that a slow compile goes eager instead of being killed with
  # its rows: CIFAR's fast row gets ~150 s, time to accuracy at least 90 s (its compiling partly cached)
  TTA_ARGS=(--epochs 10 --knn-every 5); JPEGS=4096; COMPILE=(--compile-timeout 100); TTA_COMPILE=(--compile-timeout 60)
  TIMEOUT=240
  # compiling ResNet-50 costs about a minute of the budget: eager (bf16, channels_last) unless asked
  if [ "${SUITE_R50_COMPILE:-0}" = 1 ]; then R50_COMPILE=(--compile-timeout 120); else R50_COMPILE=(--no-compile); fi
  NEED_TTA=60; NEED_EXTRACT=30; NEED_R50=60; NEED_CIFAR=60
  RESERVE_TTA=90; RESERVE_EXTRACT=45; RESERVE_R50=150
else
  DEVICE=cpu; WORKERS=1
  CIFAR_ARGS=(--batch-size 8 --warmup 1 --steps 2); R50_ARGS=(--batch-size 2 --warmup 1 --steps 1)
  EXTRACT_ARGS=(--batch-size 4 --warmup 1 --steps 2); TTA_ARGS=(--epochs 2 --knn-every 1 --batch-size 32)
  JPEGS=32; COMPILE=(--no-compile); TTA_COMPILE=(--no-compile); R50_COMPILE=(--no-compile); TIMEOUT=900
  BUDGET=${SUITE_BUDGET_S:-3000}
  NEED_TTA=30; NEED_EXTRACT=30; NEED_R50=60; NEED_CIFAR=60
  RESERVE_TTA=300; RESERVE_EXTRACT=300; RESERVE_R50=600
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
JPEG=$WORK/jpeg-$JPEGS  # named by its count: a shared $WORK holds the CPU smoke's and the GPU run's
rm -rf "$JPEG.partial"  # left by an interrupted run; a finished folder is renamed into place whole
[ -d "$JPEG" ] || $PYTHON -m benchmarks.make_jpeg_folder "$TRAIN" "$JPEG" --images $JPEGS || exit 1
echo "== setup done at $(elapsed) s"

# The CUDA-only tests of the fast path (nvjpeg's stream race, the GPU augmentation against the CPU,
# bf16 extraction, kNN on CUDA; not the compile test, which takes a minute), when pytest travelled. They
# are selected by their marker, in the modules that have one: the others may import what did not
# travel here (faiss, PyYAML); one of those that cannot be imported does not stop the others.
if $PYTHON -c "import pytest" 2> /dev/null; then
  echo "== CUDA-only tests, at $(elapsed) s"
  CUDA_MODULES=$(grep -l "pytest.mark.cuda(" tests/test_*.py)  # never empty: pytest would collect every module
  timeout 30 $PYTHON -m pytest -q -p no:cacheprovider -rs -m "cuda and not slow" --continue-on-collection-errors \
    ${CUDA_MODULES:-tests/conftest.py} > "$OUT/cuda-tests.txt" 2>&1
  echo "== CUDA-only tests: exit $?, at $(elapsed) s: $(tail -1 "$OUT/cuda-tests.txt")"
  printf '\n- CUDA-only tests (`pytest -m "cuda and not slow"` over the modules that have them): %s\n' \
    "$(tail -1 "$OUT/cuda-tests.txt")" >> "$MD"
else
  echo "== CUDA-only tests: not run (no pytest; see the header for its wheels)"
fi

COMMON=(--device $DEVICE --workers $WORKERS --out "$OUT" --results-md "$MD")
step "CIFAR-10 ResNet-18 throughput (ours fast + compute bound, lightly, official, ours plain)" \
  $NEED_CIFAR $(( RESERVE_R50 + RESERVE_EXTRACT + RESERVE_TTA )) \
  $PYTHON -m benchmarks.throughput --config cifar-r18 --data "$TRAIN" --methods fast,lightly,official,plain \
  "${CIFAR_ARGS[@]}" "${COMMON[@]}" --timeout $TIMEOUT "${COMPILE[@]}"
# the two rows the targets compare first (in the first H100 run, ours-fast took the whole step and
# the official row never ran), then the others
step "ResNet-50 224 throughput (ours fast + compute bound, official, ours plain, lightly)" \
  $NEED_R50 $(( RESERVE_EXTRACT + RESERVE_TTA )) \
  $PYTHON -m benchmarks.throughput --config r50-224 --data "$JPEG" --methods official,fast,plain,lightly \
  "${R50_ARGS[@]}" "${COMMON[@]}" --timeout $TIMEOUT "${R50_COMPILE[@]}"
step "Extraction ResNet-50 224 (official-style CPU decode, ours plain, ours GPU decode)" $NEED_EXTRACT $RESERVE_TTA \
  $PYTHON -m benchmarks.extraction --data "$JPEG" --methods official-style,ours-gpu-decode,ours-plain \
  "${EXTRACT_ARGS[@]}" "${COMMON[@]}"
# last: it stops after the last epoch that ends before its deadline
step "CIFAR-10 time to accuracy (ours, the real training loop)" $NEED_TTA 0 \
  $PYTHON -m benchmarks.time_to_accuracy --train "$TRAIN" --test "$TEST" "${TTA_ARGS[@]}" "${COMMON[@]}" \
  "${TTA_COMPILE[@]}"
echo "== suite done at $(elapsed) s of a $BUDGET s budget"
cat "$MD"
