"""pytest-benchmark set-up for llmkern: collection of bench_*.py, threads, machine limits, the `bench` fixture.

Run: `pytest benchmarks/ --benchmark-only` (see benchmarks/README.md). Environment:
  LLMKERN_BENCH_THREADS  torch threads for every benchmark and for the limit measurements (default 2)
  LLMKERN_BENCH_DEVICE   "cpu" (default) or "cuda"
  LLMKERN_BENCH_FULL=1   add the big model shapes (Llama-2-7B, Llama-3-8B everywhere, more M / B / S)
  LLMKERN_BENCH_DTYPES   activation dtypes, comma list of fp32,bf16,fp16 (default bf16,fp32)
  LLMKERN_BENCH_WARMUP   warm-up iterations per calibration step (default 20; warm-up is always on
                         unless --benchmark-warmup is given explicitly)
  LLMKERN_BENCH_CUDA_GRAPHS  "1" (default): on a GPU, time each call replayed from a CUDA graph (kernel time);
                         "0": eager calls (kernel or Python launch time, whichever is longer)
  LLMKERN_BENCH_COLD     "1" (default): weights and KV caches rotate through enough copies to exceed
                         four times the last-level cache, so each call reads them from memory as in a
                         real model (whose layers together never fit in cache); "0": one hot copy
"""
from __future__ import annotations

import contextlib
import itertools
import os
import statistics
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _machine, _shapes for every bench file

import _machine  # noqa: E402
import _shapes  # noqa: E402

THREADS = int(os.environ.get("LLMKERN_BENCH_THREADS", "2"))
DEVICE = os.environ.get("LLMKERN_BENCH_DEVICE", "cpu")
COLD = os.environ.get("LLMKERN_BENCH_COLD", "1") not in ("", "0")
MAX_COPIES = 4096
_LIMITS: dict = {}  # filled once per session by the `limits` fixture, saved into the JSON


# ------------------------------------------------------------------------------------- collection

def pytest_collect_file(file_path, parent):
    """Collect benchmarks/bench_*.py although pyproject's python_files only names test_*.py.

    A path given on the command line is already collected by pytest itself; returning it again here
    would run it twice.
    """
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _cli_has(config, flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in config.invocation_params.args)


# On a GPU the GPU issues' target groups run first (scripts/gpu_check.sh gives the benchmarks a fixed time; what
# a stopped run never reached is lost): the linears (many short entries), decode, then prefill attention.
GPU_ORDER = ("bench_int4_linear.py", "bench_int8_linear.py", "bench_decode_attention.py", "bench_attention.py")


def pytest_collection_modifyitems(config, items):
    """Warm-up on for every benchmark here (pytest-benchmark's default is off), unless set on the CLI; on a GPU,
    the files of GPU_ORDER first, in that order (stable: each file's entries keep their order)."""
    if DEVICE == "cuda":
        rank = {name: i for i, name in enumerate(GPU_ORDER)}
        items.sort(key=lambda item: rank.get(item.path.name, len(GPU_ORDER)))
    opts = {}
    if not _cli_has(config, "--benchmark-warmup"):
        opts["warmup"] = True
    if not _cli_has(config, "--benchmark-warmup-iterations"):
        opts["warmup_iterations"] = int(os.environ.get("LLMKERN_BENCH_WARMUP", "20"))
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if opts and str(item.path).startswith(here + os.sep):
            item.add_marker(pytest.mark.benchmark(**opts))


def pytest_report_header(config):
    return (f"llmkern benchmarks: device={DEVICE} threads={THREADS} full={_shapes.FULL} "
            f"dtypes={','.join(_shapes.dtypes())}")


def pytest_benchmark_update_machine_info(config, machine_info):
    """Static facts only (pytest-benchmark compares machine_info between saved runs)."""
    try:
        from llmkern import _backends

        isa = _backends.cpu_isa()
    except Exception as e:  # noqa: BLE001 - a report of what is there, never a reason to fail the run
        isa = f"unknown ({type(e).__name__})"
    machine_info["llmkern"] = {"device": DEVICE, "threads": THREADS, "cpu_isa": isa, "cpu_host": _machine.cpu_host(),
                               "torch": torch.__version__,
                               "full": _shapes.FULL,
                               "gpu": torch.cuda.get_device_name(0) if DEVICE == "cuda" and torch.cuda.is_available() else None}


_TIME_STATS = ("min", "max", "mean", "stddev", "median", "iqr", "q1", "q3", "ld15iqr", "hd15iqr", "total")


