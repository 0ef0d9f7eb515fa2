"""int8_linear's prepared CPU run with and without the packed decode layout, on the ISA that
LLMKERN_CPU_ISA pins, cold (a call cycles through copies of the weights that together exceed 4x
the last-level cache, as a model's layers do) and hot (one copy, back to back). Interleaved rounds.

    LLMKERN_CPU_ISA=avx2 T=2 PYTHONPATH=. python docs/notes/cpu-avx2-int8pack/packed_vs_canonical.py [rows ...]
"""
import importlib
import os
import statistics
import sys
import time

import torch


I8 = importlib.import_module("llmkern.ops.int8_linear")
torch.set_num_threads(int(os.environ.get("T", "2")))
ROWS = [int(v) for v in sys.argv[1:]] or [1]
LLC = 32 << 20


def timed(fn, n):
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def runners(N, K, G, mode, copies, pack):
    g = torch.Generator().manual_seed(N + K + G)
    out = []
    for _ in range(copies):
        w = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
        s = (torch.rand(N, K // G if G else 1, generator=g) * 0.02 + 1e-3).half().float()
        s = s[:, 0].contiguous() if not G else s
        out.append(I8._cpu_runner(w, s, None, mode, pack=pack))
    return out


CASES = [  # (name, N, K, G)
    ("SmolLM2 lm_head Q8_0", 49152, 576, 32),
    ("SmolLM2 gate+up", 3072, 576, 0),
    ("SmolLM2 q", 576, 576, 0),
    ("SmolLM2 down G32", 576, 1536, 32),
    ("Llama 4096x4096", 4096, 4096, 0),
    ("Llama 4096x4096 G32", 4096, 4096, 32),
    ("Llama 4096x4096 G128", 4096, 4096, 128),
]
print(f"isa={os.environ.get('LLMKERN_CPU_ISA', 'auto')} threads={torch.get_num_threads()}  median us of 5 rounds, cold")
for mode in ("w8a16", "w8a8"):
    for name, N, K, G in CASES:
        copies = max(1, -(-4 * LLC // (N * K)))
        rs = {p: runners(N, K, G, mode, copies, p) for p in (False, True)}
        for M in ROWS:
            x = torch.randn(M, K)
            res = {False: [], True: []}
            for _ in range(5):
                for p in (False, True):
                    it = iter(rs[p] * 1000)
                    n = max(20, 3 * copies)
                    for _ in range(copies):
                        next(it)(x)
                    res[p].append(timed(lambda: next(it)(x), n))
            a, b = statistics.median(res[False]), statistics.median(res[True])
            gbs = N * K / b / 1e3
            print(f"{mode:6s} {name:22s} M={M}  canonical {a:8.1f}  packed {b:8.1f}  {a / b:5.2f}x  ({gbs:.1f} GB/s packed)")
