"""Int4Linear (G 32, fp16-exact scales) at one row, hot (the same module called back to back), on the ISA
that LLMKERN_CPU_ISA pins, T threads, MODE w4a16 (default) / w4a8 / w4a8g: the AVX2 W4A16 rates in
docs/notes/cpu-avx2-int8pack.md.

    LLMKERN_CPU_ISA=avx2 T=1 PYTHONPATH=. python docs/notes/cpu-avx2-int8pack/int4_hot.py
"""
import os
import statistics
import time

import torch

from llmkern.nn import Int4Linear
torch.set_num_threads(int(os.environ.get("T", "1")))
def t(fn, n=300):
    for _ in range(30): fn()
    r = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n): fn()
        r.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(r)
torch.manual_seed(0)
for N, K in ((3072, 576), (576, 1536), (4096, 4096)):
    lin = torch.nn.Linear(K, N, bias=False); x = torch.randn(1, K)
    m = Int4Linear.from_linear(lin, group_size=32, mode=os.environ.get("MODE", "w4a16"))
    m.scales = m.scales.half().float(); m.offsets = m.offsets.half().float()
    m(x)
    us = t(lambda: m(x))
    print(os.environ.get("LLMKERN_CPU_ISA"), N, K, f"{us:.1f} us  {N*K/us/1e3:.2f} GMAC/s  packed={m._run.impl.packed is not None}")
