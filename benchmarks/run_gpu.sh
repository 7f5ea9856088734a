#!/usr/bin/env bash
# The GPU benchmark, as a lent GPU session runs it (see benchmarks/README.md, "GPU recipe").
#
#   benchmarks/run_gpu.sh prepare          # install carried wheels, init-random sd15, export fp16 (+ engines if TensorRT)
#   benchmarks/run_gpu.sh bench            # prepare if needed, then `sdtrt bench` into $OUT
#   benchmarks/run_gpu.sh all              # both (default)
#
# Knobs (environment): OUT (required: where the JSON/Markdown/PNG go), WORK (default /tmp/sdtrt-gpu: checkpoint and
# workdir, reused while the machine stays warm), ARCH (sd15), PRECISION (fp16), VALIDATE (0: export without the
# ONNX Runtime check, which runs on the CPU there and is not needed for the benchmark: PSNR checks the outputs),
# SIZE (512), STEPS (50), BATCHES (1,4), RUNS (5), WARMUP (1), CONTENDERS (auto), SKIP_COMPILE (1: torch.compile
# takes minutes; 0 to include diffusers-compile when there is time), THREADS (torch/ORT intra-op threads; default:
# the libraries' own). Reports are named <gpu>-<date>.{json,md,png} (-2, -3... if taken); the PSNR reference is
# diffusers fp32 on the GPU with TF32 off (`sdtrt bench`'s default there).
# Same rules as the CPU run: every contender alone, then interleaved (flagged past 1.10x), UNet and overhead per
# step. Sized for ONE 10-minute device command including init-random and export (all, the default): about 30 s +
# 2 min + 11 requests per contender and batch size (1 warm-up, RUNS alone, RUNS interleaved). A budget guard stops
# the bench at BUDGET_S (540) seconds after start so that $OUT still comes back.
set -euo pipefail
cd "$(dirname "$0")/.."

: "${OUT:?set OUT to the folder the reports go to}"
WORK=${WORK:-/tmp/sdtrt-gpu}
ARCH=${ARCH:-sd15}
PRECISION=${PRECISION:-fp16}
VALIDATE=${VALIDATE:-0}
SIZE=${SIZE:-512}
STEPS=${STEPS:-50}
BATCHES=${BATCHES:-1,4}
RUNS=${RUNS:-5}
WARMUP=${WARMUP:-1}
CONTENDERS=${CONTENDERS:-auto}
SKIP_COMPILE=${SKIP_COMPILE:-1}
THREADS=${THREADS:-}
PHASE=${1:-all}
BUDGET_S=${BUDGET_S:-540}
START=$SECONDS

CKPT=$WORK/$ARCH
WD=$WORK/$ARCH-$PRECISION
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

# Packages the GPU image lacks (diffusers, onnx-graphsurgeon, ...) travel as wheels in .whl/ (git-ignored).
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
SDTRT=${SDTRT:-python3 -m sdtrt}  # how to call the CLI (word-split on purpose)
sdtrt() { $SDTRT "$@"; }

log() { echo "[run_gpu $(date +%H:%M:%S)] $*"; }

prepare() {
    log "environment"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    python3 -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__)"
    if [ ! -f "$CKPT/model_index.json" ]; then
        log "init-random $ARCH -> $CKPT"
        sdtrt init-random "$CKPT" --arch "$ARCH" --seed 0 --overwrite -q
    fi
    if [ ! -f "$WD/manifest.json" ]; then
        log "export $PRECISION -> $WD"
        flags=()
        if [ "$VALIDATE" != 1 ]; then flags+=(--no-validate); fi
        sdtrt export "$CKPT" "$WD" --precision "$PRECISION" "${flags[@]}" -q
    fi
    # TensorRT engines only where a builder for this GPU exists (TensorRT proper; TensorRT-RTX does not run on the
    # lent Hopper machines): otherwise the tensorrt contenders are skipped, with the reason in the JSON.
    if python3 -c "import tensorrt" 2>/dev/null && sdtrt build --help >/dev/null 2>&1; then
        if ! compgen -G "$WD/engines/*.plan" >/dev/null; then
            log "build TensorRT engines"
            # one engine set for every batch size benched: dynamic batch up to the largest, sides fixed at SIZE
            max_batch=$(tr ',' '\n' <<<"$BATCHES" | sort -n | tail -1)
            sdtrt build "$WD" --tensorrt tensorrt --dynamic --max-batch "$max_batch" --height "$SIZE" --width "$SIZE" \
                --min-side "$SIZE" --max-side "$SIZE" -q || log "engine build failed; the tensorrt contenders will be skipped"
        fi
    else
        log "no TensorRT builder here: the tensorrt contenders will be skipped"
    fi
}

bench() {
    [ -f "$WD/manifest.json" ] || prepare
    mkdir -p "$OUT"
    flags=(--contenders "$CONTENDERS" --steps "$STEPS" --batch-sizes "$BATCHES" --height "$SIZE" --width "$SIZE"
           --runs "$RUNS" --warmup "$WARMUP" --out "$OUT")
    if [ "$SKIP_COMPILE" = 1 ]; then flags+=(--skip-compile); fi
    if [ -n "$THREADS" ]; then flags+=(--threads "$THREADS"); fi
    if [ -n "${STEM:-}" ]; then flags+=(--stem "$STEM"); fi
    log "bench ${flags[*]}"
    left=$((BUDGET_S - (SECONDS - START)))
    if [ "$left" -lt 60 ]; then log "only ${left}s of the budget left: not benching"; return 1; fi
    timeout --signal=INT "$left" $SDTRT bench "$WD" "${flags[@]}" 2>&1 | tee "$OUT/bench.log"
    ls -l "$OUT"
}

case "$PHASE" in
    prepare) prepare ;;
    bench) bench ;;
    all) prepare; bench ;;
    *) echo "usage: $0 [prepare|bench|all]" >&2; exit 2 ;;
esac
