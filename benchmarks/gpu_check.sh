#!/usr/bin/env bash
# One GPU check on an H100/H200 in under 8 minutes: environment, hardware floors, then AF3 latency
# at full size with random weights — transformers (eager SDPA generate) vs af3trt torch (eager bf16;
# FastTorchDecoder bf16 and FP8 when af3trt has it) at 30 s and 10 min of audio, batch 1 and 8 — then the
# kernel benchmark (if benchmarks/kernels_bench.py exists) and, if time is left, transformers with a
# static cache + compiled decode step, then the `-m gpu` tests. Every part runs under its own timeout, capped by the time
# left, and writes into OUT_DIR as it goes (a timed-out part keeps the rows it finished).
#
#   bash benchmarks/gpu_check.sh OUT_DIR
#
# OUT_DIR/status.txt   one line per part: rc and seconds (124 = timed out)
# OUT_DIR/env.json     environment record        OUT_DIR/floor.json   copy GB/s, bf16 TFLOP/s, floors
# OUT_DIR/latency.{json,md,_latency.png,_decode.png}   main table (schema: benchmarks/README.md)
# OUT_DIR/compiled.{json,md,...}                       hf-compiled vs hf, 30 s, batch 1
# OUT_DIR/<part>.log   each part's output
#
# Overrides (for a CPU dry run of this script): GPU_CHECK_BUDGET_S (465), GPU_CHECK_SCALE (1),
# GPU_CHECK_SECONDS (30,600), GPU_CHECK_BATCH (1,8), GPU_CHECK_TOKENS (32), PYTHON.
set -uo pipefail

OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."

PY=${PYTHON:-$(command -v python || command -v python3)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export AF3TRT_CACHE="${AF3TRT_CACHE:-$(mktemp -d)}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
TOTAL=${GPU_CHECK_BUDGET_S:-465}
SCALE=${GPU_CHECK_SCALE:-1}
SECONDS_LIST=${GPU_CHECK_SECONDS:-30,600}
BATCHES=${GPU_CHECK_BATCH:-1,8}
TOKENS=${GPU_CHECK_TOKENS:-32}
STATUS="$OUT/status.txt"
START=$SECONDS
: > "$STATUS"

left() { echo $(( TOTAL - (SECONDS - START) )); }

part() {  # part NAME MIN_S LIMIT_S CMD...: skipped when under MIN_S are left; LIMIT_S capped by what is left
    local name=$1 need=$2 limit=$3
    shift 3
    local remaining
    remaining=$(left)
    if (( remaining < need )); then
        echo "$name: skipped, ${remaining}s left of ${TOTAL}s (needs ${need}s)" | tee -a "$STATUS"
        return
    fi
    (( limit > remaining )) && limit=$remaining
    echo "== $name (limit ${limit}s, ${remaining}s left)"
    local t0=$SECONDS rc
    timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    local note=""
    [[ $rc == 124 || $rc == 137 ]] && note=" (timed out)"
    echo "$name: rc=$rc in $(( SECONDS - t0 ))s$note" | tee -a "$STATUS"
    tail -n 3 "$OUT/$name.log"
}

COMMON=(--random-weights --scale "$SCALE" --new-tokens "$TOKENS" --repeats 3 --warmup 1)

part env 10 30 "$PY" -m af3trt.benchmark.env --out "$OUT/env.json"
(command -v nvidia-smi > /dev/null && nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1) || true
part floor 20 60 "$PY" benchmarks/latency.py --floor-only --out "$OUT/floor.json"
# The latency part starts no row in its last 60 s (--budget-s) so that it normally exits cleanly;
# if it is killed anyway, its JSON holds every finished row and the report is rebuilt from it.
# hf and torch run configuration by configuration first; torch-fast and torch-fp8 follow.
LAT_LIMIT=$(( $(left) < 300 ? $(left) : 300 ))
LAT_BUDGET=$(( LAT_LIMIT > 120 ? LAT_LIMIT - 60 : LAT_LIMIT / 2 ))
part latency 60 "$LAT_LIMIT" "$PY" benchmarks/latency.py "${COMMON[@]}" --backends hf,torch,torch-fast,torch-fp8 \
    --audio-seconds "$SECONDS_LIST" --batch "$BATCHES" --budget-s "$LAT_BUDGET" --out "$OUT/latency.json"
if [[ -f $OUT/latency.json && ! -f $OUT/latency_latency.png ]]; then
    part latency_report 10 30 "$PY" benchmarks/latency.py --report-from "$OUT/latency.json" --out "$OUT/latency.json"
fi
if [[ -f benchmarks/kernels_bench.py ]]; then
    part kernels 30 60 "$PY" benchmarks/kernels_bench.py --out "$OUT"
else
    echo "kernels: skipped, benchmarks/kernels_bench.py not present" | tee -a "$STATUS"
fi
# transformers' compiled decode: the first call compiles (~37 s on an H200), so 30 s x 1 only,
# and only when enough time is left for the model build + compile + the timed calls
part compiled 90 120 "$PY" benchmarks/latency.py "${COMMON[@]}" --backends hf,hf-compiled \
    --audio-seconds "${SECONDS_LIST%%,*}" --batch "${BATCHES%%,*}" --out "$OUT/compiled.json"

# the GPU tests (kernels, CUDA-graph decode, GPU log-mel in the pipeline) when pytest is there
if "$PY" -c "import pytest" 2> /dev/null; then
    part gpu_tests 45 120 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels.py tests/test_fast_decoder.py
else
    echo "gpu_tests: skipped, pytest is not installed" | tee -a "$STATUS"
fi

echo "gpu_check: done in $(( SECONDS - START ))s of ${TOTAL}s" | tee -a "$STATUS"
for md in "$OUT/latency.md" "$OUT/compiled.md"; do
    [[ -f $md ]] && cat "$md"
done
exit 0
