"""Keep one bad GPU kernel from costing a whole GPU run (scripts/gpu_check.sh's stages).

A GPU session is short and rare. Inside one pytest process, a kernel that faults (an illegal address,
a misaligned access, a device-side assert) leaves the CUDA context unusable: every later test and
benchmark of that process fails too. A kernel that never finishes (an mbarrier phase that never
completes) stops the process until the stage's time limit. This file is both:

- a pytest plugin (`-p gpu_guard`, with scripts/ on PYTHONPATH), active when GPU_GUARD_DIR is set. It
  appends one JSON line per finished test to GPU_GUARD_DIR/results.jsonl (nodeid, outcome, seconds,
  the error's first line; flushed, so kept even if the process is killed; a file that cannot be collected
  is an "error" line too), names the running test in
  GPU_GUARD_DIR/current, and after a failure checks whether the CUDA context still works (the error's
  text, then a small synchronised kernel). If it does not, it writes the test to GPU_GUARD_DIR/culprit
  and stops the session after that test (pytest still writes its benchmark JSON). A test running
  longer than GPU_GUARD_TIMEOUT seconds (default 60) is recorded as "timeout", the Python stacks are
  dumped, and the process exits at once (code 71). Tests listed in GPU_GUARD_SKIP (a file of
  nodeids) are deselected.

- the driver of one stage: `python3 scripts/gpu_guard.py run --name NAME --limit SECONDS --dir DIR
  [--bench-json PATH] -- PYTEST_ARGS...` runs `python3 -m pytest -p gpu_guard PYTEST_ARGS` and, while
  an attempt ended on a broken context, a timeout or a crash and time is left, runs it again in a new
  process without the tests already done and without the one that broke it. At the limit it sends
  SIGINT (pytest then ends its session normally), then SIGKILL 15 s later. It prints each attempt's
  last lines and every failed test, appends the stage's results to DIR/tests.jsonl, and with
  --bench-json merges the attempts' pytest-benchmark JSON files into PATH (an attempt killed before
  writing its JSON has its benchmarks run again). Exit status 0 when every test passed or was skipped.

Usage of the results: `python3 scripts/gpu_guard.py summary DIR/tests.jsonl` prints counts per stage.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time

# Errors after which the CUDA context is unusable (cudaGetErrorString / the driver's messages).
STICKY = ("illegal memory access", "unspecified launch failure", "misaligned address", "illegal instruction",
          "device-side assert", "invalid program counter", "hardware stack error", "launch timed out",
          "illegal address", "uncorrectable ECC", "CUDA_ERROR_ILLEGAL_ADDRESS", "CUDA_ERROR_LAUNCH_FAILED")
EXIT_TIMEOUT, EXIT_BROKEN = 71, 72

# ------------------------------------------------------------------------------------------- plugin

_DIR = os.environ.get("GPU_GUARD_DIR")
_state: dict = {}
# The process's real stderr, duplicated when pytest imports this plugin (`-p`), before its output capture
# redirects fd 2 into a temporary file for each test: messages written here reach the log even mid-test.
_ERR = os.fdopen(os.dup(2), "w") if _DIR else None


def _append(line: dict) -> None:
    with open(os.path.join(_DIR, "results.jsonl"), "a") as f:
        f.write(json.dumps(line) + "\n")
        f.flush()


def _write(name: str, text: str) -> None:
    with open(os.path.join(_DIR, name), "w") as f:
        f.write(text)


def context_broken(message: str) -> bool:
    """Whether a failure left the CUDA context unusable: a sticky error's text, or a synchronised kernel
    failing now (asynchronous errors surface at the next synchronisation, possibly in a later test)."""
    if any(s.lower() in message.lower() for s in STICKY):
        return True
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return False
    try:
        torch.cuda.synchronize()
        t = torch.ones(1, device="cuda")
        t.add_(1)
        return float(t.item()) != 2.0
    except Exception:  # noqa: BLE001 - any failure here means the context cannot run the next test
        return True


def _first_line(report) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr)
    return text.strip().splitlines()[0][:300] if text.strip() else ""


def pytest_configure(config):
    if not _DIR:
        return
    # Three roles. plain: one process runs every test and records it. Under pytest-xdist (`-n N`) the
    # controller records what its workers report (crashes included), and each worker only guards: its
    # watchdog, and the context probe after a failure, record the test themselves and end the worker (xdist
    # starts a new one for the rest; a worker that stopped its session instead would strand its tests).
    role = "worker" if hasattr(config, "workerinput") else \
        ("controller" if getattr(config.option, "numprocesses", None) not in (None, 0) else "plain")
    _state.update(stage=os.environ.get("GPU_GUARD_STAGE", ""), attempt=int(os.environ.get("GPU_GUARD_ATTEMPT", "1")),
                  timeout=float(os.environ.get("GPU_GUARD_TIMEOUT", "60")), role=role, tests={})


def pytest_collection_modifyitems(config, items):
    skip_file = os.environ.get("GPU_GUARD_SKIP")
    if not _DIR or not skip_file or not os.path.exists(skip_file):
        return
    with open(skip_file) as f:
        skip = {line.strip() for line in f if line.strip()}
    keep = [i for i in items if i.nodeid not in skip]
    gone = [i for i in items if i.nodeid in skip]
    if gone:
        config.hook.pytest_deselected(items=gone)
        items[:] = keep


def _line(nodeid: str, outcome: str, seconds, message: str) -> dict:
    return {"stage": _state["stage"], "attempt": _state["attempt"], "nodeid": nodeid, "outcome": outcome,
            "seconds": None if seconds is None else round(seconds, 3), "message": message}


def _on_timeout(nodeid: str, started: float) -> None:
    import faulthandler

    _append(_line(nodeid, "timeout", time.monotonic() - started,
                  f"still running after {_state['timeout']:g} s (GPU_GUARD_TIMEOUT): stopped"))
    if _state["role"] == "plain":
        _write("culprit", nodeid + "\n")
    err = _ERR
    print(f"\ngpu_guard: {nodeid} still running after {_state['timeout']:g} s; Python stacks:", file=err, flush=True)
    faulthandler.dump_traceback(file=err, all_threads=True)
    err.flush()
    os._exit(EXIT_TIMEOUT)


def pytest_collectreport(report):
    """A file that fails to import (run with --continue-on-collection-errors: the rest still runs) is a result too."""
    if _DIR and report.failed and _state["role"] != "worker":
        # (the report's first line only says "ImportError while importing test module ...": the cause is last)
        lines = [ln.strip() for ln in str(report.longrepr).splitlines() if ln.strip()]
        cause = next((ln[1:].strip() for ln in reversed(lines) if ln.startswith("E ")), lines[-1] if lines else "")
        _append(_line(report.nodeid, "error", None, "collection: " + cause[:300]))


def pytest_runtest_logstart(nodeid, location):
    if not _DIR:
        return
    t = _state["tests"][nodeid] = {"started": time.monotonic(), "outcome": "passed", "message": ""}
    if _state["role"] == "controller":
        return
    if _state["role"] == "plain":
        _write("current", nodeid + "\n")
    t["timer"] = timer = threading.Timer(_state["timeout"], _on_timeout, args=(nodeid, t["started"]))
    timer.daemon = True
    timer.start()


def pytest_runtest_logreport(report):
    if not _DIR:
        return
    if _state["role"] == "controller" and report.when == "???":
        # xdist's report of a worker that died while running this test (no logfinish follows)
        t = _state["tests"].pop(report.nodeid, None)
        _append(_line(report.nodeid, "crashed", None if t is None else time.monotonic() - t["started"],
                      str(report.longrepr).strip().splitlines()[0][:300]))
        return
    t = _state["tests"].get(report.nodeid)
    if t is None:
        return
    if report.failed:
        if t["outcome"] != "failed":
            t["outcome"], t["message"] = ("failed" if report.when == "call" else "error"), _first_line(report)
    elif report.skipped and t["outcome"] == "passed":
        t["outcome"] = "skipped"
        t["message"] = str(report.longrepr[2])[:300] if isinstance(report.longrepr, tuple) else ""


def pytest_runtest_logfinish(nodeid, location):
    if not _DIR:
        return
    t = _state["tests"].pop(nodeid, None)
    if t is None:
        return
    role = _state["role"]
    if role != "worker":
        _append(_line(nodeid, t["outcome"], time.monotonic() - t["started"], t["message"]))
    # (the watchdog stays armed through the probe: a GPU still busy with a hung kernel blocks its synchronize)
    if role != "controller" and t["outcome"] in ("failed", "error") and context_broken(t["message"]):
        print(f"\ngpu_guard: the CUDA context is unusable after {nodeid}: stopping this process", file=_ERR, flush=True)
        if role == "worker":
            # xdist reports this worker's exit as a crash of this test; its own line keeps the real error
            _append(_line(nodeid, t["outcome"], time.monotonic() - t["started"], t["message"]))
            _ERR.flush()
            os._exit(EXIT_BROKEN)
        _write("culprit", nodeid + "\n")
        _state["session"].shouldstop = f"gpu_guard: CUDA context unusable after {nodeid}"
    if "timer" in t:
        t["timer"].cancel()


def pytest_sessionstart(session):
    _state["session"] = session


try:
    import pytest as _pytest
except ImportError:  # (the driver below runs without pytest imported; the plugin always has it)
    _pytest = None

if _pytest is not None:
    @_pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_sessionfinish(session, exitstatus):
        """Before pytest-benchmark writes its JSON (its own sessionfinish, which this wraps): leave out an entry
        stopped before its first round (the stage limit's SIGINT inside its warm-up or timing loop). Its empty
        statistics made the writer fail (min() of nothing) and the whole file come out empty."""
        bs = getattr(session.config, "_benchmarksession", None)
        if bs is not None and getattr(bs, "benchmarks", None):
            bs.benchmarks[:] = [b for b in bs.benchmarks if getattr(b, "stats", None)]
        yield


# ------------------------------------------------------------------------------------------- driver

def _read_results(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill
                pass
    return out


def _merge_bench(parts: list[str], dest: str) -> int:
    """Concatenate the `benchmarks` of pytest-benchmark JSON files into dest (the rest from the first)."""
    merged = None
    for p in parts:
        try:
            with open(p) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:  # a file cut short: the other attempts' entries still count
            print(f"--- {p}: not a benchmark JSON file ({e}); left out", flush=True)
            continue
        if merged is None:
            merged = data
        else:
            merged["benchmarks"] += data.get("benchmarks", [])
    if merged is None:
        return 0
    with open(dest, "w") as f:
        json.dump(merged, f)
    return len(merged["benchmarks"])


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _run_attempt(cmd: list[str], env: dict, seconds: float, log_path: str) -> int:
    """Run cmd with its output to log_path; SIGINT at `seconds`, SIGKILL 15 s later. Returns the exit code
    (124 when stopped at the limit)."""
    with open(log_path, "w") as log:
        # A process group of its own (not a new session: a tool that ends this run still ends pytest), so that
        # SIGINT reaches whatever pytest started too. SIGINT back to its default in the child: a command started
        # in the background (`cmd &` in a script, a tool's runner) inherits it ignored, and pytest would then
        # ignore the stage limit's SIGINT, be killed 15 s later and write no benchmark JSON (seen 2026-11-30).
        p = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, process_group=0,
                             preexec_fn=_sigint_default)
        try:
            return p.wait(timeout=max(seconds, 1.0))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGINT)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            return 124


def _tail(path: str, n: int) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


def run_stage(args) -> int:
    work = os.path.join(args.dir, f".guard_{args.name}")
    os.makedirs(work, exist_ok=True)
    for name in os.listdir(work):
        os.remove(os.path.join(work, name))
    results_path = os.path.join(work, "results.jsonl")
    deadline = time.monotonic() + args.limit
    bench_parts, skip, attempt, code = [], set(), 0, 0
    while True:
        attempt += 1
        for name in ("culprit", "current"):
            if os.path.exists(os.path.join(work, name)):
                os.remove(os.path.join(work, name))
        skip_path = os.path.join(work, "skip.txt")
        with open(skip_path, "w") as f:
            f.write("".join(s + "\n" for s in sorted(skip)))
        env = dict(os.environ, GPU_GUARD_DIR=work, GPU_GUARD_STAGE=args.name, GPU_GUARD_ATTEMPT=str(attempt),
                   GPU_GUARD_SKIP=skip_path)
        here = os.path.dirname(os.path.abspath(__file__))
        env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        cmd = [sys.executable, "-m", "pytest", "-p", "gpu_guard", *args.pytest]
        if args.xdist and _has_xdist():
            # (a worker that dies is replaced, and its tests go to the others: no restart needed here)
            cmd += ["-n", str(args.xdist), "--max-worker-restart", "64"]
        part = None
        if args.bench_json:
            part = os.path.join(work, f"bench.{attempt}.json")
            cmd.append(f"--benchmark-json={part}")
        log_path = os.path.join(work, f"attempt{attempt}.log")
        t0 = time.monotonic()
        code = _run_attempt(cmd, env, deadline - t0, log_path)
        results = [r for r in _read_results(results_path) if r["attempt"] == attempt]
        culprit = None
        if os.path.exists(os.path.join(work, "culprit")):
            culprit = open(os.path.join(work, "culprit")).read().strip()
        elif code not in (0, 1, 5, 124) and os.path.exists(os.path.join(work, "current")):
            culprit = open(os.path.join(work, "current")).read().strip()  # the process died in this test
            if culprit not in {r["nodeid"] for r in results}:
                with open(results_path, "a") as f:
                    f.write(json.dumps({"stage": args.name, "attempt": attempt, "nodeid": culprit, "outcome": "crashed",
                                        "seconds": None, "message": f"the test process died (exit {code})"}) + "\n")
        # (a broken attempt's last lines hold the error or the dumped stacks: more of them)
        print(f"--- {args.name}, attempt {attempt}: exit {code} after {time.monotonic() - t0:.0f} s; its last lines:")
        print(_tail(log_path, args.tail * (3 if culprit else 1)), end="", flush=True)
        if part is not None and os.path.exists(part):
            bench_parts.append(part)
            skip |= {r["nodeid"] for r in results}
        elif part is None:
            skip |= {r["nodeid"] for r in results}
        if culprit:
            skip.add(culprit)
            print(f"--- {args.name}: {culprit} broke attempt {attempt}")
        left = deadline - time.monotonic()
        if not culprit or code == 124 or left < 15 or attempt >= args.max_attempts:
            break
        print(f"--- {args.name}: running the rest again in a new process ({left:.0f} s left)", flush=True)
    results = _read_results(results_path)
    # The stage's results, one line per test: what a later attempt ran again replaces the earlier line, except
    # that a crash reported for a test that had already failed (a worker ended by the guard) keeps the failure.
    final: dict = {}
    for r in results:
        old = final.get(r["nodeid"])
        if r["outcome"] == "crashed" and old is not None and old["outcome"] in ("failed", "error", "timeout"):
            continue
        final[r["nodeid"]] = r
    with open(os.path.join(args.dir, "tests.jsonl"), "a") as f:
        for r in final.values():
            f.write(json.dumps(r) + "\n")
    bad = [r for r in final.values() if r["outcome"] not in ("passed", "skipped")]
    counts: dict = {}
    for r in final.values():
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    stopped = " (stopped at its time limit)" if code == 124 else ""
    print(f"--- {args.name}: {', '.join(f'{v} {k}' for k, v in sorted(counts.items())) or 'nothing ran'}"
          f" in {attempt} attempt(s){stopped}")
    for r in bad[:args.show]:
        print(f"  {r['outcome'].upper():8s} {r['nodeid']}: {r['message']}")
    if len(bad) > args.show:
        print(f"  ... and {len(bad) - args.show} more (tests.jsonl)")
    if args.bench_json:
        n = _merge_bench(bench_parts, args.bench_json)
        print(f"--- {args.name}: {n} benchmark entries from {len(bench_parts)} JSON file(s)")
    return 0 if not bad and code in (0, 5) else 1


def _has_xdist() -> bool:
    try:
        import xdist  # noqa: F401
    except ImportError:
        return False
    return True


def summary(path: str) -> int:
    """Counts of outcomes per stage in a tests.jsonl."""
    per: dict = {}
    for r in _read_results(path):
        per.setdefault(r["stage"], {}).setdefault(r["outcome"], 0)
        per[r["stage"]][r["outcome"]] += 1
    for stage, counts in per.items():
        print(f"{stage:28s} " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run one stage's pytest, again after a broken context (see the module doc)")
    r.add_argument("--name", required=True)
    r.add_argument("--limit", type=float, required=True, help="seconds for the whole stage")
    r.add_argument("--dir", required=True, help="output folder: tests.jsonl is appended there")
    r.add_argument("--bench-json", default=None, help="merge the attempts' benchmark JSON into this file")
    r.add_argument("--max-attempts", type=int, default=6)
    r.add_argument("--xdist", type=int, default=0, metavar="N",
                   help="run the tests in N pytest-xdist worker processes where xdist is installed (not for "
                        "benchmarks: pytest-benchmark turns itself off under xdist)")
    r.add_argument("--tail", type=int, default=12, help="lines of each attempt's output to print")
    r.add_argument("--show", type=int, default=40, help="failed tests to list")
    r.add_argument("pytest", nargs=argparse.REMAINDER)
    s = sub.add_parser("summary", help="outcomes per stage of a tests.jsonl")
    s.add_argument("path")
    args = ap.parse_args(argv)
    if args.cmd == "summary":
        return summary(args.path)
    if args.pytest and args.pytest[0] == "--":
        args.pytest = args.pytest[1:]
    return run_stage(args)


if __name__ == "__main__":
    sys.exit(main())
