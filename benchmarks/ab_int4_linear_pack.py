"""A/B: int4_linear's canonical prepared run vs the packed decode layout (the cpu preparer's), interleaved.

Not a pytest benchmark: a quick same-process comparison for kernel work on a noisy machine.
Weights of each variant rotate through copies totalling > ROT_MB (default 256 MB) so every call reads
them from DRAM; variants alternate call by call (order flipped every call), each call timed; medians. Usage:
  PYTHONPATH=. python benchmarks/ab_int4_linear_pack.py --threads 1 [--reps 30] [--shapes 576x576,...]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from llmkern.ops.int4_linear import _cpu_runner

SHAPES = ["576x576", "1536x576", "576x1536", "49152x576", "4096x4096"]  # N x K


def make(N, K, G, f16, seed):
    g = torch.Generator().manual_seed(seed)
    qw = torch.randint(0, 256, (N, K // 2), generator=g, dtype=torch.uint8)
    s = torch.rand(N, K // G, generator=g) * 0.02 + 1e-3
    o = -8 * s + torch.randn(N, K // G, generator=g) * 0.01
    if f16:  # GGUF Q4_0/Q4_1-like: d, m are fp16 values
        s, o = s.half().float(), o.half().float()
    return qw, s, o


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--M", type=int, default=1)
    ap.add_argument("--G", type=int, default=32)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--scales", default="f16,f32", help="f16: fp16-exact scales (packed E=2); f32: E=4")
    ap.add_argument("--rot-mb", type=float, default=256)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dts = {"bf16": torch.bfloat16, "fp32": torch.float32}
    print(f"threads={a.threads} M={a.M} G={a.G} reps={a.reps} rot>{a.rot_mb:.0f}MB")
    print(f"{'N x K':>10} {'x':>4} {'scales':>6} {'copies':>6} {'canon us':>9} {'packed us':>9} {'speedup':>8} "
          f"{'canon GB/s':>10} {'packed GB/s':>11}")
    for shp in a.shapes.split(","):
        N, K = map(int, shp.split("x"))
        for sc in a.scales.split(","):
            qw, s, o = make(N, K, a.G, sc == "f16", N + K)
            canon_bytes = N * K // 2 + 8 * N * (K // a.G)
            n = max(2, int(a.rot_mb * 2**20 // canon_bytes) + 1)
            sets = [(qw, s, o)] + [(qw.clone(), s.clone(), o.clone()) for _ in range(n - 1)]
            runs = {"canon": [_cpu_runner(*t, None, pack=False) for t in sets],
                    "packed": [_cpu_runner(*t, None) for t in sets]}
            pk_bytes = runs["packed"][0].packed.numel()
            del sets
            for dn in a.dtypes.split(","):
                x = torch.randn(a.M, K).to(dts[dn])
                ref = runs["canon"][0](x)
                assert torch.equal(ref, runs["packed"][0](x)), "packed != canonical"
                for v in runs.values():  # warm up (page faults, workspace)
                    for r in v:
                        r(x)
                times = {"canon": [], "packed": []}
                order = ["canon", "packed"]
                clock = time.perf_counter
                for rep in range(a.reps):  # call by call: both variants see the same machine load
                    for i in range(n):
                        for name in order:
                            r = runs[name][i]
                            t0 = clock()
                            r(x)
                            times[name].append(clock() - t0)
                        order.reverse()
                mc, mp = statistics.median(times["canon"]), statistics.median(times["packed"])
                print(f"{shp:>10} {dn:>4} {sc:>6} {n:>6} {mc*1e6:9.1f} {mp*1e6:9.1f} {mc/mp:8.3f} "
                      f"{canon_bytes/mc/1e9:10.2f} {pk_bytes/mp/1e9:11.2f}", flush=True)
            del runs


if __name__ == "__main__":
    main()