def per_call_stats(bench_json: dict) -> None:
    """Statistics of a GPU entry timed as replays of a graph of several calls (`calls_per_replay` in its
    extra_info, Bench._cuda_timed) made per call, in place: every time divided, ops multiplied."""
    k = int((bench_json.get("extra_info") or {}).get("calls_per_replay") or 1)
    stats = bench_json.get("stats")
    if k <= 1 or not stats or stats.get("per_call"):
        return
    for f in _TIME_STATS:
        if isinstance(stats.get(f), (int, float)):
            stats[f] = stats[f] / k
    if isinstance(stats.get("ops"), (int, float)):
        stats["ops"] = stats["ops"] * k
    if isinstance(stats.get("data"), list):
        stats["data"] = [t / k for t in stats["data"]]
    stats["per_call"] = True


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """The limits measured in this run, for benchmarks/report.py; GPU graph entries' statistics per call."""
    output_json["llmkern_limits"] = dict(_LIMITS)
    for b in output_json.get("benchmarks", []):
        per_call_stats(b)


# ------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session", autouse=True)
def threads():
    """Every benchmark (and the limit measurement) runs with LLMKERN_BENCH_THREADS torch threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield THREADS
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def limits(request, threads):
    """The machine's limits (see _machine.py), measured once per session; {} when benchmarks are disabled."""
    cfg = request.config
    if cfg.getoption("benchmark_disable", False) or cfg.getoption("benchmark_skip", False):
        return {}
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("LLMKERN_BENCH_DEVICE=cuda but torch sees no GPU")
    _LIMITS.update(_machine.measure(DEVICE))
    return _LIMITS


class _OneGroupCache:
    """Tensors of the group being benchmarked; building the next group's frees the previous one's.

    Parameters are ordered group by group (see _shapes.params), so each big weight is made once.
    """

    def __init__(self):
        self.key, self.value = None, None

    def get(self, key, make):
        if key != self.key:
            self.key, self.value = None, None  # free first: two Llama-3 weights at once do not fit everywhere
            self.value, self.key = make(), key
        return self.value


@pytest.fixture(scope="session")
def group_cache():
    return _OneGroupCache()


IN_TURN_SECONDS = 2.0  # timed calls' time per in-turn entry (both sides), within IN_TURN_ROUNDS
IN_TURN_ROUNDS = (31, 1001)


