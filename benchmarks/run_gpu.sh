#!/usr/bin/env bash
# The GPU benchmark, as a lent GPU session runs it (see benchmarks/README.md, "GPU recipe").
#
#   benchmarks/run_gpu.sh prepare          # install carried wheels; per case: init-random, export (+ engines if TensorRT)
#   benchmarks/run_gpu.sh bench            # per case: prepare if needed, then `sdtrt bench` into $OUT/<case>/
#   benchmarks/run_gpu.sh all              # each case prepared then benched, in CASES order (default)
#   DRY_RUN=1 benchmarks/run_gpu.sh all    # no GPU needed: checks the imports and parses every sdtrt command line
#                                          # with sdtrt's own argument parser, prints the plan, runs nothing heavy
#
# Cases (CASES, default "sdxl sd15", run in that order; random weights, `sdtrt init-random --arch <arch>`):
#   sdxl  SDXL base 1.0, 1024x1024, 30 steps, batch 1 (published anchor: TensorRT ~1.47 s end to end on an H100,
#         Stability AI / NVIDIA's stable-diffusion-xl-1.0-tensorrt model card)
#   sd15  SD 1.5, 512x512, 50 steps, batch 1
# Per-case knobs: <CASE>_SIZE, <CASE>_STEPS, <CASE>_BATCHES, <CASE>_RUNS (e.g. SDXL_RUNS=5, SD15_BATCHES=1,4).
#
# REDUCED SETTINGS, to fit BOTH cases into ONE 10-minute device command including init-random and export (a task
# has 15 minutes of device time in all, start-up included; ../shared/gpu/README.md): batch 1 only (SD 1.5 used to
# run 1,4), RUNS 3 (was 5) alone + 3 interleaved after 1 warm-up, no torch.compile contender (SKIP_COMPILE=1),
# export without the ONNX Runtime validation (VALIDATE=0: it runs on the CPU there; PSNR checks the outputs).
# Expected, NOT measured (no GPU run of this script yet): sdxl ~1 min init-random (3.5 B parameters, 14 GB fp32 on
# disk), ~3-4 min export, ~2.5 min bench (four loads of 14 GB, ~8 requests of ~3 s per contender); sd15 ~30 s +
# ~1.5 min + ~1 min. Each case starts only if the budget guard leaves it its minimum (<CASE>_MIN_S: sdxl 300 s,
# sd15 150 s), else it is skipped with a log line; the bench itself is cut at BUDGET_S (570) seconds after the
# start so that the command, not the tool, ends first and $OUT comes back. $OUT/phases.tsv records every phase's
# seconds, to size the next run.
#
# Other knobs (environment): OUT (required), WORK (/tmp/sdtrt-gpu: checkpoints and workdirs, reused while the
# machine stays warm), PRECISION (fp16), VALIDATE (0), WARMUP (1), CONTENDERS (auto: every one that runs there),
# SKIP_COMPILE (1), THREADS (torch/ORT intra-op threads; default: the libraries' own), PYTHON (python3).
# Rules as on the CPU (sdtrt bench): every contender alone, then interleaved (flagged past 1.10x), UNet and
# overhead per step, speed-ups from the same run, PSNR against diffusers fp32 on the GPU with TF32 off.
set -euo pipefail
cd "$(dirname "$0")/.."

: "${OUT:?set OUT to the folder the reports go to}"
WORK=${WORK:-/tmp/sdtrt-gpu}
CASES=${CASES:-sdxl sd15}
PRECISION=${PRECISION:-fp16}
VALIDATE=${VALIDATE:-0}
WARMUP=${WARMUP:-1}
CONTENDERS=${CONTENDERS:-auto}
SKIP_COMPILE=${SKIP_COMPILE:-1}
THREADS=${THREADS:-}
BUDGET_S=${BUDGET_S:-570}
DRY_RUN=${DRY_RUN:-0}
PYTHON=${PYTHON:-python3}
PHASE=${1:-all}
START=$SECONDS

# case -> arch, size, steps, batches, runs, minimum seconds left to start it; <CASE>_* overrides each
declare -A ARCH=([sdxl]=sdxl [sd15]=sd15)
declare -A DEF_SIZE=([sdxl]=1024 [sd15]=512)
declare -A DEF_STEPS=([sdxl]=30 [sd15]=50)
declare -A DEF_BATCHES=([sdxl]=1 [sd15]=1)
declare -A DEF_RUNS=([sdxl]=3 [sd15]=3)
declare -A DEF_MIN_S=([sdxl]=300 [sd15]=150)

case "$PHASE" in prepare|bench|all) ;; *) echo "usage: $0 [prepare|bench|all]" >&2; exit 2 ;; esac
for c in $CASES; do
    [ -n "${ARCH[$c]:-}" ] || { echo "unknown case '$c' in CASES; choose from ${!ARCH[*]}" >&2; exit 2; }
done

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$OUT"
log() { echo "[run_gpu $(date +%H:%M:%S) +$((SECONDS - START))s] $*"; }
left() { echo $((BUDGET_S - (SECONDS - START))); }
knob() {  # knob CASE NAME: $<CASE>_<NAME> if set, else the case's default
    local var="${1^^}_$2" def="DEF_$2[$1]"
    echo "${!var:-${!def}}"
}
phase() {  # phase CASE NAME CMD...: run and record its seconds in $OUT/phases.tsv
    local c=$1 name=$2 t0=$SECONDS rc=0
    shift 2
    "$@" || rc=$?
    printf '%s\t%s\t%d\t%d\n' "$c" "$name" $((SECONDS - t0)) "$rc" >>"$OUT/phases.tsv"
    return $rc
}

