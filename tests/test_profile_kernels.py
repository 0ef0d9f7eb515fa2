"""scripts/gpu_profile.sh's pieces without a GPU: the case driver benchmarks/profile_kernels.py runs every case's
plumbing on the CPU (small shapes, cpu backend, no profiler calls), and scripts/ncu_summary.py turns Nsight
Compute's CSV pages (synthetic here, in ncu's layout) into one row per kernel."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import ncu_summary  # noqa: E402
import profile_kernels  # noqa: E402


def test_every_case_runs_and_checks_on_the_cpu(capsys):
    assert profile_kernels.main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    names = profile_kernels.Cases("cpu").names()
    assert len(out) == len(names) >= 15
    assert all("profiled (checked;" in line for line in out), out
    for family in ("decode.", "int4.", "int8.", "attn.", "ref."):
        assert any(n.startswith(family) for n in names)
    assert profile_kernels.main(["--list", "--cases", "^int4"]) == 0
    listed = capsys.readouterr().out.split()
    assert listed and all(n.startswith("int4.") for n in listed)
    assert profile_kernels.main(["--list", "--cases", "m1024", "--family", "int8"]) == 0
    assert capsys.readouterr().out.split() == ["int8.w8a8_m1024", "int8.w8a8_m1024_sm90"]


def test_a_wrong_or_failing_case_is_reported_and_the_rest_run(monkeypatch, capsys):
    cases = profile_kernels.Cases
    monkeypatch.setattr(cases, "case_ref__flinear_m1", lambda self: (lambda: 1 / 0, lambda out: True))
    monkeypatch.setattr(cases, "case_ref__flinear_m1024", lambda self: (lambda: None, lambda out: False))
    assert profile_kernels.main(["--device", "cpu", "--cases", "^ref"]) == 1
    out = capsys.readouterr().out
    assert "flinear_m1: FAILED ZeroDivisionError" in out and "WRONG RESULT" in out
    assert "sdpa_decode: profiled (checked" in out


DETAILS = '''"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
"0","1","python3","h","void llmkern::cuda::wdq::wdq_mma_kernel<__nv_bfloat16, 64, 128, 1, 4, 2>(llmkern::cuda::wdq::Args<__nv_bfloat16>)","1","7","(128, 1, 1)","(32, 9, 1)","0","9.0","GPU Speed Of Light Throughput","Duration","us","1,234.50"
"0","1","python3","h","void llmkern::cuda::wdq::wdq_mma_kernel<__nv_bfloat16, 64, 128, 1, 4, 2>(llmkern::cuda::wdq::Args<__nv_bfloat16>)","1","7","(128, 1, 1)","(32, 9, 1)","0","9.0","GPU Speed Of Light Throughput","DRAM Throughput","%","12.3"
"0","1","python3","h","void llmkern::cuda::wdq::wdq_mma_kernel<__nv_bfloat16, 64, 128, 1, 4, 2>(llmkern::cuda::wdq::Args<__nv_bfloat16>)","1","7","(128, 1, 1)","(32, 9, 1)","0","9.0","Occupancy","Achieved Occupancy","%","6.2"
"0","1","python3","h","void llmkern::cuda::wdq::wdq_mma_kernel<__nv_bfloat16, 64, 128, 1, 4, 2>(llmkern::cuda::wdq::Args<__nv_bfloat16>)","1","7","(128, 1, 1)","(32, 9, 1)","0","9.0","Occupancy","Theoretical Occupancy","%","6.25"
"1","1","python3","h","void llmkern::cuda::int4_linear::reduce_kernel(const float *, int)","1","7","(256, 1, 1)","(1024, 1, 1)","0","9.0","GPU Speed Of Light Throughput","Duration","us","4.10"
'''
RAW = '''"ID","Kernel Name","smsp__average_warp_latency_issue_stalled_long_scoreboard.ratio","smsp__average_warp_latency_issue_stalled_barrier.ratio","smsp__average_warp_latency_issue_stalled_selected.ratio","smsp__average_warp_latency_issue_stalled_wait.ratio","smsp__average_warp_latency_issue_stalled_math_pipe_throttle.ratio"
"","","ratio","ratio","ratio","ratio","ratio"
"0","k","12.5","3.25","1","0.5","2"
"1","r","0.1","0","1","2.5","0"
'''


def test_ncu_summary_rows(tmp_path):
    d, r = tmp_path / "details.csv", tmp_path / "raw.csv"
    d.write_text(DETAILS)
    r.write_text(RAW)
    lines = ncu_summary.summary(str(d), str(r)).splitlines()
    assert len(lines) == 4  # header, rule, two kernels in profile order
    first, second = lines[2], lines[3]
    assert "| 0 | wdq_mma_kernel<...> | (32, 9, 1) x (128, 1, 1) | 1,234.50 us | 12.3 | " in first
    assert "| 6.2 / 6.25 |" in first
    assert first.endswith("| long_scoreboard 12.50, barrier 3.25, math_pipe_throttle 2.00 |")  # "selected": not a stall
    assert "| 1 | reduce_kernel | " in second and "4.10 us" in second and "wait 2.50" in second
    # without the raw page: the same rows, no stalls
    assert ncu_summary.summary(str(d)).splitlines()[2].endswith("|  |")
    # the command line, as gpu_profile.sh calls it
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "ncu_summary.py"), str(d), str(r)],
                         capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[2] == first


def test_gpu_profile_script_parses():
    subprocess.run(["bash", "-n", os.path.join(ROOT, "scripts", "gpu_profile.sh")], check=True)


SASS = """
        code for sm_90a
                Function : _Z3fooPf
        .headerflags    @"EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   MOV R1, c[0x0][0x28] ;                      /* 0x00000a0000017a02 */
        /*0010*/                   FFMA R2, R3, R4, R2 ;                       /* 0x0000000403027223 */
        /*0020*/               @P0 FFMA R2, R3, R4, R2 ;                       /* 0x0000000403027223 */
        /*0030*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;      /* 0x000000100c08723c */
        /*0040*/              @!P1 BRA 0x10 ;                                  /* 0x0000000000008947 */
        /*0050*/                   BRA 0x60 ;                                  /* 0x0000000000007947 */
        /*0060*/                   EXIT ;                                      /* 0x000000000000794d */
                Function : _Z3barv
        /*0000*/                   EXIT ;                                      /* 0x000000000000794d */
