#!/usr/bin/env bash
# The paper's CIFAR-10 result (PyramidNet-200, alpha 240, RM: 97.65% top-1, mean of 3 runs).
#   scripts/reproduce_cifar10.sh DATA_DIR [GPUS=2] [OUT=runs/cifar10]
# DATA_DIR holds cifar-10-batches-py/ (the official python batches). Three seeds, each resumable
# (--resume auto); `rmix eval` of each best.pt goes to eval.json, and the mean is printed.
# SMOKE=1 shrinks everything to seconds on a CPU (a smoke test of the script itself).
set -euo pipefail
DATA=${1:?usage: $0 DATA_DIR [GPUS] [OUT]}
GPUS=${2:-2}
OUT=${3:-runs/cifar10}
EXTRA=()
if [[ "${SMOKE:-0}" == 1 ]]; then
  EXTRA=(--epochs 1 --warmup 0 --max-steps 1 --batch-size $((4 * GPUS)) --model resnet8 --workers 1
         --device cpu --log-every 1)
fi
for seed in 0 1 2; do
  run="$OUT/pyramidnet200-rm-seed$seed"
  torchrun --standalone --nproc_per_node="$GPUS" --no-python \
    rmix train --preset cifar10-pyramidnet200-rm --data-dir "$DATA" --seed "$seed" --out "$run" --resume auto \
    "${EXTRA[@]}"
  rmix eval --checkpoint "$run/best.pt" --data-dir "$DATA" --json > "$run/eval.json"
done
python3 - "$OUT" <<'PY'
import json, pathlib, statistics, sys
tops = [json.loads(p.read_text())["top1"] for p in sorted(pathlib.Path(sys.argv[1]).glob("*/eval.json"))]
print(f"best-checkpoint top-1 over {len(tops)} seeds: mean {statistics.mean(tops):.2f}%"
      + (f", std {statistics.stdev(tops):.2f}" if len(tops) > 1 else "") + " (paper: 97.65%)")
PY
