"""scripts/gpu_check.sh and its stage driver scripts/gpu_guard.py, without a GPU.

The GPU script runs a few times a year on a borrowed GPU; these tests check its plumbing here: a test that
breaks the CUDA context, hangs or kills its process costs only itself (the rest runs again in a new
process), results and benchmark JSON survive those restarts, and the whole script leaves at most 8 files
(what the GPU tool brings back) with a readable summary."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import tarfile
import sys
from pathlib import Path

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUARD = os.path.join(ROOT, "scripts", "gpu_guard.py")

SYNTHETIC = '''
import os, time, pytest
def test_a(): pass
def test_b(): raise RuntimeError("CUDA error: an illegal memory access was encountered")
def test_c(): pass
def test_d(): time.sleep(60)
def test_e(): assert 0, "plain failure"
def test_f(): pytest.skip("no gpu")
def test_g(): os.abort()
def test_h(): pass
'''


def _guard(tmp_path, name, *pytest_args, bench_json=None, timeout="3", limit="120", guard_args=(), sigint_ignored=False):
    cmd = [sys.executable, GUARD, "run", "--name", name, "--limit", limit, "--dir", str(tmp_path / "out"), *guard_args]
    if bench_json:
        cmd += ["--bench-json", str(bench_json)]
    cmd += ["--", "-q", "-p", "no:cacheprovider", *pytest_args]
    (tmp_path / "out").mkdir(exist_ok=True)
    env = dict(os.environ, GPU_GUARD_TIMEOUT=timeout)
    env.pop("GPU_GUARD_DIR", None)
    # sigint_ignored: the guard started as a background command is (SIGINT ignored, inherited by what it starts)
    pre = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, preexec_fn=pre)


def _results(tmp_path):
    with open(tmp_path / "out" / "tests.jsonl") as f:
        return [json.loads(line) for line in f]


def test_guard_runs_the_rest_after_a_broken_context_a_hang_and_a_crash(tmp_path):
    (tmp_path / "test_syn.py").write_text(SYNTHETIC)
    p = _guard(tmp_path, "syn", "test_syn.py")
    assert p.returncode == 1, p.stdout + p.stderr
    got = {r["nodeid"].split("::")[1]: r for r in _results(tmp_path)}
    assert {k: r["outcome"] for k, r in got.items()} == {
        "test_a": "passed", "test_b": "failed", "test_c": "passed", "test_d": "timeout", "test_e": "failed",
        "test_f": "skipped", "test_g": "crashed", "test_h": "passed"}
    # a: attempt 1 until b broke the context; c, d (hang, stopped): 2; e, f, g (abort): 3; h: 4
    assert [got["test_" + k]["attempt"] for k in "abcdefgh"] == [1, 1, 2, 2, 3, 3, 3, 4]
    assert "illegal memory access" in got["test_b"]["message"] and "plain failure" in got["test_e"]["message"]
    assert "in test_d" in p.stdout  # the hung test's stack, dumped to the log
    assert "1 crashed, 2 failed, 3 passed, 1 skipped, 1 timeout in 4 attempt(s)" in p.stdout


def test_guard_under_xdist_records_the_same_outcomes(tmp_path):
    """With pytest-xdist (gpu_check.sh's test stages on a 16-core machine) the controller records the results,
    a worker whose context broke or whose test hung records it and exits, and xdist gives the rest to a new
    worker: the same outcomes as one process, in one attempt."""
    pytest.importorskip("xdist")
    (tmp_path / "test_syn.py").write_text(SYNTHETIC)
    cmd_extra = ("--xdist", "2")
    p = _guard(tmp_path, "syn", "test_syn.py", guard_args=cmd_extra)
    assert p.returncode == 1, p.stdout + p.stderr
    got = {r["nodeid"].split("::")[1]: r for r in _results(tmp_path)}
    assert {k: r["outcome"] for k, r in got.items()} == {
        "test_a": "passed", "test_b": "failed", "test_c": "passed", "test_d": "timeout", "test_e": "failed",
        "test_f": "skipped", "test_g": "crashed", "test_h": "passed"}
    assert "illegal memory access" in got["test_b"]["message"] and "in 1 attempt(s)" in p.stdout


def test_guard_plain_failures_need_no_restart(tmp_path):
    (tmp_path / "test_plain.py").write_text("def test_x(): assert 0\ndef test_y(): pass\n")
    p = _guard(tmp_path, "plain", "test_plain.py")
    assert p.returncode == 1 and "in 1 attempt(s)" in p.stdout, p.stdout
    assert [r["outcome"] for r in _results(tmp_path)] == ["failed", "passed"]
    (tmp_path / "test_ok.py").write_text("def test_z(): pass\n")
    assert _guard(tmp_path, "ok", "test_ok.py").returncode == 0


def test_guard_records_a_file_that_cannot_be_collected(tmp_path):
    (tmp_path / "test_broken.py").write_text("import no_such_module_here\ndef test_never(): pass\n")
    (tmp_path / "test_fine.py").write_text("def test_fine(): pass\n")
    p = _guard(tmp_path, "coll", "test_broken.py", "test_fine.py", "--continue-on-collection-errors")
    assert p.returncode == 1, p.stdout
    got = {r["nodeid"]: (r["outcome"], r["message"]) for r in _results(tmp_path)}
    assert got["test_fine.py::test_fine"][0] == "passed"
    assert got["test_broken.py"][0] == "error" and "no_such_module_here" in got["test_broken.py"][1]


def test_guard_stage_limit_stops_pytest_and_keeps_results(tmp_path):
    (tmp_path / "test_slow.py").write_text("import time\ndef test_a(): pass\ndef test_b(): time.sleep(50)\n")
    p = _guard(tmp_path, "slow", "test_slow.py", timeout="100", limit="4")
    assert p.returncode == 1 and "stopped at its time limit" in p.stdout, p.stdout
    assert [r["nodeid"].split("::")[1] for r in _results(tmp_path)] == ["test_a"]


def test_guard_merges_benchmark_json_across_restarts(tmp_path):
    pytest.importorskip("pytest_benchmark")
    (tmp_path / "test_b.py").write_text('''
import time
def _b(benchmark): benchmark.pedantic(lambda: None, rounds=3)
def test_b1(benchmark): _b(benchmark)
def test_b2(benchmark): raise RuntimeError("CUDA error: misaligned address")
def test_b3(benchmark): _b(benchmark)
def test_b4(benchmark): time.sleep(60)
def test_b5(benchmark): _b(benchmark)
''')
    dest = tmp_path / "out" / "bench.json"
    p = _guard(tmp_path, "bench", "test_b.py", "--benchmark-only", bench_json=dest)
    assert p.returncode == 1, p.stdout + p.stderr
    # attempt 1: b1, b2 (broken context, JSON written); 2: b3, b4 (hang: killed, no JSON); 3: b3 again, b5
    with open(dest) as f:
        names = sorted(b["name"] for b in json.load(f)["benchmarks"])
    assert names == ["test_b1", "test_b3", "test_b5"]
    assert "3 benchmark entries from 2 JSON file(s)" in p.stdout


@pytest.mark.parametrize("sigint_ignored", [False, True], ids=["foreground", "background"])
def test_guard_keeps_the_benchmarks_of_a_stage_stopped_mid_timing(tmp_path, sigint_ignored):
    """The stage limit's SIGINT lands inside a benchmark's timing loop: that entry has no rounds, and
    pytest-benchmark's JSON writer failed on it (min() of nothing), leaving an empty file: the second GPU run
    (2026-11-29) lost its 83 finished entries so. The finished ones are kept, the interrupted one left out.
    Background: the guard started with SIGINT ignored (as `cmd &` in a script starts it) still stops pytest by
    SIGINT, not by the SIGKILL 15 s later that left no JSON at all (2026-11-30)."""
    pytest.importorskip("pytest_benchmark")
    (tmp_path / "test_b.py").write_text('''
import time
def test_b1(benchmark): benchmark.pedantic(lambda: None, rounds=3)
def test_b2(benchmark): benchmark.pedantic(lambda: time.sleep(30), rounds=1, warmup_rounds=1)  # (stats made, no round)
''')
    dest = tmp_path / "out" / "bench.json"
    p = _guard(tmp_path, "bench", "test_b.py", "--benchmark-only", bench_json=dest, timeout="100", limit="6",
               sigint_ignored=sigint_ignored)
    assert "stopped at its time limit" in p.stdout, p.stdout + p.stderr
    took = re.search(r"attempt 1: exit 124 after (\d+) s", p.stdout)
    assert took and int(took.group(1)) < 6 + 10, p.stdout  # SIGINT ended it, not the SIGKILL 15 s after the limit
    assert dest.exists(), p.stdout + p.stderr
    with open(dest) as f:
        names = [b["name"] for b in json.load(f)["benchmarks"]]
    assert names == ["test_b1"], p.stdout


def test_merge_bench_skips_a_broken_part(tmp_path):
    sys.path.insert(0, str(Path(GUARD).parent))
    try:
        import gpu_guard
    finally:
        sys.path.pop(0)
    good, bad, dest = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "m.json"
    good.write_text(json.dumps({"machine_info": {}, "benchmarks": [{"name": "x"}]}))
    bad.write_text("")
    assert gpu_guard._merge_bench([str(bad), str(good)], str(dest)) == 1
    assert [b["name"] for b in json.loads(dest.read_text())["benchmarks"]] == ["x"]


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    """The whole script without a GPU (GPU_CHECK_DRY=1: no build, benchmarks on the CPU) on a few tests and
    one benchmark group, within a budget shorter than the stages' limits: every stage runs, with shorter limits, the output folder holds the files it documents (ptxas.txt aside,
    which the build writes; the GPU tool brings back at most 8) and the log ends with the summary."""
    out = tmp_path / "gpu"
    # a 150 s budget: less than the stages' 490 s of limits, so each gets its share (`lim`)
    env = dict(os.environ, GPU_CHECK_DRY="1", GPU_CHECK_PYTHON=sys.executable, LLMKERN_BENCH_WARMUP="2",
               GPU_CHECK_BUDGET="150", GPU_CHECK_PROFILE_MIN="1")
    p = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), str(out),
                        "rms_norm and (SmolLM2-135M-M1-H576-plain or fast_check)"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    files = sorted(os.listdir(out))
    assert files == ["bench.json", "bench_report.md", "bench_report.png", "gpu_check.log", "profile.tgz",
                     "tests.jsonl"], files
    with tarfile.open(out / "profile.tgz") as tar:  # the profile stage's case driver ran (on the CPU here)
        plog = tar.extractfile("profile/gpu_profile.log").read().decode()
    assert "decode.contiguous: profiled (checked" in plog and "FAILED" not in plog, plog
    stages = {json.loads(line)["stage"] for line in open(out / "tests.jsonl")}
    assert stages == {"cuda", "bench"}  # (the sm_90a and generic GPU stages select no test with this filter)
    log = (out / "gpu_check.log").read_text()
    for stage in ("tests 1/2", "tests 1b: the sm_90a attention", "tests 2/2", "GPU benchmarks", "profiles", "summary"):
        assert stage in log
    assert "## Summary" in log and "files in" in log.splitlines()[-1]
    limit = int(log.split("tests 1b: the sm_90a attention kernel (limit ")[1].split(" ")[0])
    assert 10 <= limit < 50  # its nominal 50 s, cut to fit the budget
