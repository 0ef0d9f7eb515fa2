"""Int4Linear prefill (fp32 x, G 32) hot, T threads, on the ISA LLMKERN_CPU_ISA pins: GFLOP/s beside F.linear fp32.

    LLMKERN_CPU_ISA=avx2 T=2 PYTHONPATH=. python docs/notes/cpu-avx2-int8pack/int4_prefill.py
"""
import os
import statistics
import time

import torch
from llmkern.nn import Int4Linear
torch.set_num_threads(int(os.environ.get("T", "1")))
def t(fn, n=5):
    fn()
    r = []
    for _ in range(n):
        t0 = time.perf_counter(); fn(); r.append(time.perf_counter() - t0)
    return statistics.median(r)
torch.manual_seed(0)
for N, K, M in ((3072, 576, 512), (576, 1536, 512), (4096, 4096, 128)):
    lin = torch.nn.Linear(K, N, bias=False); x = torch.randn(M, K)
    m = Int4Linear.from_linear(lin, group_size=32)
    s = t(lambda: m(x))
    fl = torch.nn.functional.linear
    sf = t(lambda: fl(x, lin.weight))
    print(os.environ.get("LLMKERN_CPU_ISA"), N, K, M, f"{s*1e3:.2f} ms  {2*N*K*M/s/1e9:.0f} GFLOP/s   F.linear fp32 {2*N*K*M/sf/1e9:.0f} GFLOP/s")
