#!/usr/bin/env bash
# The GPU check of rmix, prepared to run once on a CUDA machine with no network (one H200, <= 8 min):
# the Triton kernel tests on CUDA, `rmix bench mix|data|train` on the GPU, and a `rmix train` smoke run.
#
#   OUT=gpu_results bash scripts/gpu_check.sh          # from the repository root
#
# Environment (all optional):
#   OUT          results folder [gpu_results]
#   RMIX_PYTHON  the python to use [.venv/bin/python if it imports torch, else python3]
#   BUDGET_S     seconds for the whole script [450]; each step's timeout is cut to what is left
#   RMIX_CACHE   where synthetic JPEGs are written [/tmp/rmix-cache]
#   IMAGES       synthetic 500x375 JPEGs for the data and train benchmarks [1024]
#   WORKERS      DALI threads of the train benchmark's loader [8]
# Nothing is downloaded. A missing package is installed only from a carried wheels/ folder
# (pip --no-index --find-links wheels). A failing step is recorded and the next one runs.
# At most 8 files land in $OUT (the device tool returns no more): summary.json (every step's
# status, exit code, seconds), versions.json, nvidia-smi.txt, log.txt (all output),
# bench_mix.jsonl, bench_data.json, bench_train.jsonl, train_smoke.jsonl.
set -u  # no -e: a failure is recorded, not fatal

cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
: > "$LOG"
BUDGET_S=${BUDGET_S:-450}
DEADLINE=$(( $(date +%s) + BUDGET_S ))
export RMIX_CACHE=${RMIX_CACHE:-/tmp/rmix-cache}
IMAGES=${IMAGES:-1024}
WORKERS=${WORKERS:-8}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the working tree, whatever the venv's editable install points at
unset TRITON_INTERPRET                               # compiled Triton on the GPU, not the interpreter
STEPS=""

record() {  # record NAME STATUS RC SECONDS: one entry of summary.json, rewritten after every step
    STEPS="${STEPS:+$STEPS,
}  {\"step\": \"$1\", \"status\": \"$2\", \"rc\": $3, \"seconds\": $4}"
    printf '{"budget_s": %s, "steps": [\n%s\n]}\n' "$BUDGET_S" "$STEPS" > "$OUT/summary.json"
}

step() {  # step NAME MAX_SECONDS STDOUT_FILE|- COMMAND...: run with a timeout, append stdout to the file
    local name=$1 max=$2 dest=$3 left t t0 rc status
    shift 3
    left=$(( DEADLINE - $(date +%s) ))
    t=$(( left < max ? left : max ))
    if [ "$t" -lt 20 ]; then
        echo "=== $name: skipped, ${left}s of the budget left" >> "$LOG"
        record "$name" skipped null 0
        return
    fi
    echo "=== $name (timeout ${t}s): $*" >> "$LOG"
    t0=$(date +%s)
    if [ "$dest" = - ]; then
        timeout -k 10 "$t" "$@" >> "$LOG" 2>&1
        rc=$?
    else
        timeout -k 10 "$t" "$@" > "$dest.part" 2>> "$LOG"
        rc=$?
        cat "$dest.part" >> "$dest"
        cat "$dest.part" >> "$LOG"
        rm -f "$dest.part"
    fi
    case $rc in
        0) status=ok ;;
        124|137) status=timeout ;;
        *) status=failed ;;
    esac
    echo "=== $name: $status (rc $rc, $(( $(date +%s) - t0 ))s)" >> "$LOG"
    record "$name" "$status" "$rc" "$(( $(date +%s) - t0 ))"
}

# ---- python: the carried venv if it works, else the machine's; missing packages from wheels/ only
PY=""
for p in "${RMIX_PYTHON:-}" .venv/bin/python python3 python; do
    if [ -n "$p" ] && "$p" -c "import torch" > /dev/null 2>&1; then PY=$p; break; fi
done
if [ -z "$PY" ]; then
    PY=${RMIX_PYTHON:-python3}
    echo "no python here imports torch; trying $PY" >> "$LOG"
