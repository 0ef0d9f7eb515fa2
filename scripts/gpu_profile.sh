#!/usr/bin/env bash
# Hardware profiles (Nsight Compute) of one call of each kernel in benchmarks/profile_kernels.py, for a second
# call on a GPU machine after scripts/gpu_check.sh: builds llmkern for the GPU present when its CUDA module is
# missing (a fresh machine), then runs the cases under `ncu --profile-from-start off` (only each case's profiled
# call is measured; --clock-control none: the clocks stay as the machine set them), one ncu run per family of
# cases (decode, int4, int8, attn, ref). Leaves in OUTDIR (more than the GPU tool's 8 files: tar it, as
# gpu_check.sh does):
#   gpu_profile.log          everything printed (the cases in order, each one's route and result check)
#   profile_<family>.ncu-rep the ncu reports (open with `ncu --import` or Nsight Compute; dropped if over 15 MiB)
#   ncu_details_<family>.csv `ncu --import ... --csv --page details`: every section's metrics per kernel
#   ncu_raw_<family>.csv     `--page raw`: every collected metric per kernel (warp stall breakdowns among them)
#   ncu_summary.md           per family, one row per kernel: time, DRAM and SM throughput, occupancy, registers,
#                            top stalls (scripts/ncu_summary.py)
# Usage: bash scripts/gpu_profile.sh OUTDIR [case regex]. GPU_PROFILE_LIMIT (default 240) bounds all ncu runs.
# (NCU names the ncu to run and GPU_PROFILE_DEVICE=cpu the driver's device: tests/test_profile_kernels.py runs the
# script's plumbing with a stand-in ncu on the CPU.)
set -uo pipefail
OUT=${1:?usage: gpu_profile.sh OUTDIR [case regex]}
CASES=${2:-.}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
exec > >(tee -a "$OUT/gpu_profile.log") 2>&1
step() { echo "=== $(date -u +%H:%M:%S) $*"; }
PY=${GPU_CHECK_PYTHON:-$(command -v python3 || command -v python)}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
NCU=${NCU:-$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)}
[ -n "$NCU" ] || { echo "no ncu on this machine"; exit 1; }
"$NCU" --version | tail -1

if ! "$PY" -c "import llmkern._C_cuda" 2>/dev/null; then
  step "build (llmkern._C_cuda missing; only the GPU's architecture)"
  CAP=$("$PY" -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}' + ('a' if m == 9 else ''))")
  LLMKERN_CUDA_ARCHS="$CAP" "$PY" setup.py build_ext --inplace > "$OUT/build.tmp" 2>&1 \
    || { tail -40 "$OUT/build.tmp"; echo "BUILD FAILED"; exit 1; }
  grep "compiled in" "$OUT/build.tmp"; rm -f "$OUT/build.tmp"
fi
"$PY" benchmarks/profile_kernels.py --list --cases "$CASES" | tr '\n' ' '; echo

# One ncu run (and report) per family of cases (decode, int4, ...): a run the time limit cuts loses only its own
# family (ncu writes its report at the end).
T0=$(date +%s)
LIMIT=${GPU_PROFILE_LIMIT:-240}
FAMILIES=$("$PY" benchmarks/profile_kernels.py --list --cases "$CASES" | cut -d. -f1 | uniq)
for fam in $FAMILIES; do
  left=$(( T0 + LIMIT - $(date +%s) - 5 ))
  [ "$left" -ge 15 ] || { echo "no time left for $fam"; continue; }
  step "ncu: $fam (limit $left s)"
  timeout "$left" "$NCU" --profile-from-start off --clock-control none --target-processes all \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section MemoryWorkloadAnalysis --export "$OUT/profile_$fam" --force-overwrite \
    "$PY" benchmarks/profile_kernels.py --cases "$CASES" --family "$fam" --device "${GPU_PROFILE_DEVICE:-cuda}"
  echo "ncu exit status $?"
  if [ -f "$OUT/profile_$fam.ncu-rep" ]; then
    "$NCU" --import "$OUT/profile_$fam.ncu-rep" --csv --page details > "$OUT/ncu_details_$fam.csv" 2>/dev/null
    "$NCU" --import "$OUT/profile_$fam.ncu-rep" --csv --page raw > "$OUT/ncu_raw_$fam.csv" 2>/dev/null
    { echo "### $fam"; echo; "$PY" scripts/ncu_summary.py "$OUT/ncu_details_$fam.csv" "$OUT/ncu_raw_$fam.csv"; echo; } \
      >> "$OUT/ncu_summary.md"
    [ "$(stat -c %s "$OUT/profile_$fam.ncu-rep")" -gt $(( 15 * 1024 * 1024 )) ] && rm -f "$OUT/profile_$fam.ncu-rep" \
      && echo "(profile_$fam.ncu-rep over 15 MiB: dropped; the CSVs hold its metrics)"
  fi
done
step "summary"
cat "$OUT/ncu_summary.md" 2>/dev/null
echo "files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
