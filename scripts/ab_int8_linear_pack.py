"""A/B: int8_linear's canonical CPU run vs the packed decode layout (the cpu preparer's), interleaved,
next to the memory read rate measured in the same process (`llmkern._C.read_sum`).

Not a pytest benchmark: a quick same-process comparison for kernel work on a noisy machine.
Each variant's weights rotate through copies totalling > ROT_MB (default 256 MB, 8x the 32 MB L3) so
every call reads them from DRAM ("cold weights"); variants alternate call by call (order flipped every
call), each call timed; medians. The read rate is the median of `read_sum` over a 256 MB buffer at the
same thread count, timed between the kernel calls of every entry. Usage:
  PYTHONPATH=. python scripts/ab_int8_linear_pack.py --threads 1 [--reps 15] [--shapes 576x576,...]
      [--modes w8a16,w8a8] [--dtypes fp32,bf16] [--groups 32,0] [--scales f16,f32] [--M 1]
G = 0 is per-channel scales ([N]). "f16" scales are fp16 values (GGUF Q8_0: packed with fp16 scales),
"f32" scales are not. `canon` is `_cpu_runner(..., pack=False)` (the op's path), `packed` the preparer's
runner (Int8Linear's prepared call); without a packed layout (the base build) only `canon` runs.
"""
from __future__ import annotations

import argparse
import inspect
import statistics
import time

import torch

import llmkern._C as C
import importlib

I8 = importlib.import_module("llmkern.ops.int8_linear")

SHAPES = ["576x576", "192x576", "960x576", "3072x576", "576x1536", "49152x576", "4096x4096"]  # N x K
HAS_PACK = "pack" in inspect.signature(I8._cpu_runner).parameters


def make(N, K, G, f16, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    s = torch.rand(N, K // G if G else 1, generator=g) * 0.02 + 1e-3
    if f16:
        s = s.half().float()
    return w, (s[:, 0].contiguous() if not G else s)


def runner(kind, w, s, mode):
    if not HAS_PACK:
        return I8._cpu_runner(w, s, None, mode)
    if kind == "canon":
        return I8._cpu_runner(w, s, None, mode, pack=False)
    return I8.int8_linear_op.preparers["cpu"](w, s, None, mode)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--M", type=int, default=1)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--modes", default="w8a16,w8a8")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--groups", default="32,0")
    ap.add_argument("--scales", default="f16")
    ap.add_argument("--rot-mb", type=float, default=256)
    ap.add_argument("--variants", default="canon,packed" if HAS_PACK else "canon")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dts = {"bf16": torch.bfloat16, "fp32": torch.float32}
    variants = a.variants.split(",")
    buf = torch.ones(64 << 20)  # 256 MB of fp32 for the read-rate probe
    isa = C.resolve_isa("")

    def read_rate():
        t0 = time.perf_counter()
        C.read_sum(buf.data_ptr(), buf.numel(), a.threads, isa)
        return buf.numel() * 4 / (time.perf_counter() - t0) / 1e9

    print(f"threads={a.threads} M={a.M} reps={a.reps} rot>{a.rot_mb:.0f}MB isa={isa} has_pack={HAS_PACK}")
    cols = "".join(f" {v + ' us':>10} {v + ' GB/s':>11} {'%read':>6}" for v in variants)
    print(f"{'N x K':>10} {'mode':>5} {'G':>4} {'sc':>3} {'x':>4} {'read':>5}{cols}" + (" speedup" if len(variants) == 2 else ""))
    rates = []
    for shp in a.shapes.split(","):
        N, K = map(int, shp.split("x"))
        for G in map(int, a.groups.split(",")):
            for sc in a.scales.split(","):
                w, s = make(N, K, G, sc == "f16", N + K + G)
                canon_bytes = N * K + 4 * s.numel()
                n = max(2, int(a.rot_mb * 2**20 // canon_bytes) + 1)
                sets = [(w, s)] + [(w.clone(), s.clone()) for _ in range(n - 1)]
                for mode in a.modes.split(","):
                    runs = {v: [runner(v, *t, mode) for t in sets] for v in variants}
                    nbytes = {v: (getattr(runs[v][0], "packed", None).numel()
                                  if getattr(runs[v][0], "packed", None) is not None else canon_bytes)
                              for v in variants}
                    for dn in a.dtypes.split(","):
                        x = torch.randn(a.M, K).to(dts[dn])
                        outs = [runs[v][0](x) for v in variants]
                        for o in outs[1:]:
                            assert torch.equal(o, outs[0]), "packed != canonical"
                        times = {v: [] for v in variants}
                        rr = []
                        for r in range(a.reps):
                            rr.append(read_rate())
                            for c in range(n):
                                order = variants if (r * n + c) % 2 == 0 else variants[::-1]
                                for v in order:
                                    f = runs[v][c]
                                    t0 = time.perf_counter()
                                    f(x)
                                    times[v].append(time.perf_counter() - t0)
                        rate = statistics.median(rr)
                        rates.append(rate)
                        line = f"{shp:>10} {mode:>5} {G if G else 'ch':>4} {sc:>3} {dn:>4} {rate:5.1f}"
                        meds = {}
                        for v in variants:
                            m = meds[v] = statistics.median(times[v])
                            gbs = nbytes[v] / m / 1e9
                            line += f" {m * 1e6:10.1f} {gbs:11.1f} {100 * gbs / rate:5.0f}%"
                        if len(variants) == 2:
                            line += f" {meds[variants[0]] / meds[variants[1]]:7.2f}"
                        print(line, flush=True)
                    del runs
                del sets
    print(f"read rate (GB/s, {a.threads} thread(s)): median {statistics.median(rates):.1f}, "
          f"min {min(rates):.1f}, max {max(rates):.1f}")


if __name__ == "__main__":
    main()