"""


def test_sass_loops_finds_the_largest_loop(tmp_path, capsys):
    import sass_loops

    (tmp_path / "k.sass").write_text(SASS)
    found = {k["name"]: k for k in sass_loops.loops(SASS)}
    foo = found["_Z3fooPf"]
    assert foo["total"] == 7 and foo["loop"] == 4  # 0x10 .. 0x40 (the forward branch is no loop)
    assert foo["ops"] == {"FFMA": 2, "HMMA": 1, "BRA": 1}
    assert found["_Z3barv"]["loop"] == 0
    assert sass_loops.main([str(tmp_path / "k.sass"), "--kernel", "foo"]) == 0
    out = capsys.readouterr().out
    assert "_Z3fooPf" in out and "largest loop 4: FFMA 2, HMMA 1, BRA 1" in out and "_Z3barv" not in out


FAKE_NCU = """#!/usr/bin/env bash
# A stand-in for ncu: --version; --import REPORT --csv --page details|raw prints a page; a profiling call runs the
# program after its options and writes an empty report at --export PATH.
if [ "$1" = --version ]; then echo "fake ncu 0.0"; exit 0; fi
if [ "$1" = --import ]; then
  case "$*" in *details*) cat "$FAKE_DETAILS";; *) cat "$FAKE_RAW";; esac; exit 0
fi
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --export) out=$2; shift 2;;
    --section|--clock-control|--target-processes|--profile-from-start) shift 2;;
    --force-overwrite) shift;;
    *) break;;
  esac
done
"$@"; rc=$?
: > "$out.ncu-rep"
exit $rc
"""


def test_gpu_profile_script_plumbing(tmp_path):
    """scripts/gpu_profile.sh with a stand-in ncu and the driver on the CPU: one run per family of the selected
    cases, each family's CSV pages and its section of ncu_summary.md, the log."""
    ncu = tmp_path / "ncu"
    ncu.write_text(FAKE_NCU)
    ncu.chmod(0o755)
    (tmp_path / "d.csv").write_text(DETAILS)
    (tmp_path / "r.csv").write_text(RAW)
    out = tmp_path / "prof"
    env = dict(os.environ, NCU=str(ncu), GPU_PROFILE_DEVICE="cpu", GPU_CHECK_PYTHON=sys.executable,
               FAKE_DETAILS=str(tmp_path / "d.csv"), FAKE_RAW=str(tmp_path / "r.csv"), OMP_NUM_THREADS="2")
    p = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_profile.sh"), str(out), "^decode\\.contiguous$|^ref\\."],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    files = sorted(os.listdir(out))
    assert files == ["gpu_profile.log", "ncu_details_decode.csv", "ncu_details_ref.csv", "ncu_raw_decode.csv",
                     "ncu_raw_ref.csv", "ncu_summary.md", "profile_decode.ncu-rep", "profile_ref.ncu-rep"], files
    summary = (out / "ncu_summary.md").read_text()
    assert summary.count("| 0 | wdq_mma_kernel<...> |") == 2 and "### decode" in summary and "### ref" in summary
    log = (out / "gpu_profile.log").read_text()
    assert "decode.contiguous: profiled (checked" in log and "ref.sdpa_decode: profiled (checked" in log
    assert "decode.paged64" not in log  # (not selected)