class Bench:
    """Runs one entry of a group: checks it computes the right thing, times it, records extra_info."""

    def __init__(self, benchmark, limits, threads):
        self.benchmark, self.limits, self.threads = benchmark, limits, threads
        self.device = DEVICE

    # ----------------------------------------------------------------- checks
    @staticmethod
    def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
        """||out - ref|| / ||ref|| in float64 (NaN if out has a NaN)."""
        o, r = out.detach().double().cpu(), ref.detach().double().cpu()
        return float((o - r).norm() / r.norm().clamp_min(1e-300))

    def close(self, out, ref, tol: float, what: str = "output") -> None:
        """Fail the benchmark if `out` is not `ref` within relative error `tol` (NaN never passes)."""
        if tuple(out.shape) != tuple(ref.shape):
            pytest.fail(f"{what}: shape {tuple(out.shape)} != expected {tuple(ref.shape)}")
        err = self.rel_err(out, ref)
        if not err <= tol:  # also catches NaN
            pytest.fail(f"{what}: relative error {err:.3g} > {tol:g}: this entry computes something else, "
                        f"its timing would be meaningless")

    # ----------------------------------------------------------------- cold weights
    def rotating(self, tensors: tuple, nbytes: float, clone=None):
        """A function returning, call after call, the next of n copies of `tensors` (a tuple).

        n copies of `nbytes` each together exceed four times the last-level cache (LLMKERN_BENCH_COLD=1),
        so a timed call finds the copy it reads evicted, as a layer's weights are in a decode step. (Twice
        was not enough here: a 2-vCPU VM reports its share of the L3, and entries then read at more than
        the measured DRAM bandwidth.) clone(t): how a copy is made (default t.clone()).
        """
        n = 1
        if COLD and nbytes > 0:
            n = max(1, min(MAX_COPIES, -(-4 * _machine.llc_bytes(self.device) // int(nbytes))))
        self.benchmark.extra_info["copies"] = n
        clone = clone or (lambda t: t.clone())
        sets = [tuple(tensors)] + [tuple(clone(t) for t in tensors) for _ in range(n - 1)]
        return itertools.cycle(sets).__next__

    # ----------------------------------------------------------------- running
    def __call__(self, fn, *, op: str, impl: str, kind: str, case, dtype: str, nbytes: float, flops: float,
                 compute: str | None = None, backend: str | None = None, check=None, verify_op: str | None = None,
                 graph: bool = True):
        """Benchmark `fn()` as entry `impl` of group (op, case, dtype).

        kind: "llmkern" (with `backend`: the llmkern backend, verified to really run op `verify_op`,
        default `op`) or "peer".
        nbytes / flops: the minimum memory traffic and the arithmetic of this entry's own work.
        compute: the matmul-rate key for the fraction (default: dtype). check(out): validates the
        first call's result (use `self.close`). graph: on a GPU, time replays of the call captured in a CUDA
        graph (the kernels' time: `_cuda_timed`); False for entries whose point is the host-side cost
        (bench_op_overhead.py).
        """
        b = self.benchmark
        b.group = f"{op}: {case.id} [{dtype}]"
        b.extra_info.update(op=op, impl=impl, kind=kind, backend=backend, case=case.id, model=case.model,
                            shape=case.shape, dtype=dtype, threads=self.threads, device=self.device,
                            bytes=float(nbytes), flops=float(flops), compute=compute or dtype)
        out = self._first_call(fn, verify_op or op, kind, backend)
        if check is not None:
            check(out)
        del out
        if self.device == "cuda":
            timed = self._cuda_timed(fn, graph, verify_op or op if kind == "llmkern" else None, backend)
        else:
            timed = fn
        b(timed)
        if b.stats:  # None / empty under --benchmark-disable
            median = b.stats.stats.median / int(b.extra_info.get("calls_per_replay", 1))  # (per call)
            b.extra_info["median_s"] = median
            b.extra_info.update(_machine.fractions(self.limits, nbytes, flops, median, compute or dtype))
            if self.limits:
                b.extra_info["limit_read_gbs"] = self.limits.get("read_gbs")
                b.extra_info["limit_mm_gflops"] = self.limits.get("mm_gflops", {}).get(compute or dtype)

    def entry(self, e: _shapes.Entry, *, op: str, case, dtype: str) -> None:
        """Benchmark Entry `e` as an entry of group (op, case, dtype) (`__call__`'s arguments from the Entry)."""
        self(e.fn, op=op, impl=e.impl, kind=e.kind, case=case, dtype=dtype, nbytes=e.nbytes, flops=e.flops,
             compute=e.compute, backend=e.backend, check=e.check)

    def in_turn(self, ours: _shapes.Entry, peer: _shapes.Entry, *, op: str, case, dtype: str) -> None:
        """Time llmkern's entry `ours` and `peer` in turn (CPU), two calls of each per round: the round's setup calls
        the peer twice, timing the second, then calls ours once; the benchmark times ours' second call. Each timed
        call follows a call of its own kind, as a layer's kernel follows the previous layer's in a model and as in
        the group's sequential entries; one-and-one alternation would time each side right after the other, a
        context neither runs in (one A/B in a process had the W4A8g module ~5% slower right after torch's int4
        kernel than after itself; repeats found 1%: docs/notes/cpu-intel-host.md, session 28). The ratio is the
        median over rounds of peer time / our time, which a shared VM's drift cannot move: the group's own entries
        run seconds to minutes apart, and this host's memory speed and clock move by a third between minutes.

        The group is "<op>: <case> [<dtype>]: <ours> in turn with <peer>"; extra_info adds alt_peer,
        alt_peer_median_s, alt_peer_bytes, alt_ratio and alt_of (the group the pair comes from). Both entries'
        first results are checked, and ours must run its backend (strict mode), as in `__call__`. Rounds: as many
        as fill IN_TURN_SECONDS of timed calls, within IN_TURN_ROUNDS, after five warm-up rounds.
        """
        if self.device != "cpu":
            pytest.skip("in-turn entries are CPU runs' (a GPU times graph replays, with no drift to cancel)")
        b = self.benchmark
        base = f"{op}: {case.id} [{dtype}]"
        b.group = f"{base}: {ours.impl} in turn with {peer.impl}"
        b.extra_info.update(op=op, impl=ours.impl, kind=ours.kind, backend=ours.backend, case=case.id,
                            model=case.model, shape=case.shape, dtype=dtype, threads=self.threads, device=self.device,
                            bytes=float(ours.nbytes), flops=float(ours.flops), compute=ours.compute or dtype,
                            alt_peer=peer.impl, alt_of=base, alt_peer_bytes=float(peer.nbytes))
        for e in (ours, peer):
            out = self._first_call(e.fn, op, e.kind, e.backend)
            if e.check is not None:
                e.check(out)
            del out
        t0 = time.perf_counter()
        for _ in range(5):  # warm-up rounds, which also size the rounds
            for fn in (peer.fn, peer.fn, ours.fn, ours.fn):
                fn()
        pair_s = (time.perf_counter() - t0) / 10  # one call of each
        rounds = int(min(max(IN_TURN_SECONDS / max(pair_s, 1e-9), IN_TURN_ROUNDS[0]), IN_TURN_ROUNDS[1]))
        peer_times: list[float] = []

        def peer_calls():  # the round's setup: the peer twice (the second timed), ours once; pedantic times ours next
            peer.fn()
            t = time.perf_counter()
            peer.fn()
            peer_times.append(time.perf_counter() - t)
            ours.fn()

        b.pedantic(ours.fn, setup=peer_calls, rounds=rounds, iterations=1, warmup_rounds=0)
        if b.stats:
            mine = list(b.stats.stats.data)  # [rounds] seconds, in round order
            assert len(mine) == len(peer_times), (len(mine), len(peer_times))
            median = b.stats.stats.median
            b.extra_info.update(median_s=median, alt_peer_median_s=statistics.median(peer_times),
                                alt_ratio=statistics.median(p / m for p, m in zip(peer_times, mine)))
            b.extra_info.update(_machine.fractions(self.limits, ours.nbytes, ours.flops, median, ours.compute or dtype))

    def memory_read(self, impl: str, *, op: str, case, dtype: str, nbytes: float) -> None:
        """One of the group's own read-bandwidth entries (`impl`: _shapes.READ_ENTRY first in the group,
        READ_ENTRY_END last; kind "limit"), a plain read of about `nbytes` (the group's weights or cache) from
        rotated copies, timed with the group's entries.

        The run's probe (`limits`, measured once at its start) and an entry timed minutes later can see different
        memory speeds on a shared VM (2026-11-29: kernels at 150-230% of the probe's 40.6 GB/s; 2026-11-30 a
        same-size read and the int8 GEMV both at ~32 GB/s; within one file, same-size reads at 31-47 GB/s): the
        report takes "% BW" of such a group from the best of its reads and the run's probe. CPU: llmkern's
        streaming probe `_C.read_sum` (torch's `x.sum()` without the extension), over copies in transparent huge
        pages where llmkern's packed weights get them (`_machine.hugepage_ones`): the limit read the way the
        fastest kernels read."""
        n = max(16, int(nbytes) // 4)  # float32 elements
        if self.device == "cpu":
            nxt = self.rotating((_machine.hugepage_ones(n),), 4 * n, clone=lambda t: _machine.hugepage_ones(n))
        else:
            nxt = self.rotating((torch.ones(n, dtype=torch.float32, device=self.device),), 4 * n)  # [n] each
        C = None
        if self.device == "cpu":
            from llmkern import _backends

            C = _backends.cpu_module()
        if C is not None and hasattr(C, "read_sum"):
            threads = self.threads
            fn = lambda: C.read_sum(nxt()[0].data_ptr(), n, threads)  # noqa: E731
        else:
            fn = lambda: nxt()[0].sum()  # noqa: E731
        self(fn, op=op, impl=impl, kind="limit", case=case, dtype=dtype, nbytes=4.0 * n, flops=0.0,
             graph=False)

    def _cuda_timed(self, fn, graph: bool = True, op: str | None = None, backend: str | None = None):
        """What to time on a GPU, with the fixture's timer synchronizing (`_synced_clock`): pytest-benchmark times
        rounds (>= 1 ms) of back-to-back replays and divides by their count, so the synchronize costs < 1% of a
        round. (Before 2026-11-29's second GPU run each call synchronized: every time had a ~20 us floor, F.linear
        on a 1536x576 weight took 22 us, and small-op ratios were compressed.)

        Calls are replayed from one CUDA graph (LLMKERN_BENCH_CUDA_GRAPHS=0: called eagerly): the kernels' time,
        as the device notes ask for many short launches, without the ~5-20 us of Python each llmkern or torch call
        spends before its launch (bench_op_overhead.py measures that). The graph holds a whole turn of the
        cold-weights rotation (`rotating`), at least 16 calls, so that one replay's launch (a few us of host time)
        is spread over them; `calls_per_replay` in extra_info says how many, and the JSON's statistics are made
        per call (`per_call_stats`). An llmkern entry is captured in strict mode and its backend checked again
        (a fallback would be recorded under its name). A call that cannot be captured is timed eagerly;
        extra_info["timing"] says which.
        """
        b = self.benchmark
        if hasattr(b, "_timer") and hasattr(b, "_min_time"):
            b._timer = _synced_clock
            b._min_time = max(float(b._min_time), 1e-3)
        else:  # (another pytest-benchmark: one synchronize per call, as before)
            def timed():
                r = fn()
                torch.cuda.synchronize()
                return r
            b.extra_info["timing"] = "eager, synchronized per call"
            return timed
        if not graph or os.environ.get("LLMKERN_BENCH_CUDA_GRAPHS", "1") in ("", "0"):
            b.extra_info["timing"] = "eager"
            return fn
        copies = max(1, int(b.extra_info.get("copies", 1)))
        calls = copies * -(-GRAPH_MIN_CALLS // copies)  # whole turns of the rotation
        graph_obj, why = _capture_calls(fn, copies, calls, op, backend)
        if graph_obj is None:
            b.extra_info["timing"] = f"eager (not capturable: {why})"
            return fn
        b.extra_info["timing"] = "graph"
        b.extra_info["calls_per_replay"] = calls
        return graph_obj.replay

    def _first_call(self, fn, op, kind, backend):
        """One untimed call: skip what cannot run here (stub, unsupported input), fail a silent fallback."""
        if kind == "llmkern" and backend is not None:
            from llmkern.ops import OPS, strict

            OPS[op].last_backend = None
            try:
                with strict():
                    out = fn()
            except NotImplementedError as e:
                pytest.skip(f"llmkern.{op} backend {backend!r} not implemented yet ({str(e) or 'a stub'})")
            except RuntimeError as e:
                if "strict mode forbids" in str(e):
                    pytest.skip(f"backend {backend!r} cannot take this input: {e}")
                raise
            if OPS[op].last_backend != backend:
                pytest.fail(f"asked for backend {backend!r}, but {OPS[op].last_backend!r} ran")
            return out
        try:
            return fn()
        except (RuntimeError, NotImplementedError) as e:
            pytest.skip(f"peer not available here: {type(e).__name__}: {str(e).splitlines()[0][:200]}")


def _synced_clock() -> float:
    """time.perf_counter() once the GPU has finished what was queued (the fixture's timer on a GPU)."""
    torch.cuda.synchronize()
    return time.perf_counter()


GRAPH_MIN_CALLS = 16  # calls per captured graph at least (a replay's launch spread over them)


def _capture_calls(fn, copies: int, calls: int, op: str | None = None, backend: str | None = None):
    """(CUDAGraph of `calls` calls of fn, None) or (None, why not). `calls` is a multiple of `copies`: whole turns
    of fn's rotation, starting at its first copy. Warmed up first on a side stream (lazy set-up outside the
    capture, as torch's CUDA-graph docs do). op / backend (llmkern entries): captured in strict mode, and
    `OPS[op].last_backend` must still be `backend` afterwards."""
    guard = contextlib.nullcontext()
    if op is not None and backend is not None:
        from llmkern.ops import OPS, strict

        guard = strict()
    try:
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(copies):  # (a whole turn of the rotation: the capture starts at its first copy)
                fn()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        if op is not None and backend is not None:
            OPS[op].last_backend = None  # (set again by the captured calls)
        with guard, torch.cuda.graph(g):
            for _ in range(calls):
                fn()
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - any capture failure: time the call eagerly instead
        torch.cuda.synchronize()
        if "strict mode forbids" in str(e):  # (the backend falls back while captured: its eager time would lie too)
            pytest.fail(f"backend {backend!r} falls back under CUDA graph capture: {str(e).splitlines()[0][:200]}")
        return None, f"{type(e).__name__}: {str(e).strip().splitlines()[0][:120] if str(e).strip() else ''}"
    if op is not None and backend is not None and OPS[op].last_backend != backend:
        pytest.fail(f"the CUDA graph captured backend {OPS[op].last_backend!r}'s calls for backend {backend!r}")
    return g, None


@pytest.fixture
def bench(benchmark, limits, threads):
    return Bench(benchmark, limits, threads)
