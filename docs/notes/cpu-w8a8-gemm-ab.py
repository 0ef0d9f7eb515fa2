"""Interleaved A/B of int8_linear W8A8 prefill on the CPU: old (canonical tiles, the preparer's runner
before the GEMM layout) vs new (GEMM layout), call by call in one process, medians; F.linear bf16 and
the eager torch._int_mm W8A8 pipeline as peers in the same loop.

usage: PYTHONPATH=. python docs/notes/cpu-w8a8-gemm-ab.py [threads] [reps] [shapes: NxK,...] [rows: M,...] [G]
"""
import importlib
import statistics
import sys
import time

import torch
import torch.nn.functional as F

I8 = importlib.import_module("llmkern.ops.int8_linear")

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
reps = int(sys.argv[2]) if len(sys.argv) > 2 else 9
shapes = [tuple(map(int, s.split("x"))) for s in (sys.argv[3] if len(sys.argv) > 3 else "4096x4096,11008x4096").split(",")]
rows = [int(m) for m in (sys.argv[4] if len(sys.argv) > 4 else "16,128,512").split(",")]
G = int(sys.argv[5]) if len(sys.argv) > 5 else 0
torch.set_num_threads(threads)
print(f"threads={threads} reps={reps} G={G or 'channel'} x=bf16; median ms (GOP/s)")
g = torch.Generator().manual_seed(0)
for N, K in shapes:
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    s = torch.rand(N, K // G if G else 1, generator=g) * 0.02 + 0.002
    s = s if G else s[:, 0].contiguous()
    old = I8._cpu_runner(w, s, None, "w8a8", pack=True)
    new = I8._cpu_runner(w, s, None, "w8a8", pack=True, gemm=True)
    wf = (w.float() * (s if G == 0 else s.repeat_interleave(G, 1))[:, None] if G == 0 else
          w.float() * s.repeat_interleave(G, 1)).to(torch.bfloat16)

    def int_mm(x):
        xf = x.float()
        sx = xf.abs().amax(dim=-1, keepdim=True) / 127.0
        xq = torch.round(xf / sx).clamp_(-127, 127).to(torch.int8)
        return (torch._int_mm(xq, w.t()).float() * sx * s).to(x.dtype)

    impls = {"old": old, "new": new, "F.linear": lambda x: F.linear(x, wf)}
    if G == 0:
        impls["_int_mm"] = int_mm
    for M in rows:
        x = torch.randn(M, K, generator=g).to(torch.bfloat16)
        for f in impls.values():
            f(x)
        t = {k: [] for k in impls}
        for _ in range(reps):
            for k, f in impls.items():
                t0 = time.perf_counter()
                f(x)
                t[k].append(time.perf_counter() - t0)
        flop = 2.0 * M * N * K
        med = {k: statistics.median(v) for k, v in t.items()}
        cols = "  ".join(f"{k} {1e3 * v:8.3f} ({flop / v / 1e9:5.0f})" for k, v in med.items())
        print(f"N={N:5d} K={K} M={M:4d}  {cols}  new/old speedup {med['old'] / med['new']:.2f}x  "
              f"vs F.linear {med['F.linear'] / med['new']:.2f}x", flush=True)
