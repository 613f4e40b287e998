#!/usr/bin/env bash
# All GPU rows of experiments/performance/README.md in one invocation (~6-8 min on an H100;
# each part is bounded so the whole stays under the device tool's 10-minute limit).
# On the lent GPU machine (torch + timm + triton, no hydra needed), from the repo root:
#   run(command="bash experiments/performance/run_gpu.sh", carry=["experiments/performance/data"], timeout_s=600)
# Results: $OUT (or ./gpu-results) gets step.jsonl, data.jsonl, e2e.jsonl, masks.jsonl, log.txt.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUTDIR="${OUT:-gpu-results}"
mkdir -p "$OUTDIR"
PACK=experiments/performance/data/imagenet400.tar   # python -m hjepa.bench pack experiments/performance/data/imagenet400.tar
export PYTHONUNBUFFERED=1
PY=python3
log() { echo "== $(date +%T) $*" | tee -a "$OUTDIR/log.txt"; }
{
  log "machine"; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv || true
  $PY -c "import torch, timm, torchvision; print(torch.__version__, torchvision.__version__, timm.__version__, torch.cuda.get_device_name())"
  nproc
  # 1. training step, eager: ViT-S/16 and ViT-B/16 x (I-JEPA levels, 3 model levels); matmul peak first
  log "step eager"
  timeout 150 $PY -m hjepa.bench step --compile off --out "$OUTDIR/step.jsonl"
  log "step eager channels_last (ViT-S, I-JEPA levels)"
  timeout 60 $PY -m hjepa.bench step --compile off --models hjepa_vit_small --levels ijepa --channels-last --out "$OUTDIR/step.jsonl"
  # 2. torch.compile rows (first compile of each model costs ~1 min; rows past the budget are recorded as skipped)
  log "step compiled"
  timeout 240 $PY -m hjepa.bench step --compile on --levels both --budget-s 170 --out "$OUTDIR/step.jsonl"
  # 3. data: per core (15 of the 16 cores stay idle) and DataLoader rates with 15 workers
  log "data"
  timeout 120 $PY -m hjepa.bench data --images "$PACK" --n 400 --rounds 3 --workers 15 --out "$OUTDIR/data.jsonl"
  log "masks"
  timeout 60 $PY -m hjepa.bench masks --out "$OUTDIR/masks.jsonl"
  # 4. end to end: the real Trainer, ViT-B/16 I-JEPA levels, 4,000 files (400 JPEGs x 10 links), 15 workers;
  #    then the same from the prepared format, with the loader alone measured to name a bottleneck
  log "e2e jpeg"
  timeout 120 $PY -m hjepa.bench e2e --images "$PACK" --n 400 --copies 10 --workers 15 --loader-only --steps 10 --out "$OUTDIR/e2e.jsonl"
  log "e2e prepared"
  timeout 100 $PY -m hjepa.bench e2e --images "$PACK" --n 400 --copies 10 --workers 15 --format prepared --loader-only --steps 10 --out "$OUTDIR/e2e.jsonl"
  # 5. a 32 px dataset kept decoded on the GPU (cache=device) with ViT-Tiny/4 at batch 512
  log "e2e 32px cache=device"
  timeout 90 $PY -m hjepa.bench e2e --images "$PACK" --n 400 --copies 1 --workers 12 --cache device --model hjepa_vit_tiny --img 32 --patch 4 --batch 512 --train-steps 60 --steps 10 --out "$OUTDIR/e2e.jsonl"
  log "done"
} 2>&1 | tee -a "$OUTDIR/log.txt"
$PY - "$OUTDIR" <<'PYEOF'
import json, sys, pathlib
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.jsonl")):
    for line in open(f):
        r = json.loads(line)
        ratio = f"{r['ratio']:.2f}" if r.get("ratio") else "-"
        print(f"{r['what'][:44]:44s} {r['config'][:70]:70s} {r['value']:>10.1f} {r['unit']:10s} x{ratio}")
PYEOF
