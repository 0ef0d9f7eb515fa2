#!/usr/bin/env bash
# One call on a GPU machine (nvcc, torch, triton, pytest, pytest-benchmark installed; no network):
# build llmkern with CUDA for the GPU present, run the GPU tests, run the GPU benchmarks, and write
# everything under OUTDIR. Prints a short summary table last. Each stage has its own time limit (8.2
# minutes in all, plus the build; a stage stopped at its limit keeps what it reached) and the run leaves at
# most 11 files in OUTDIR:
#   gpu_check.log   everything printed (machine, build times, ptxas spills, test and bench summaries)
#   ptxas.txt       ptxas' resource report of every CUDA kernel (registers, spills, shared memory)
#   tests_cuda.xml  junit of stage 1: the CUDA kernels' own tests (tests/ops/*_cuda.py), build, registry
#   tests_sm90_<op>.xml  junit of stage 1b (H100/H200 only), one per opt-in sm_90a kernel (3 files)
#   tests_gpu.xml   junit of stage 2: the generic op/module tests for the GPU backends (cuda, triton) and the
#                   Llama runtime on the GPU (tests/models/test_cuda_generate.py)
#   bench.json      the GPU benchmarks without raw per-round timings (report.py --compact)
#   bench_report.md, bench_report.png   the report table (with the GPU issue targets: benchmarks/targets.py) and plot
# Usage: bash scripts/gpu_check.sh OUTDIR [extra pytest -k filter]
set -uo pipefail
OUT=${1:?usage: gpu_check.sh OUTDIR}
FILTER=${2:-}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
LOG="$OUT/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1
step() { echo "=== $(date -u +%H:%M:%S) $*"; }
# Stage limits send SIGINT first: pytest then still finishes its session, so the junit XML and the
# benchmark JSON keep every result reached before the limit (a plain SIGTERM / SIGKILL would lose them).
limit() { local s=$1; shift; timeout -s INT -k 15 "$s" "$@"; }
export PYTHONUNBUFFERED=1

step "machine"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv || true
python -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
python -c "import triton; print('triton', triton.__version__)" || true

step "build (only the GPU's architecture; .cu files compile in parallel)"
CAP=$(python -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}' + ('a' if m == 9 else ''))")
export LLMKERN_CUDA_ARCHS="$CAP"
start=$(date +%s)
if ! python setup.py build_ext --inplace > "$OUT/build.tmp" 2>&1; then
  tail -60 "$OUT/build.tmp"; echo "BUILD FAILED"; exit 1
fi
grep "compiled in" "$OUT/build.tmp"; rm -f "$OUT/build.tmp"
echo "build took $(( $(date +%s) - start )) s for sm_$CAP"
cp llmkern/_C_cuda.ptxas.txt "$OUT/ptxas.txt" 2>/dev/null || true
grep -E "bytes spill" "$OUT/ptxas.txt" | grep -v " 0 bytes spill stores, 0 bytes spill loads" | head -5
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -m llmkern info

step "tests 1/2: the CUDA kernels' own tests (full shapes, CUDA graphs), build, registry"
limit 150 python -m pytest -q -p no:cacheprovider tests/ops/*_cuda.py tests/test_build.py tests/test_registry.py \
  -k "${FILTER:+($FILTER) and }not test_sm90_ and not (int4_linear_cuda and wgmma)" --junitxml="$OUT/tests_cuda.xml" 2>&1 | tail -25

# The opt-in sm_90a kernels (attention and W8A8 on TMA + wgmma, the W4A16 wgmma GEMM; never run before a GPU
# session) in a stage of their own, one kernel at a time, so that a hang (an mbarrier phase that never
# completes) costs only that kernel's limit. A kernel's benchmark entries run only if its tests pass.
BENCH_EXCL="not sm90"
if [ "$CAP" = "90a" ]; then
  BENCH_EXCL=""
  for op in attention:50 int8_linear:25 int4_linear:25; do
    name=${op%%:*}; secs=${op##*:}
    step "tests 1b: the sm_90a $name kernel (limit $secs s)"
    if ! limit "$secs" python -m pytest -q --maxfail=20 -p no:cacheprovider "tests/ops/test_${name}_cuda.py" \
        -k "${FILTER:+($FILTER) and }(test_sm90_ or wgmma)" --junitxml="$OUT/tests_sm90_${name}.xml" 2>&1 | tail -8; then
      echo "sm_90a $name: not benchmarked (its tests failed or ran out of time)"
      BENCH_EXCL="${BENCH_EXCL:+$BENCH_EXCL and }not (bench_${name} and sm90)"
    fi
  done
fi

step "tests 2/2: generic op and module tests, GPU backends only"
limit 100 python -m pytest -q -p no:cacheprovider tests/ops tests/nn tests/models/test_cuda_generate.py --ignore-glob='*_cpu.py' \
  --ignore-glob='*_cuda.py' -k "${FILTER:+($FILTER) and }(cuda or triton)" --junitxml="$OUT/tests_gpu.xml" 2>&1 | tail -25

step "GPU benchmarks"
export LLMKERN_BENCH_DEVICE=cuda
BK="${FILTER:+($FILTER)}${FILTER:+${BENCH_EXCL:+ and }}${BENCH_EXCL}"
# ~300 entries on a GPU (the GPU issues' target shapes, bf16; benchmarks/_shapes.py): 0.25 s of timing each
# (GPU calls are micro- to milliseconds) keeps the stage near
# two minutes.
limit 140 python -m pytest -q -p no:cacheprovider benchmarks/ --benchmark-only ${BK:+-k "$BK"} \
  --benchmark-max-time=0.25 --benchmark-min-rounds=3 \
  --benchmark-json="$OUT/bench.raw.json" 2>&1 | tail -15

step "report"
python benchmarks/report.py "$OUT/bench.raw.json" --out "$OUT" --compact "$OUT/bench.json" > /dev/null 2>&1 || true
rm -f "$OUT/bench.raw.json"
[ -f "$OUT/bench.raw_report.md" ] && mv "$OUT/bench.raw_report.md" "$OUT/bench_report.md"
[ -f "$OUT/bench.raw_report.png" ] && mv "$OUT/bench.raw_report.png" "$OUT/bench_report.png"
step "summary"
sed -n '/## GPU issue targets/,/^### /p' "$OUT/bench_report.md" 2>/dev/null | head -45
sed -n '/## Summary/,/^## GPU issue targets/p' "$OUT/bench_report.md" 2>/dev/null | head -60
