#!/usr/bin/env bash
# One call on a GPU machine (nvcc, torch, triton, pytest, pytest-benchmark installed; no network):
# build llmkern with CUDA for the GPU present, run the op and module tests on the GPU, run the GPU
# benchmarks, and write everything under OUTDIR (log, pytest-benchmark JSON, report table and plot).
# Prints a short summary table last. Usage: bash scripts/gpu_check.sh OUTDIR [extra pytest -k filter]
set -uo pipefail
OUT=${1:?usage: gpu_check.sh OUTDIR}
FILTER=${2:-}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
LOG="$OUT/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1
step() { echo "=== $(date -u +%H:%M:%S) $*"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv || true
python -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
python -c "import triton; print('triton', triton.__version__)" || true

step "build (only the GPU's architecture, to keep the build short)"
CAP=$(python -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}' + ('a' if m == 9 else ''))")
export LLMKERN_CUDA_ARCHS="$CAP"
start=$(date +%s)
python setup.py build_ext --inplace -j 4 > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1; }
echo "build took $(( $(date +%s) - start )) s for sm_$CAP"
cp llmkern/_C_cuda.ptxas.txt "$OUT/" 2>/dev/null || true
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -m llmkern info | tee "$OUT/info.txt"

step "tests on the GPU (ops and modules; model/GGUF tests need packages absent here)"
timeout 240 python -m pytest -q -p no:cacheprovider tests/ops tests/nn tests/test_registry.py \
  ${FILTER:+-k "$FILTER"} --junitxml="$OUT/tests.xml" 2>&1 | tail -30

step "GPU benchmarks"
export LLMKERN_BENCH_DEVICE=cuda
timeout 200 python -m pytest -q -p no:cacheprovider benchmarks/ --benchmark-only ${FILTER:+-k "$FILTER"} \
  --benchmark-json="$OUT/bench.json" 2>&1 | tail -15

step "report"
python benchmarks/report.py "$OUT/bench.json" --out "$OUT" > "$OUT/report.md" 2>&1 || true
tail -40 "$OUT/report.md"
