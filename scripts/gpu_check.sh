#!/usr/bin/env bash
# One call on a GPU machine (nvcc, torch, triton, pytest, pytest-benchmark installed; no network):
# build llmkern with CUDA for the GPU present, run the GPU tests, run the GPU benchmarks, and write
# everything under OUTDIR. Prints a short summary table last. Each stage has its own time limit (8.2
# minutes in all; less when the build was slow: GPU_CHECK_BUDGET below; a stage stopped at its limit keeps
# what it reached). Every stage runs through scripts/gpu_guard.py: a kernel that breaks the CUDA context
# (an illegal address, a device-side assert) or runs past 60 s costs that one test or benchmark, not the
# rest of the stage (the rest runs again in a new process). The run leaves 7 files in OUTDIR (the GPU tool brings back at most 8):
#   gpu_check.log   everything printed (machine, build times, ptxas spills, test and bench summaries)
#   ptxas.txt       ptxas' resource report of every CUDA kernel (registers, spills, shared memory)
#   tests.jsonl     one line per test of every stage: stage, nodeid, outcome, seconds, the error's first line
#                   (stages: cuda = the CUDA kernels' own tests, tests/ops/*_cuda.py, build, registry;
#                   sm90_<op> = each opt-in sm_90a kernel (H100/H200 only); gpu = the generic op/module tests
#                   for the cuda and triton backends, the Llama runtime and a patched transformers model on the GPU;
#                   bench = the benchmarks)
#   bench.json      the GPU benchmarks without raw per-round timings (report.py --compact)
#   bench_report.md, bench_report.png   the report table (with the GPU issue targets: benchmarks/targets.py) and plot
#   profile.tgz     Nsight Compute profiles of the key kernels (scripts/gpu_profile.sh: its log, report, CSV pages
#                   and ncu_summary.md) when ncu is there and >= GPU_CHECK_PROFILE_MIN (45) s are left; GPU_CHECK_PROFILE=0: none
# Usage: bash scripts/gpu_check.sh OUTDIR [extra pytest -k filter]. Exit status 1 if the build failed or a stage
# had a failed, timed-out or crashed test, else 0.
# GPU_CHECK_DRY=1 (no GPU needed; tests/test_gpu_check.py): no build, benchmarks on the CPU, the sm_90a stages
# as on an H200: checks the script's own plumbing.
set -uo pipefail
OUT=${1:?usage: gpu_check.sh OUTDIR}
FILTER=${2:-}
DRY=${GPU_CHECK_DRY:-0}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
LOG="$OUT/gpu_check.log"
rm -f "$OUT/tests.jsonl"
exec > >(tee -a "$LOG") 2>&1
step() { echo "=== $(date -u +%H:%M:%S) $*"; }
# The GPU machine's python3 is the one with torch (a plain `python` may not exist there).
PY=${GPU_CHECK_PYTHON:-$(command -v python3 || command -v python)}
export PYTHONUNBUFFERED=1
# The whole run ends within GPU_CHECK_BUDGET seconds of its start (default 570: a 10-minute device call with
# room for the report), whatever the build takes: when less is left than the stages' limits add up to, each
# remaining stage gets its share of what is left (`lim`).
BUDGET=${GPU_CHECK_BUDGET:-570}
T0=$(date +%s)
# lim NOMINAL REST: NOMINAL seconds, or less when the time left (minus 20 s for the report) is under REST, the
# nominal limits of this stage and every later one; at least 10.
lim() {
  local left=$(( T0 + BUDGET - $(date +%s) - 20 ))
  local s=$(( left < $2 ? $1 * left / $2 : $1 ))
  echo $(( s < 10 ? 10 : s ))
}
FAILED=0  # the exit status: 1 when a stage had a failed test (the files say which)
# The two big test stages run in XDIST pytest-xdist processes where it is installed (the GPU image has it):
# Triton compiles each kernel variant on the CPU at its first launch, one at a time per process; 16 cores
# compile 8 at once. (Benchmarks and the sm_90a stages run in one process.)
XDIST=${GPU_CHECK_XDIST:-$(( $(nproc) >= 16 ? 8 : 0 ))}
# stage NAME SECONDS [--xdist N] [--bench-json PATH] -- PYTEST_ARGS: one guarded stage (scripts/gpu_guard.py).
# (--continue-on-collection-errors: a test file that fails to import on the GPU machine's torch / Python costs
# that file, not the stage)
stage() {
  local name=$1 secs=$2; shift 2
  "$PY" scripts/gpu_guard.py run --name "$name" --limit "$secs" --dir "$OUT" "$@" --continue-on-collection-errors \
    || { FAILED=1; return 1; }
}

