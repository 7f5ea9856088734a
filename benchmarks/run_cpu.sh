#!/usr/bin/env bash
# The standard CPU benchmark: three model sizes, each exported fp32 and benched against diffusers (see
# benchmarks/README.md, "CPU recipe"). Minutes, not tens of minutes, on 2 cores.
#
#   benchmarks/run_cpu.sh              # prepare what is missing, bench the three sizes, print the size table
#   SIZES=tiny benchmarks/run_cpu.sh   # one or more of: tiny small sd15
#
# tiny  = tiny-sd1 (sdtrt init-random), 64x64, 20 steps, batch 1,4
# small = small-sd1 (benchmarks/init_small.py: tiny-sd1 with a 3-level 64/128/256 UNet), 64x64, 20 steps, batch 1,4
# sd15  = SD 1.5's architecture (sdtrt init-random --arch sd15), 128x128, 4 steps, batch 1 (export: ~3 min, 11 GB)
# Knobs: OUT (benchmarks/results), WORK (/tmp/sdtrt-cpu), RUNS (5; sd15: 3), THREADS (1: steadier on a shared
# machine; with 1, ONNX Runtime has no pool threads to spin), NOTE (appended to the report names).
# Reports: <OUT>/cpu-<n>core-<date>-<size>[NOTE].{json,md,png}; an existing name gets -2, -3...
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-benchmarks/results}
WORK=${WORK:-/tmp/sdtrt-cpu}
RUNS=${RUNS:-5}
THREADS=${THREADS:-1}
SIZES=${SIZES:-tiny small sd15}
NOTE=${NOTE:-}
SDTRT=${SDTRT:-.venv/bin/sdtrt}
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
log() { echo "[run_cpu $(date +%H:%M:%S)] $* (load $(cut -d' ' -f1-3 /proc/loadavg))"; }

prepare() {  # name, how to make the checkpoint
    local name=$1; shift
    if [ ! -f "$WORK/$name/model_index.json" ]; then log "checkpoint $name"; "$@" >/dev/null; fi
    if [ ! -f "$WORK/$name-wd/manifest.json" ]; then
        log "export $name (fp32: ORT on CPU is faster in fp32 than fp16)"
        $SDTRT export "$WORK/$name" "$WORK/$name-wd" --precision fp32 --no-validate -q
    fi
}

bench() {  # name, size, steps, batches, runs
    local name=$1 size=$2 steps=$3 batches=$4 runs=$5
    log "bench $name ${size}x${size}, $steps steps, batch $batches, $runs runs"
    $SDTRT bench "$WORK/$name-wd" --steps "$steps" --height "$size" --width "$size" --batch-sizes "$batches" \
        --runs "$runs" --warmup 1 --threads "$THREADS" --out "$OUT" \
        --stem "cpu-$(nproc)core-$(date +%F)-$name$NOTE"
}

mkdir -p "$WORK" "$OUT"
for size in $SIZES; do
    case $size in
        tiny) prepare tiny-sd1 $SDTRT init-random "$WORK/tiny-sd1" --arch tiny-sd1 --overwrite -q
              bench tiny-sd1 64 20 1,4 "$RUNS" ;;
        small) prepare small-sd1 $PY benchmarks/init_small.py "$WORK/small-sd1"
               bench small-sd1 64 20 1,4 "$RUNS" ;;
        sd15) prepare sd15 $SDTRT init-random "$WORK/sd15" --arch sd15 --overwrite -q
              bench sd15 128 4 1 "$((RUNS < 3 ? RUNS : 3))" ;;
        *) echo "unknown size $size (tiny, small, sd15)" >&2; exit 2 ;;
    esac
done
log "done"
