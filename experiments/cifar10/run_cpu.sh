#!/usr/bin/env bash
# Every CPU row of experiments/cifar10/README.md: the two recipes, the reference-parity options
# and the hierarchy ablation, each trained on one core (two at a time), then scored with
# `python -m hjepa.evaluate eval=knn` and `eval=linear` (each also scores the random-init
# encoder), then the table rows and the curves.
#
#   bash experiments/cifar10/run_cpu.sh [DATA_ROOT] [OUT]     # DATA_ROOT holds cifar10/train/<class>/*.jpg
#   bash experiments/cifar10/run_cpu.sh ../shared/data outputs/cifar10_cpu
#
# About 4 hours of two cores (14 short runs of ~10 minutes, 6 long ones of ~30, evaluation).
# A run directory that already has eval_linear.json is skipped, so the script resumes.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA_ROOT=${1:-../shared/data}
OUT=${2:-outputs/cifar10_cpu}
PY=${PYTHON:-python}
mkdir -p "$OUT"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

# name | experiment | overrides (one line per row of the README tables)
# The recipes' default schedule is a constant lr after the warmup (optim.final_lr=1e-3); the
# rows measured before it was adopted pin the cosine to 1e-6 they ran with.
RUNS=(
  "long_flat_lr_s0|cifar10_cpu_long|optim.final_lr=1e-3"
  "long_flat_lr_s1|cifar10_cpu_long|optim.final_lr=1e-3 seed=1"
  "long_flat_lr_s2|cifar10_cpu_long|optim.final_lr=1e-3 seed=2"
  "xs_flat_lr_s0|cifar10_cpu_short|optim.final_lr=1e-3"
  "xs_flat_lr_s1|cifar10_cpu_short|optim.final_lr=1e-3 seed=1"
  "xs_flat_lr_s2|cifar10_cpu_short|optim.final_lr=1e-3 seed=2"
  "long_s0|cifar10_cpu_long|optim.final_lr=1e-6"
  "long_s1|cifar10_cpu_long|optim.final_lr=1e-6 seed=1"
  "long_warm04_s0|cifar10_cpu_long|optim.final_lr=1e-6 optim.warmup=null optim.warmup_epochs=0.4"
  "short_s0|cifar10_cpu_short|optim.final_lr=1e-6"
  "short_s1|cifar10_cpu_short|optim.final_lr=1e-6 seed=1"
  "short_init_ref_s0|cifar10_cpu_short|optim.final_lr=1e-6 model.init=reference"
  "short_geo_ref_s0|cifar10_cpu_short|optim.final_lr=1e-6 mask.geometry=reference"
  "abl_ijepa_s0|cifar10_cpu_short|optim.final_lr=1e-6 model/levels=ijepa"
  "abl_ijepa_s1|cifar10_cpu_short|optim.final_lr=1e-6 model/levels=ijepa seed=1"
  "abl_mid3_s0|cifar10_cpu_short|optim.final_lr=1e-6 model/levels=mid3"
  "abl_mid3_s1|cifar10_cpu_short|optim.final_lr=1e-6 model/levels=mid3 seed=1"
  "abl_mid3_s2_s0|cifar10_cpu_short|optim.final_lr=1e-6 model/levels=mid3_s2"
  "abl_mid3_s2_s1|cifar10_cpu_short|optim.final_lr=1e-6 model/levels=mid3_s2 seed=1"
  "xs_ema98_s0|cifar10_cpu_short|optim.final_lr=1e-6 optim.ema_momentum=0.98"
)

one() {  # train + evaluate one row
  local name=$1 exp=$2 overrides=$3 dir="$OUT/$1"
  [ -f "$dir/eval_linear.json" ] && return 0
  # shellcheck disable=SC2086
  $PY -m hjepa.train experiment="$exp" data_root="$DATA_ROOT" hydra.run.dir="$dir" trainer.resume=auto $overrides \
    > "$dir.log" 2>&1
  for e in knn linear; do
    $PY -m hjepa.evaluate run="$dir" eval=$e crop_ratio=1.0 hardware=cpu hardware.num_workers=0 hardware.threads=1 \
      >> "$dir.log" 2>&1
  done
}

running=0
for row in "${RUNS[@]}"; do
  IFS='|' read -r name exp overrides <<< "$row"
  one "$name" "$exp" "$overrides" &
  running=$((running + 1))
  if [ $running -ge 2 ]; then wait -n; running=$((running - 1)); fi
done
wait

$PY experiments/cifar10/cpu_table.py "$OUT"/*/ --skip hydra.run.dir data_root trainer.resume \
  --config-keys optim.final_lr | tee "$OUT/table.md"
$PY experiments/cifar10/plot.py -o experiments/cifar10/curves_cpu.png \
  --panel "recipes and parity options" long="$OUT/long_flat_lr_s0/metrics.jsonl" long/s1="$OUT/long_flat_lr_s1/metrics.jsonl" long/s2="$OUT/long_flat_lr_s2/metrics.jsonl" \
    long_cosine="$OUT/long_s0/metrics.jsonl" long_cosine/s1="$OUT/long_s1/metrics.jsonl" \
    long_cosine_warmup_0.4ep="$OUT/long_warm04_s0/metrics.jsonl" short="$OUT/xs_flat_lr_s0/metrics.jsonl" \
    short/s1="$OUT/xs_flat_lr_s1/metrics.jsonl" short/s2="$OUT/xs_flat_lr_s2/metrics.jsonl" short_cosine="$OUT/short_s0/metrics.jsonl" \
    short_cosine_init_ref="$OUT/short_init_ref_s0/metrics.jsonl" short_cosine_geometry_ref="$OUT/short_geo_ref_s0/metrics.jsonl" \
  --panel "hierarchy ablation (short, cosine)" hjepa3/s0="$OUT/short_s0/metrics.jsonl" hjepa3/s1="$OUT/short_s1/metrics.jsonl" \
    ijepa/s0="$OUT/abl_ijepa_s0/metrics.jsonl" ijepa/s1="$OUT/abl_ijepa_s1/metrics.jsonl" \
    mid3/s0="$OUT/abl_mid3_s0/metrics.jsonl" mid3/s1="$OUT/abl_mid3_s1/metrics.jsonl" \
    mid3_s2/s0="$OUT/abl_mid3_s2_s0/metrics.jsonl" mid3_s2/s1="$OUT/abl_mid3_s2_s1/metrics.jsonl"
