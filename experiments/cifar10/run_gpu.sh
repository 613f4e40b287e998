#!/usr/bin/env bash
# The GPU rows of experiments/cifar10/README.md in ONE device call (bounded to ~9.5 minutes).
# The GPU machine has torch, timm and matplotlib but no hydra/omegaconf and no copy of the data,
# so both travel: prepare once, here, from the repository root:
#   python experiments/cifar10/pack.py pack ../shared/data/cifar10/train experiments/cifar10/data/cifar10_train.npz
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl hydra-core==1.3.8 omegaconf==2.3.0
#   python -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3    # an sdist only: build the wheel
# then (47 MB of images + 0.4 MB of wheels, under the 64 MiB carry limit):
#   run(command="bash experiments/cifar10/run_gpu.sh", carry=[".whl", "experiments/cifar10/data"], timeout_s=600)
# Arguments are passed to run_gpu.py (e.g. --ablation-epochs 5 --parallel 4, or --skip-main).
# Results in $OUT (or ./gpu-results): results.jsonl, results.md, curves.png, log.txt, per-run logs.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUTDIR="${OUT:-gpu-results}"
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
PY=python3
{
  echo "== $(date -u +%FT%TZ) setup"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  if ! $PY -c "import hydra, omegaconf" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  $PY -c "import torch, torchvision, timm, hydra, omegaconf; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'hydra', hydra.__version__)" || exit 1
  DATA=/tmp/hjepa_data
  if [ ! -d "$DATA/cifar10/train" ]; then
    $PY experiments/cifar10/pack.py unpack experiments/cifar10/data/cifar10_train.npz "$DATA/cifar10/train" || exit 1
  fi
  $PY experiments/cifar10/run_gpu.py --data-root "$DATA" --out "$OUTDIR" --deadline-s 540 "$@"
} 2>&1 | tee -a "$OUTDIR/console.txt"
