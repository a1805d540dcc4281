#!/usr/bin/env bash
# Issue #32's step cost of 4-bit key codes, in each code dot form (kernels/triton_code_score.py GPU_TILES["dot"]),
# beside the default, on one warm machine, same run. Run inside scripts/device_jobs.sh (it installs and sets OUT):
#   bash scripts/device_jobs.sh $OUT/jobs "bash scripts/code_cost_job.sh sweep"   # kernel sweep + GPU suite
#   bash scripts/device_jobs.sh $OUT/jobs "bash scripts/code_cost_job.sh bench"   # shadowkv-fx bench rows
#   bash scripts/device_jobs.sh $OUT/jobs "bash scripts/code_cost_job.sh tiles"   # sweep, then bench rows at
#                                           32K x 4 and 122K x 1 with the sweep's fastest exact tiles
#   bash scripts/device_jobs.sh $OUT/jobs "bash scripts/code_cost_job.sh quick"   # sweep, bench rows at CONTEXT x
#                                           BATCH only, then tests/test_key_codes.py (SWEEP_FORMS=a,b narrows the sweep; NO_TESTS=1 skips the tests)
#   bash scripts/device_jobs.sh $OUT/jobs "bash scripts/code_cost_job.sh adopt"   # sweep, its fastest exact tiles made
#                                           the default (scripts/set_code_tiles.py), bench rows at CONTEXT x BATCH, then
#                                           the whole GPU suite on that default
# A bench row with a form other than the default runs the CLI with GPU_TILES["dot"] set first; TILES=FILE (a JSON
# the sweep writes: $OUT/best_tiles.json) sets GPU_TILES from it first; BREAKDOWN=1 adds bench --breakdown (each row's
# GPU time per kernel in one step, in its bench_*.json); TOPK_SEGMENTS=S splits each top-k row over S programs
# (kernels/triton_topk.py GPU_TILES["segments"]; "auto": its auto_segments) in every row; ROW_TAG=_x ends every
# row's name with _x; FORMS=" " leaves out the code rows, NO_SAFEGUARD=1 the safeguard row; BENCH_ARGS="..." adds
# bench flags to every row (e.g. "--random-fill-above 0" for a large batch without its prefills).
set -uo pipefail
STAGE=${1:?sweep, tiles, quick, adopt or bench}
CONTEXT=${CONTEXT:-32768} BATCH=${BATCH:-4}

bench() {  # name, dot form ('' for the default), flags...
    local name=$1 form=$2; shift 2
    echo "=== bench ${CONTEXT}x$BATCH $name ($*) $(date +%T)"
    python3 -c "
import json, sys
from shadowkv_fx.kernels import triton_code_score, triton_topk
if '${TOPK_SEGMENTS:-}':
    triton_topk.GPU_TILES['segments'] = '${TOPK_SEGMENTS:-1}' if '${TOPK_SEGMENTS:-1}' == 'auto' else int('${TOPK_SEGMENTS:-1}')
if '${TILES:-}':
    triton_code_score.GPU_TILES.update(json.load(open('${TILES:-}')))
if '$form':
    triton_code_score.GPU_TILES['dot'] = '$form'
from shadowkv_fx.cli import main
sys.argv = ['shadowkv-fx'] + sys.argv[1:]
main()" bench --contexts "$CONTEXT" --batches "$BATCH" --methods shadowkv --steps 32 ${BREAKDOWN:+--breakdown} ${BENCH_ARGS:-} "$@" --out "/tmp/b_$name" \
        > "/tmp/b_$name.log" 2>&1
    cat "/tmp/b_$name/table.txt" 2>/dev/null || tail -20 "/tmp/b_$name.log"
    cp "/tmp/b_$name/bench.json" "$OUT/bench_$name.json" 2>/dev/null
}

sweep() {  # the kernel sweep; its fastest exact tiles go to $OUT/best_tiles.json, their form to FORMS for the bench rows
    python3 benchmarks/score_kernel_sweep.py "$OUT/best_tiles.json" > "$OUT/sweep.txt" 2>&1
    cat "$OUT/sweep.txt"
    FORMS=$(python3 -c "import json; print(json.load(open('$OUT/best_tiles.json'))['dot'])") || exit 1
    export FORMS SAFEGUARD_FORM=$FORMS
}

case $STAGE in
    sweep)
        sweep
        echo "=== GPU suite $(date +%T)"
        bash scripts/gpu_suite.sh ;;
    tiles|quick)  # every bench row with the sweep's fastest tiles; quick: one shape (CONTEXT x BATCH), then the tests
        sweep
        export TILES=$OUT/best_tiles.json
        bash "$0" bench
        if [ "$STAGE" = quick ] && [ -z "${NO_TESTS:-}" ]; then
            python3 -m pytest -q -o addopts='' -p no:cacheprovider -rs -n 8 tests/test_key_codes.py > "$OUT/key_code_tests.txt" 2>&1
            tail -3 "$OUT/key_code_tests.txt"
        elif [ "$STAGE" = tiles ]; then
            CONTEXT=122880 BATCH=1 bash "$0" bench
        fi ;;
    adopt)
        sweep
        python3 scripts/set_code_tiles.py "$OUT/best_tiles.json" || exit 1
        bash "$0" bench
        echo "=== GPU suite $(date +%T)"
        bash scripts/gpu_suite.sh ;;
    bench)  # REPEATS=N: the default and code rows N times, alternating (the default moved 5% between two calls)
        for rep in $(seq "${REPEATS:-1}"); do
            tag=$([ "${REPEATS:-1}" -gt 1 ] && echo "_r$rep")${ROW_TAG:-}
            bench "default_${CONTEXT}$tag" ""
            for form in ${FORMS:-int8x2 fp16_bits fp16}; do
                bench "codes4_${form}_${CONTEXT}$tag" "$form" --key-code-bits 4
            done
        done
        # the config that meets #32's accuracy target at 2K-8K on the CPU: codes, chunks of 4 + local 128, the
        # per-layer split measured on SmolLM2 at 4K carried to the 8B shape's 32 layers (same total)
        [ -n "${NO_SAFEGUARD:-}" ] && exit 0
        bench "safeguard_${SAFEGUARD_FORM:-int8x2}_${CONTEXT}${ROW_TAG:-}" "${SAFEGUARD_FORM:-int8x2}" --key-code-bits 4 \
            --chunk-size 4 --local-tokens 128 \
            --layer-budgets benchmarks/results/cpu_key_codes_layer_budgets/layer_budgets_coverage_4k.json ;;
    *) echo "unknown stage $STAGE (sweep, tiles, quick, adopt or bench)"; exit 2 ;;
esac