step "machine"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv || true
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
"$PY" -c "import triton; print('triton', triton.__version__)" || true

if [ "$DRY" = 1 ]; then
  CAP=${GPU_CHECK_CAP:-90a}
  step "build skipped (GPU_CHECK_DRY=1; sm_$CAP assumed)"
else
  step "build (only the GPU's architecture; .cu files compile in parallel)"
  CAP=$("$PY" -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}' + ('a' if m == 9 else ''))")
  export LLMKERN_CUDA_ARCHS="$CAP"
  start=$(date +%s)
  if ! "$PY" setup.py build_ext --inplace > "$OUT/build.tmp" 2>&1; then
    tail -60 "$OUT/build.tmp"; echo "BUILD FAILED"; exit 1
  fi
  grep "compiled in" "$OUT/build.tmp"; rm -f "$OUT/build.tmp"
  echo "build took $(( $(date +%s) - start )) s for sm_$CAP"
  cp llmkern/_C_cuda.ptxas.txt "$OUT/ptxas.txt" 2>/dev/null || true
  grep -E "bytes spill" "$OUT/ptxas.txt" | grep -v " 0 bytes spill stores, 0 bytes spill loads" | head -5
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Python packages the GPU machine lacks (it has no network: the gguf reader the tiny-GGUF tests write with), as
# wheels in GPU_CHECK_WHEELS (default .whl, ignored by git; the GPU tool carries it), installed for this run only.
WHEELS=${GPU_CHECK_WHEELS:-.whl}
SITE=$(mktemp -d)  # (not under OUTDIR: the GPU tool brings back at most 8 files from it)
if ls "$WHEELS"/*.whl > /dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl \
    && export PYTHONPATH="$PYTHONPATH:$SITE" && echo "wheels installed: $(ls "$WHEELS" | tr '\n' ' ')"
fi
"$PY" -m llmkern info

step "tests 1/2: the CUDA kernels' own tests (full shapes, CUDA graphs), build, registry"
stage cuda "$(lim 150 550)" --xdist "$XDIST" -- -q -p no:cacheprovider tests/ops/*_cuda.py tests/test_build.py tests/test_registry.py \
  -k "${FILTER:+($FILTER) and }not test_sm90_ and not (int4_linear_cuda and wgmma)"

# The opt-in sm_90a kernels (attention and W8A8 on TMA + wgmma, the W4A16 wgmma GEMM; never run before a GPU
# session) in a stage of their own, one kernel at a time, so that a hang (an mbarrier phase that never
# completes) costs only that kernel's limit. A kernel's benchmark entries run only if its tests pass.
BENCH_EXCL="not sm90"
if [ "$CAP" = "90a" ]; then
  BENCH_EXCL=""
  rest=400  # this stage's and the later stages' nominal limits
  for op in attention:50 int8_linear:25 int4_linear:25; do
    name=${op%%:*}; secs=$(lim "${op##*:}" "$rest"); rest=$(( rest - ${op##*:} ))
    step "tests 1b: the sm_90a $name kernel (limit $secs s)"
    if ! GPU_GUARD_TIMEOUT=20 stage "sm90_$name" "$secs" -- -q --maxfail=20 -p no:cacheprovider \
        "tests/ops/test_${name}_cuda.py" -k "${FILTER:+($FILTER) and }(test_sm90_ or wgmma)"; then
      echo "sm_90a $name: not benchmarked (its tests failed or ran out of time)"
      BENCH_EXCL="${BENCH_EXCL:+$BENCH_EXCL and }not (bench_${name} and sm90)"
    fi
  done
fi

step "tests 2/2: generic op and module tests, GPU backends only"
# (the runtime's GPU tests first: the first run's open questions are there; a stage stopped at its limit keeps
# what it reached, and xdist hands tests out in this order)
stage gpu "$(lim 100 300)" --xdist "$XDIST" -- -q -p no:cacheprovider tests/models/test_cuda_generate.py tests/models/test_hf.py \
  tests/ops tests/nn tests/triton --ignore=tests/triton/test_triton_compile.py --ignore=tests/triton/test_interpreter.py \
  --ignore-glob='*_cpu.py' \
  --ignore-glob='*_cuda.py' -k "${FILTER:+($FILTER) and }(cuda or triton)"

step "GPU benchmarks"
if [ "$DRY" = 1 ]; then export LLMKERN_BENCH_DEVICE=cpu; else export LLMKERN_BENCH_DEVICE=cuda; fi
BK="${FILTER:+($FILTER)}${FILTER:+${BENCH_EXCL:+ and }}${BENCH_EXCL}"
# ~400 entries on a GPU (the GPU issues' target shapes, bf16, Triton and the opt-in CUDA routes; benchmarks/_shapes.py):
# 0.15 s of timing each (rounds of >= 1 ms of CUDA-graph replays, benchmarks/conftest.py; the first run, at 0.25 s
# and one synchronize per call, reached 183 entries in its 140 s).
stage bench "$(lim 140 200)" --bench-json "$OUT/bench.raw.json" -- -q -p no:cacheprovider benchmarks/ --benchmark-only \
  ${BK:+-k "$BK"} --benchmark-max-time=0.15 --benchmark-min-rounds=3 --benchmark-columns=median,iqr,rounds

step "profiles (Nsight Compute on one call of each key kernel: scripts/gpu_profile.sh)"
# What the timings cannot say (issue-bound, latency-bound, stalled on barriers): the first run's numbers needed it.
PLEFT=$(( T0 + BUDGET - $(date +%s) - 20 ))
PCASES=${GPU_CHECK_PROFILE_CASES:-'^decode\.|^int4\.module_m(1|64|1024)$|^int4\.op_m1024$|^int8\.w8a8_m1024$|^ref\.'}
if [ "${GPU_CHECK_PROFILE:-1}" = 0 ]; then
  echo "skipped (GPU_CHECK_PROFILE=0)"
elif [ "$PLEFT" -lt "${GPU_CHECK_PROFILE_MIN:-45}" ]; then
  echo "skipped: $PLEFT s left"
else
  PTMP=$(mktemp -d)  # (not under OUTDIR: one tarball comes back)
  if [ "$DRY" = 1 ]; then  # the case driver's plumbing on the CPU; no ncu
    mkdir -p "$PTMP/profile" && "$PY" benchmarks/profile_kernels.py --device cpu --cases "$PCASES" \
      > "$PTMP/profile/gpu_profile.log" 2>&1
    cat "$PTMP/profile/gpu_profile.log"
  else
    GPU_PROFILE_LIMIT=$PLEFT bash scripts/gpu_profile.sh "$PTMP/profile" "$PCASES"
  fi
  tar czf "$OUT/profile.tgz" -C "$PTMP" profile && rm -rf "$PTMP"
fi

step "report"
"$PY" benchmarks/report.py "$OUT/bench.raw.json" --out "$OUT" --compact "$OUT/bench.json" > /dev/null 2>&1 || true
rm -rf "$OUT/bench.raw.json" "$OUT"/.guard_* "$SITE"
[ -f "$OUT/bench.raw_report.md" ] && mv "$OUT/bench.raw_report.md" "$OUT/bench_report.md"
[ -f "$OUT/bench.raw_report.png" ] && mv "$OUT/bench.raw_report.png" "$OUT/bench_report.png"
step "summary"
"$PY" scripts/gpu_guard.py summary "$OUT/tests.jsonl"
awk '/^## GPU issue targets/{on=1} /^## Opt-in routes|^### /{if(on&&!/^## GPU/)exit} on' "$OUT/bench_report.md" 2>/dev/null | head -45 || true
sed -n '/^## Opt-in routes/,/^### /p' "$OUT/bench_report.md" 2>/dev/null | head -14 || true
sed -n '/## Summary/,/^## GPU issue targets/p' "$OUT/bench_report.md" 2>/dev/null | head -60 || true
echo "files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $FAILED
