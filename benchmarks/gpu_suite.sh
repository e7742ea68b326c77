#!/usr/bin/env bash
# The GPU checks and benchmarks of issues #5 and #8 in one command, for a session that has a CUDA GPU for a short while:
#
#   bash benchmarks/gpu_suite.sh OUTDIR [STEP ...]      (from the repo root; msfp importable, e.g. pip install -e .)
#
# STEPs (default: all, in this order): tests (the CUDA/Triton tests), w4a4 (benchmarks/gpu_w4a4.py), tiles
# (benchmarks/conv_tiles.py, the FP8 convolution's block-size sweep), finetune
# (benchmarks/finetune_step.py at batch 16 and 128, 30 timed steps), fake_quant (benchmarks/fake_quant.py), sample
# (benchmarks/sample_speed.py: sampling eager and from CUDA graphs, default model and SD-1.5-like), quality
# (benchmarks/fp8_quality.py: the FP8 kernels' samples against fake-quant's on the default model). Each
# benchmark's JSON goes to OUTDIR/<step>.json, everything else (machine, versions, pytest output, stderr) to
# OUTDIR/log: nine files at most.
# A failing step does not stop the others; the exit status is 1 if any failed. PYTHON picks the interpreter;
# STEP_TIMEOUT (seconds, default none) stops a step that runs longer, so one slow step cannot use up a short lease;
# TEST_TIMEOUT (default 150) stops a single test (with pytest-timeout installed).
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_suite.sh OUTDIR [tests|w4a4|tiles|finetune|fake_quant|sample|quality ...]}
shift
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(tests w4a4 tiles finetune fake_quant sample quality)
python=${PYTHON:-python3}
mkdir -p "$out"
log=$out/log
export PYTHONUNBUFFERED=1

"$python" - <<'EOF' 2>&1 | tee -a "$log" || exit 2
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_suite.sh needs a CUDA GPU: torch.cuda.is_available() is False")
import msfp
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = "not installed"
from msfp.identity import code_digest
print(f"GPU {torch.cuda.get_device_name()} (capability {torch.cuda.get_device_capability()}), torch {torch.__version__},"
      f" CUDA {torch.version.cuda}, triton {triton_version}, msfp {msfp.__version__} (code {code_digest()}),"
      f" python {sys.version.split()[0]}")
EOF
# The commit, and what differs from it (untracked files too): a copied working tree can carry changes its .git does
# not know about, so the code digest above is what identifies the code.
{ git rev-parse HEAD; git status --short; } >> "$log" 2>&1

failed=()
# On a fresh machine the GPU tests spend most of their time compiling kernels (one per format, layout and shape
# specialization); with pytest-xdist installed, TEST_WORKERS processes (default 8) compile in parallel.
# Each worker gets its share of the cores for torch's CPU threads and Inductor's compile workers: by default every
# process takes them all, and 8 processes of spinning OpenMP threads on 16 cores made CPU-side tests run past their
# 150 s limit on the H200 machine.
parallel=() worker_env=()
if "$python" -c "import xdist" 2>/dev/null; then
    workers=${TEST_WORKERS:-8}
    share=$(( $(nproc) / workers > 0 ? $(nproc) / workers : 1 ))
    parallel=(-n "$workers")
    worker_env=(OMP_NUM_THREADS=$share TORCHINDUCTOR_COMPILE_THREADS=$share)
fi
per_test_limit=()
"$python" -c "import pytest_timeout" 2>/dev/null && per_test_limit=(--timeout "${TEST_TIMEOUT:-150}")
run_step() {  # run_step NAME JSON_FILE|- COMMAND...
    local name=$1 json=$2
    shift 2
    echo "== $name: $*" | tee -a "$log"
    local start=$SECONDS status
    local limit=(timeout "${STEP_TIMEOUT:-0}")  # timeout 0 never stops the command
    if [ "$json" = - ]; then
        "${limit[@]}" "$@" >> "$log" 2>&1
        status=$?
    else
        # Into NAME.json only when the step succeeds: a failed or timed-out step's output is kept as .partial.
        "${limit[@]}" "$@" > "$json.tmp" 2>> "$log"
        status=$?
        if [ $status -eq 0 ]; then mv "$json.tmp" "$json"; else mv "$json.tmp" "$json.partial"; fi
    fi
    echo "== $name: exit $status after $((SECONDS - start)) s" | tee -a "$log"
    [ $status -eq 0 ] || failed+=("$name")
}

for step in "${steps[@]}"; do
    case $step in
        # -o addopts= drops pyproject's -q, so -v names each test as it finishes (under xdist too); tracebacks
        # are written as failures happen (tests/conftest.py) and pytest-timeout, where installed, stops a hung test.
        tests) MSFP_TRACEBACKS_AT_ONCE=1 run_step tests - env "${worker_env[@]}" "$python" -m pytest -o addopts= -v -rfEs --tb=short \
                   --durations=15 -p no:cacheprovider "${parallel[@]}" "${per_test_limit[@]}" \
                   tests/test_kernels.py tests/test_triton_kernels.py tests/test_fp8.py tests/test_cuda_graphs.py ;;
        w4a4) run_step w4a4 "$out/w4a4.json" "$python" benchmarks/gpu_w4a4.py ;;
        tiles) run_step tiles "$out/tiles.json" "$python" benchmarks/conv_tiles.py ;;
        finetune)
            run_step finetune16 "$out/finetune16.json" "$python" benchmarks/finetune_step.py --device cuda --batch 16 --iters 30
            run_step finetune128 "$out/finetune128.json" "$python" benchmarks/finetune_step.py --device cuda --batch 128 --iters 30 ;;
        fake_quant) run_step fake_quant "$out/fake_quant.json" "$python" benchmarks/fake_quant.py ;;
        sample)
            run_step sample "$out/sample.json" "$python" benchmarks/sample_speed.py
            run_step sample_sd15 "$out/sample_sd15.json" "$python" benchmarks/sample_speed.py --model sd15 ;;
        # Its sample files and calibration cache stay outside OUTDIR, which comes back from a lent GPU machine. The
        # control run draws 16 images a call, not 1: 200 denoiser calls per method instead of 3,200 eager ones.
        quality) run_step quality "$out/quality.json" "$python" benchmarks/fp8_quality.py --out "$(mktemp -d)" \
            --control-batch 16 ;;
        *) echo "gpu_suite.sh: unknown step '$step' (tests, w4a4, tiles, finetune, fake_quant, sample, quality)" | tee -a "$log"; failed+=("$step") ;;
    esac
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "failed: ${failed[*]}" | tee -a "$log"
    exit 1
fi
