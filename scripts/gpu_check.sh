#!/usr/bin/env bash
# The GPU check of rmix: one run on a bare CUDA machine (no network, no DALI, its own torch and
# Triton), measuring rather than debugging, in under 9 minutes.
#
#   OUT=gpu_results bash scripts/gpu_check.sh          # from the repository root
#   GPU_CHECK_DRY=1 OUT=/tmp/x bash scripts/gpu_check.sh   # anywhere: every step skipped, JSON and table still written
#
# Steps, in order of what matters most when time runs short. BUDGET_S is shared out in advance
# (SHARES below, in percent): each step may run for its share plus whatever the steps before it
# left unused, never into the shares of the steps after it, so the whole ends inside BUDGET_S and
# no step is starved. One that fails is recorded and the next runs:
#   doctor        `rmix doctor --json`: versions, the kernel against the torch reference in every variant the
#                 trainer runs, the decoders against the CPU's, 20 steps on each loader (what a user runs first)
#   kernels       the Triton kernel against the torch reference on full-size batches (pytest -m needs_cuda)
#   host-syncs    synchronizing calls per training step, as torch's sync-debug mode sees them (value reads and
#                 blocking copies torch makes; not waits inside nvJPEG, DALI or the allocator): 0 expected
#   bench-mix     the fused op against the unfused steps, and its kernel alone: GB/s and the fraction of the
#                 memory's peak (fp32, bf16)
#   train-smoke   `rmix train` end to end on the embedded set, 2 epochs of 15 steps (batch 64); without DALI
#                 the torchvision loader, its JPEGs decoded on the GPU (--torch-decode device, nvJPEG)
#   bench-train   ResNet-50, batch 256, 224 px, bf16, channels_last: RM vs none in memory (and RM with
#                 --deterministic's kernels: what cuDNN's and torch's deterministic choices cost), and fed by
#                 the loader (as train-smoke's); eager, then RM alone eager beside --compile default (one graph)
# Environment (all optional):
#   OUT            results folder [gpu_results]; at most 8 files land there (what the device tool returns)
#   GPU_CHECK_DRY  1: skip every step, saying why (CI runs this)
#   RMIX_PYTHON    the python to use [.venv/bin/python if it imports torch, else python3]
#   BUDGET_S       seconds for the whole script [510]; the device tool's timeout should leave ~30 s more
#   RMIX_CACHE     where synthetic JPEGs are written [/tmp/rmix-cache]
#   IMAGES         synthetic 500x375 JPEGs for the loader run [1024]
#   WORKERS        DataLoader workers of the loader run [12]
# Nothing is downloaded. A missing package (click, tqdm, ...) is installed only from a carried wheels/
# folder: `pip download -d wheels click tqdm` beside the checkout, then carry wheels/.
# Files in $OUT: summary.json (every step: status, reason, exit code, seconds, its limit; rewritten after each),
# versions.json, log.txt (all output, nvidia-smi's first), doctor.json, bench_mix.jsonl, host_syncs.jsonl,
# bench_train.jsonl, train_smoke.jsonl. The last lines printed are the summary table.
set -u  # no -e: a failure is recorded, not fatal

cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
DRY=${GPU_CHECK_DRY:-0}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
: > "$LOG"
BUDGET_S=${BUDGET_S:-510}
START=$(date +%s)
DEADLINE=$(( START + BUDGET_S ))
export RMIX_CACHE=${RMIX_CACHE:-/tmp/rmix-cache}
IMAGES=${IMAGES:-1024}
WORKERS=${WORKERS:-12}
# The working tree in the installed layout (rmix.pipelines, rmix.kernels, rmix.cli), whatever the
# venv's editable install points at, with no install (the GPU machine may lack setuptools): a folder
# of links first on the path, and no implicit ./ (PYTHONSAFEPATH) so the tree's bare rmix/ is not
# found before it by `python -c` and `python -m pytest`.
SRC=$(mktemp -d)
mkdir "$SRC/rmix"
for f in rmix/*; do ln -s "$PWD/$f" "$SRC/rmix/"; done
ln -s "$PWD/pipelines" "$SRC/rmix/pipelines"
ln -s "$PWD/kernels" "$SRC/rmix/kernels"
export PYTHONPATH="$SRC${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1
unset TRITON_INTERPRET                               # compiled Triton on the GPU, not the interpreter
STEPS=""
GRACE=5  # seconds between a step's timeout and its SIGKILL, inside its limit

# Each step's share of BUDGET_S in percent, in the order they run (install-wheels only runs when a
# package is missing; its share then goes to the others when it does not).
ORDER=(install-wheels doctor kernels host-syncs bench-mix-fp32 bench-mix-bf16 train-smoke synth-jpegs
       bench-train-r50 bench-train-r50-compile)
declare -A SHARES=([install-wheels]=6 [doctor]=14 [kernels]=9 [host-syncs]=6 [bench-mix-fp32]=4 [bench-mix-bf16]=4
                   [train-smoke]=8 [synth-jpegs]=4 [bench-train-r50]=20 [bench-train-r50-compile]=25)
share() { echo $(( BUDGET_S * SHARES[$1] / 100 )); }
after() {  # after NAME: the seconds the steps after NAME are owed (their shares)
    local n seen=0 sum=0
    for n in "${ORDER[@]}"; do
        [ "$seen" = 1 ] && sum=$(( sum + $(share "$n") ))
        [ "$n" = "$1" ] && seen=1
    done
    echo "$sum"
}
now() {  # the clock; a dry run's stands still, so its limits are the plan's, whatever the machine's load
    if [ "$DRY" = 1 ]; then echo "$START"; else date +%s; fi
}
limit() {  # limit NAME: its share plus what the steps before it left, never the later steps' shares
    local left=$(( DEADLINE - $(now) - $(after "$1") ))
    echo $(( left > 0 ? left : 0 ))
}

record() {  # record NAME STATUS RC SECONDS REASON LIMIT: one entry of summary.json, rewritten after every step
    STEPS="${STEPS:+$STEPS,
}  {\"step\": \"$1\", \"status\": \"$2\", \"rc\": $3, \"seconds\": $4, \"reason\": \"$5\", \"limit_s\": $6}"
    printf '{"budget_s": %s, "dry": %s, "steps": [\n%s\n]}\n' "$BUDGET_S" "$([ "$DRY" = 1 ] && echo true || echo false)" \
        "$STEPS" > "$OUT/summary.json"
}

step() {  # step NAME STDOUT_FILE|- COMMAND...: run within its limit, append stdout to the file
    local name=$1 dest=$2 t t0 rc status
    shift 2
    t=$(limit "$name")
    if [ "$DRY" = 1 ]; then  # the limit it would get if every step before it ran to its own
        echo "=== $name: skipped (dry run, limit ${t}s): $*" >> "$LOG"
        record "$name" skipped null 0 "dry run (GPU_CHECK_DRY=1)" "$t"
        DEADLINE=$(( DEADLINE - t ))
        return
    fi
    if [ -n "${NO_GPU:-}" ]; then
        echo "=== $name: skipped, $NO_GPU" >> "$LOG"
        record "$name" skipped null 0 "$NO_GPU" "$t"
        return
    fi
    if [ "$t" -lt 20 ]; then
        echo "=== $name: skipped, ${t}s of the budget left for it" >> "$LOG"
        record "$name" skipped null 0 "budget spent (${t}s left for it)" "$t"
        return
    fi
    echo "=== $name (limit ${t}s): $*" >> "$LOG"
    t0=$(date +%s)
    if [ "$dest" = - ]; then
        timeout -k "$GRACE" $(( t - GRACE )) "$@" >> "$LOG" 2>&1
        rc=$?
    else
        timeout -k "$GRACE" $(( t - GRACE )) "$@" > "$dest.part" 2>> "$LOG"
        rc=$?
        cat "$dest.part" >> "$dest"
        cat "$dest.part" >> "$LOG"
        rm -f "$dest.part"
    fi
    case $rc in
        0) status=ok; reason="" ;;
        124|137) status=timeout; reason="no result within ${t}s" ;;
        *) status=failed; reason="exit $rc, see log.txt" ;;
    esac
    echo "=== $name: $status (rc $rc, $(( $(date +%s) - t0 ))s)" >> "$LOG"
    record "$name" "$status" "$rc" "$(( $(date +%s) - t0 ))" "$reason" "$t"
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
wanted = {"torch": "torch", "torchvision": "torchvision", "triton": "triton", "click": "click", "tqdm": "tqdm",
          "PIL": "pillow", "numpy": "numpy", "pytest": "pytest"}
missing = []
for module, package in wanted.items():
    try:
        importlib.import_module(module)
    except Exception:
        missing.append(package)
print(" ".join(missing))
EOF
)
if [ -n "$MISSING" ] && [ "$DRY" != 1 ]; then
    echo "missing packages: $MISSING" >> "$LOG"
    if [ -d wheels ]; then
        # shellcheck disable=SC2086 # one word per package
        step install-wheels - "$PY" -m pip install --no-index --find-links wheels $MISSING
    else
        echo "no wheels/ folder to install them from" >> "$LOG"
        record install-wheels failed null 0 "missing $MISSING and no wheels/ folder" 0
    fi
fi
if [ "$DRY" != 1 ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" > /dev/null 2>&1; then
    NO_GPU="no CUDA device visible to $PY"
fi
RMIX=("$PY" -c "import sys; sys.argv[0] = 'rmix'; from rmix.cli import main; main()")
# DALI's wheel (~0.5 GB) is too big to carry: without it the loader runs are torchvision's, their JPEGs
# decoded on the GPU with nvJPEG (torchvision.io.decode_jpeg: --torch-decode device)
if "$PY" -c "import nvidia.dali" > /dev/null 2>&1; then LOADER=dali; DECODE=(); else LOADER=torch; DECODE=(--torch-decode device); fi

# ---- the machine
{ echo "=== nvidia-smi"; nvidia-smi; echo; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit \
    --format=csv; } >> "$LOG" 2>&1
"$PY" - > "$OUT/versions.json" 2>> "$LOG" << EOF
import json, os, sys
info = {"python_executable": os.path.realpath(sys.executable), "loader": "$LOADER", "dry": "$DRY" == "1"}
try:
    import torch
    from rmix.bench.timing import machine_info
    info.update(machine_info("cuda" if torch.cuda.is_available() else "cpu"))
    info["cuda_available"] = torch.cuda.is_available()
except Exception as e:  # noqa: BLE001 - recorded, the steps say the rest
    info["error"] = f"{type(e).__name__}: {e}"
try:
    import triton
    info["triton"] = triton.__version__
except Exception as e:  # noqa: BLE001
    info["triton"] = f"unavailable: {e}"
print(json.dumps(info, indent=1))
EOF

# ---- doctor: what every GPU user runs first
step doctor "$OUT/doctor.json" "${RMIX[@]}" doctor --json
# ---- kernels: the full-size CUDA tests (compiled Triton against the torch reference)
step kernels - "$PY" -m pytest tests/test_kernels.py -q -m needs_cuda -p no:cacheprovider
# ---- the step's host syncs, as torch's sync-debug mode sees them
step host-syncs "$OUT/host_syncs.jsonl" "$PY" scripts/gpu_sync.py --steps 10
# ---- the fused op's bandwidth
step bench-mix-fp32 "$OUT/bench_mix.jsonl" "${RMIX[@]}" bench mix --device cuda --json
step bench-mix-bf16 "$OUT/bench_mix.jsonl" "${RMIX[@]}" bench mix --device cuda --dtype bf16 --json
# ---- end to end: a short epoch on the embedded set
RUN=$(mktemp -d)/run
step train-smoke - "${RMIX[@]}" train --device cuda --loader "$LOADER" "${DECODE[@]}" --epochs 2 \
    --out "$RUN" --log-every 5
[ -f "$RUN/metrics.jsonl" ] && cp "$RUN/metrics.jsonl" "$OUT/train_smoke.jsonl"
# ---- the training step at ImageNet scale: in memory, and fed by the loader
DATA_FILE=$(mktemp)  # the synthetic set's path, printed by the step (outside $OUT)
step synth-jpegs "$DATA_FILE" "$PY" -c "from rmix.bench.data import synthetic_jpegs; print(synthetic_jpegs($IMAGES))"
DATA=$(tail -n 1 "$DATA_FILE" 2>/dev/null)
[ -n "$DATA" ] && [ -d "$DATA" ] || DATA=""
R50=(bench train --device cuda --model resnet50 --amp bf16 --channels-last --batch 256 --size 224 --loader "$LOADER"
     "${DECODE[@]}" --workers "$WORKERS" --json ${DATA:+--data-dir "$DATA"})
step bench-train-r50 "$OUT/bench_train.jsonl" "${RMIX[@]}" "${R50[@]}" --deterministic
step bench-train-r50-compile "$OUT/bench_train.jsonl" "${RMIX[@]}" "${R50[@]}" --compile default --compiled rm

echo "=== done: $(grep -c '"ok"' "$OUT/summary.json") ok of $(grep -c '"step"' "$OUT/summary.json") steps" >> "$LOG"
"$PY" scripts/gpu_summary.py "$OUT" 2>> "$LOG" || python3 scripts/gpu_summary.py "$OUT" || cat "$OUT/summary.json"
