#!/usr/bin/env bash
# Every GPU row of the project in ONE device call, most valuable first, <= 9 minutes
# (experiments/gpu/run.py: the stages, their budgets, what is recorded when one is skipped).
#
# Prepare once, here, from the repository root (everything goes into .gpu/, git-ignored):
#   1. fetch the reference code with the fetch tool:  fetch("github:facebookresearch/ijepa")
#      -> <ijepa git dir>
#   2. python experiments/gpu/prepare.py --ijepa-git <ijepa git dir>
#      writes .gpu/data/cifar10_train.npz (the 50,000 CIFAR-10 train JPEGs, 47.5 MB),
#      .gpu/data/imagenet125.tar (every 8th of ../shared/data/imagenet-samples, 14.2 MB),
#      .gpu/whl/ (hydra-core, omegaconf, antlr4 wheels, 0.4 MB; the GPU image lacks them),
#      .gpu/ijepa/ (the reference's src/ and LICENSE, 0.15 MB; never committed), and prints
#      the size that travels (must stay under 64 MiB).
# Then, in one call:
#   run(command="bash experiments/gpu/run.sh", carry=[".gpu"], timeout_s=600)
# Results in $OUT: results.md (targets as ratios, every table), rows.jsonl, log.txt,
# logs.tar.gz, curves.png. Fill experiments/performance/README.md and
# experiments/cifar10/README.md from results.md.
#
# CPU check of the same stages at tiny sizes (tests/test_gpu_run.py runs it):
#   bash experiments/gpu/run.sh --cpu-smoke --data <dir with cifar10/train and imagenet-samples> --out <dir>
set -uo pipefail
cd "$(dirname "$0")/../.."
START=$SECONDS
OUTDIR="${OUT:-gpu-results}"
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
SMOKE=0
for arg in "$@"; do [ "$arg" = "--cpu-smoke" ] && SMOKE=1; done

if [ "$SMOKE" = 0 ]; then
  {
    echo "== $(date -u +%FT%TZ) setup"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
    if ! $PY -c "import hydra, omegaconf" 2>/dev/null; then
      $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl \
        || { echo "error: installing .gpu/whl failed (run experiments/gpu/prepare.py and carry .gpu)"; exit 1; }
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    $PY -c "import torch, torchvision, timm, hydra; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'hydra', hydra.__version__)" || exit 1
    DATA=/tmp/hjepa_data
    if [ ! -d "$DATA/cifar10/train" ]; then
      $PY experiments/cifar10/pack.py unpack .gpu/data/cifar10_train.npz "$DATA/cifar10/train" || exit 1
    fi
    if [ ! -d "$DATA/imagenet-samples" ]; then
      mkdir -p "$DATA/imagenet-samples" && tar -xf .gpu/data/imagenet*.tar -C "$DATA/imagenet-samples" || exit 1
    fi
    export HJEPA_SHARED_DATA=$DATA   # tests/test_cuda.py compares decoders on these photos
    echo "== setup took $((SECONDS - START))s"
    exec $PY experiments/gpu/run.py --out "$OUTDIR" --data "$DATA" --deadline-s $((540 - (SECONDS - START))) "$@"
  } 2>&1 | tee -a "$OUTDIR/console.txt"
else
  exec $PY experiments/gpu/run.py --out "$OUTDIR" "$@"
fi
