#!/usr/bin/env bash
# The paper's ImageNet table (ResNet-50, 300 epochs): baseline, Mixup, CutMix, RecursiveMix.
#   scripts/reproduce_imagenet.sh DATA [GPUS=8] [OUT=runs/imagenet]
# DATA is either a prepared set (an ImageFolder with train/ and val/, or WebDataset shards) or the
# folder holding ImageNet's three archives (ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar,
# ILSVRC2012_devkit_t12.tar.gz). Archives are prepared once, into PREPARED (default OUT/data) in
# FORMAT (folder, the default, or wds); a preparation that was cut continues, and a finished one
# is reused. Each row resumes if interrupted (--resume auto), then `rmix eval` writes eval.json
# beside it. SMOKE=1 shrinks everything to seconds on a CPU (a smoke test of the script itself,
# not of the recipe; it also skips the archives' md5 check).
set -euo pipefail
DATA=${1:?usage: $0 DATA [GPUS] [OUT]}
GPUS=${2:-8}
OUT=${3:-runs/imagenet}
EXTRA=()
PREPARE=()
if [[ "${SMOKE:-0}" == 1 ]]; then
  EXTRA=(--epochs 1 --warmup 0 --max-steps 1 --batch-size $((4 * GPUS)) --crop-size 32 --val-resize 36
         --workers 1 --device cpu --log-every 1 --model resnet18)
  PREPARE=(--skip-md5)
fi
if [[ -f "$DATA/ILSVRC2012_img_train.tar" ]]; then
  PREPARED=${PREPARED:-$OUT/data}
  rmix data prepare imagenet --archives "$DATA" --out "$PREPARED" --format "${FORMAT:-folder}" "${PREPARE[@]}"
  DATA=$PREPARED
fi
for row in baseline mixup cutmix rm; do
  run="$OUT/r50-$row"
  torchrun --standalone --nproc_per_node="$GPUS" --no-python \
    rmix train --preset "imagenet-r50-$row" --data-dir "$DATA" --out "$run" --resume auto "${EXTRA[@]}"
  rmix eval --checkpoint "$run/best.pt" --data-dir "$DATA" --json > "$run/eval.json"
  echo "$row: $(cat "$run/eval.json")"
done