fi
MISSING=$("$PY" - << 'EOF' 2>> "$LOG"
import importlib
wanted = {"torch": "torch", "torchvision": "torchvision", "nvidia.dali": "nvidia-dali-cuda120",
          "triton": "triton", "click": "click", "tqdm": "tqdm", "PIL": "pillow", "numpy": "numpy",
          "pytest": "pytest"}
missing = []
for module, package in wanted.items():
    try:
        importlib.import_module(module)
    except Exception:
        missing.append(package)
print(" ".join(missing))
EOF
)
if [ -n "$MISSING" ]; then
    echo "missing packages: $MISSING" >> "$LOG"
    if [ -d wheels ]; then
        # shellcheck disable=SC2086 # one word per package
        step install-wheels 120 - "$PY" -m pip install --no-index --find-links wheels $MISSING
    else
        echo "no wheels/ folder to install them from" >> "$LOG"
        record install-wheels failed null 0
    fi
fi
RMIX=("$PY" -c "import sys; sys.argv[0] = 'rmix'; from cli import main; main()")
# DALI's wheel (~0.5 GB) is too big to carry: without it the loaders are torchvision's and the
# data benchmark compares only those (its JSON lists what it skipped)
if "$PY" -c "import nvidia.dali" > /dev/null 2>&1; then
    LOADER=dali; DATA_DEVICE=(--dali-device gpu)
else
    LOADER=torch; DATA_DEVICE=(--device cuda)
    echo "nvidia.dali is not importable: torchvision loaders only" >> "$LOG"
fi

# ---- the machine
{ nvidia-smi; echo; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv; } \
    > "$OUT/nvidia-smi.txt" 2>&1
"$PY" - > "$OUT/versions.json" 2>> "$LOG" << 'EOF'
import json, os
from rmix.timing import machine_info
import torch
info = machine_info("cuda" if torch.cuda.is_available() else "cpu")
try:
    import triton
    info["triton"] = triton.__version__
except Exception as e:  # noqa: BLE001
    info["triton"] = f"unavailable: {e}"
info["cuda_available"] = torch.cuda.is_available()
info["python_executable"] = os.path.realpath(__import__("sys").executable)
print(json.dumps(info, indent=1))
EOF

# ---- kernels: the full-size CUDA tests, then the whole file compiled on the GPU (no interpreter)
step kernel-tests-needs-cuda 150 - "$PY" -m pytest tests/test_kernels.py -q -m needs_cuda
step kernel-tests-compiled 150 - "$PY" -m pytest tests/test_kernels.py -q

# ---- benchmarks; every figure is one JSON object per line
step bench-mix-fp32 60 "$OUT/bench_mix.jsonl" "${RMIX[@]}" bench mix --device cuda --json
step bench-mix-bf16 60 "$OUT/bench_mix.jsonl" "${RMIX[@]}" bench mix --device cuda --dtype bf16 --json
DATA_FILE=$(mktemp)  # the synthetic set's path, printed by the step (outside $OUT: 8 files at most there)
step synth-jpegs 240 "$DATA_FILE" "$PY" -c \
    "from rmix.bench_data import synthetic_jpegs; print(synthetic_jpegs($IMAGES))"
DATA=$(tail -n 1 "$DATA_FILE")
if [ -n "$DATA" ] && [ -d "$DATA" ]; then
    step bench-data-gpu 150 "$OUT/bench_data.json" "${RMIX[@]}" bench data --data-dir "$DATA" "${DATA_DEVICE[@]}" \
        --images "$IMAGES" --json
    step bench-train-resnet50 150 "$OUT/bench_train.jsonl" "${RMIX[@]}" bench train --device cuda --model resnet50 \
        --amp bf16 --channels-last --batch 256 --size 224 --data-dir "$DATA" --loader "$LOADER" --workers "$WORKERS" \
        --json
else
    echo "=== no synthetic JPEGs: bench-data-gpu and bench-train-resnet50 skipped" >> "$LOG"
    record bench-data-gpu skipped null 0
    record bench-train-resnet50 skipped null 0
fi
step bench-train-resnet8 90 "$OUT/bench_train.jsonl" "${RMIX[@]}" bench train --device cuda --loader "$LOADER" --json

# ---- end to end: one short epoch on the embedded set (DALI decoding on the GPU when it is there)
RUN=$(mktemp -d)/run
step train-smoke 120 - "${RMIX[@]}" train --device cuda --loader "$LOADER" --epochs 1 --max-steps 30 --out "$RUN" \
    --log-every 10
[ -f "$RUN/metrics.jsonl" ] && cp "$RUN/metrics.jsonl" "$OUT/train_smoke.jsonl"

echo "=== done: $(grep -c '"ok"' "$OUT/summary.json") ok of $(grep -c '"step"' "$OUT/summary.json") steps" >> "$LOG"
tail -n 1 "$LOG"
cat "$OUT/summary.json"
