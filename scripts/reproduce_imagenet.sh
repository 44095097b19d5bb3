#!/usr/bin/env bash
# The paper's ImageNet table (ResNet-50, 300 epochs): baseline, Mixup, CutMix, RecursiveMix.
#   scripts/reproduce_imagenet.sh DATA_DIR [GPUS=8] [OUT=runs/imagenet]
# DATA_DIR is an ImageFolder root with train/ and val/. Each row resumes if interrupted
# (--resume auto), then `rmix eval` writes eval.json beside it. SMOKE=1 shrinks everything to
# seconds on a CPU (a smoke test of the script itself, not of the recipe).
set -euo pipefail
DATA=${1:?usage: $0 DATA_DIR [GPUS] [OUT]}
GPUS=${2:-8}
OUT=${3:-runs/imagenet}
EXTRA=()
if [[ "${SMOKE:-0}" == 1 ]]; then
  EXTRA=(--epochs 1 --warmup 0 --max-steps 1 --batch-size $((4 * GPUS)) --crop-size 32 --val-resize 36
         --workers 1 --device cpu --log-every 1 --model resnet18)
fi
for row in baseline mixup cutmix rm; do
  run="$OUT/r50-$row"
  torchrun --standalone --nproc_per_node="$GPUS" --no-python \
    rmix train --preset "imagenet-r50-$row" --data-dir "$DATA" --out "$run" --resume auto "${EXTRA[@]}"
  rmix eval --checkpoint "$run/best.pt" --data-dir "$DATA" --json > "$run/eval.json"
  echo "$row: $(cat "$run/eval.json")"
done