# Packages the GPU image lacks (diffusers, onnx-graphsurgeon, ...) travel as wheels in .whl/ (git-ignored).
if [ "$DRY_RUN" != 1 ] && compgen -G ".whl/*.whl" >/dev/null; then
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}

if [ "$DRY_RUN" = 1 ]; then
    # every command line goes through sdtrt's own parser (a typo in a flag fails here), then is printed
    sdtrt() {
        $PYTHON -c "import sys; from sdtrt.cli import build_parser; from sdtrt.errors import SdtrtError
try: build_parser().parse_args(sys.argv[1:])
except SdtrtError as e: sys.exit(f'DRY-RUN: bad command line: sdtrt {\" \".join(sys.argv[1:])}: {e}')" "$@" || return
        echo "DRY-RUN: sdtrt $*"
    }
    bench_cmd() { local t=$1; shift; echo "DRY-RUN: timeout --signal=INT $t"; sdtrt "$@"; }
else
    sdtrt() { $PYTHON -m sdtrt "$@"; }
    bench_cmd() { local t=$1; shift; timeout --signal=INT "$t" $PYTHON -m sdtrt "$@"; }
fi

log "environment (cases: $CASES; budget ${BUDGET_S}s$([ "$DRY_RUN" = 1 ] && echo '; DRY RUN'))"
if [ "$DRY_RUN" != 1 ]; then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true; fi
$PYTHON -c "import torch, diffusers, transformers, onnx, onnxruntime; import sdtrt.cli, sdtrt.bench; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__)"

prepare() {  # prepare CASE
    local c=$1 arch=${ARCH[$1]} size
    local ckpt=$WORK/$arch wd=$WORK/$arch-$PRECISION
    size=$(knob "$c" SIZE)
    if [ ! -f "$ckpt/model_index.json" ]; then
        log "$c: init-random $arch -> $ckpt"
        phase "$c" init-random sdtrt init-random "$ckpt" --arch "$arch" --seed 0 --overwrite -q
    fi
    if [ ! -f "$wd/manifest.json" ]; then
        log "$c: export $PRECISION -> $wd"
        local flags=()
        if [ "$VALIDATE" != 1 ]; then flags+=(--no-validate); fi
        phase "$c" export sdtrt export "$ckpt" "$wd" --precision "$PRECISION" "${flags[@]}" -q
    fi
    # TensorRT engines only where a builder for this GPU exists (TensorRT proper; TensorRT-RTX does not run on the
    # lent Hopper machines): otherwise the tensorrt contenders are skipped, with the reason in the JSON.
    if [ "$DRY_RUN" = 1 ] || { $PYTHON -c "import tensorrt" 2>/dev/null; }; then
        if ! compgen -G "$wd/engines/*.plan" >/dev/null; then
            log "$c: build TensorRT engines"
            # one engine set for every batch size benched: dynamic batch up to the largest, sides fixed at SIZE
            local max_batch
            max_batch=$(tr ',' '\n' <<<"$(knob "$c" BATCHES)" | sort -n | tail -1)
            phase "$c" build sdtrt build "$wd" --tensorrt tensorrt --dynamic --max-batch "$max_batch" \
                --height "$size" --width "$size" --min-side "$size" --max-side "$size" -q \
                || log "$c: engine build failed; the tensorrt contenders will be skipped"
        fi
    else
        log "$c: no TensorRT builder here: the tensorrt contenders will be skipped"
    fi
}

bench() {  # bench CASE
    local c=$1 arch=${ARCH[$1]} size
    local wd=$WORK/$arch-$PRECISION
    size=$(knob "$c" SIZE)
    [ "$DRY_RUN" = 1 ] || [ -f "$wd/manifest.json" ] || prepare "$c"
    mkdir -p "$OUT/$c"
    local flags=(--contenders "$CONTENDERS" --steps "$(knob "$c" STEPS)" --batch-sizes "$(knob "$c" BATCHES)"
                 --height "$size" --width "$size" --runs "$(knob "$c" RUNS)" --warmup "$WARMUP" --out "$OUT/$c")
    if [ "$SKIP_COMPILE" = 1 ]; then flags+=(--skip-compile); fi
    if [ -n "$THREADS" ]; then flags+=(--threads "$THREADS"); fi
    local t
    t=$(left)
    if [ "$t" -lt 60 ]; then log "$c: only ${t}s of the budget left: not benching"; return 1; fi
    log "$c: bench ${flags[*]} (cut at ${t}s)"
    phase "$c" bench bench_cmd "$t" bench "$wd" "${flags[@]}" 2>&1 | tee "$OUT/$c/bench.log"
}

status=0
for c in $CASES; do
    need=$(knob "$c" MIN_S)
    if [ "$PHASE" != prepare ] && [ "$(left)" -lt "$need" ]; then
        log "$c: SKIPPED, only $(left)s of the budget left (it needs ~${need}s)"
        printf '%s\tskipped\t0\t-\n' "$c" >>"$OUT/phases.tsv"
        status=1
        continue
    fi
    case "$PHASE" in
        prepare) prepare "$c" || status=1 ;;
        bench) bench "$c" || status=1 ;;
        all) { prepare "$c" && bench "$c"; } || status=1 ;;
    esac
done
log "done (status $status)"
[ "$DRY_RUN" = 1 ] || ls -lR "$OUT"
exit $status
