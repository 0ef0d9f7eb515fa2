"""A/B timing of int4_linear W4A8 / W4A8g / W4A16 prepared runners and F.linear bf16 (docs/notes/cpu-w4a8.md).

    PYTHONPATH=. python docs/notes/cpu-w4a8-ab.py THREADS M1,M2,...

Interleaved calls, medians; weights warm in cache between calls (not the cold-weight benchmark).
"""
import sys, time, torch
from llmkern.ops.int4_linear import _cpu_w4a8_runner, _cpu_prepare
import torch.nn.functional as F
torch.set_num_threads(int(sys.argv[1]))
shapes = [(4096,4096),(1536,576),(576,1536)]
Ms = [int(m) for m in sys.argv[2].split(',')]
gen = torch.Generator().manual_seed(0)
for N,K in shapes:
    G=32
    qw = torch.randint(0,256,(N,K//2),dtype=torch.uint8,generator=gen)
    s = (torch.rand(N,K//G,generator=gen)*0.02+1e-3).half().float()
    o = (-8*s).half().float()
    r8 = _cpu_w4a8_runner(qw,s,o,None); r8g = _cpu_w4a8_runner(qw,s,o,None,True); r16 = _cpu_prepare(qw,s,o,None,"w4a16")
    wb = torch.randn(N,K).bfloat16()
    for M in Ms:
        x = torch.randn(M,K).bfloat16()
        fs = {"w4a8": lambda: r8(x), "w4a8g": lambda: r8g(x), "w4a16": lambda: r16(x), "F.linear bf16": lambda: F.linear(x, wb)}
        ts = {k: [] for k in fs}
        reps = max(3, int(2e8/(M*N*K+1e6)))
        for k,f in fs.items(): f()
        for rep in range(reps):
            for k,f in fs.items():
                t0=time.perf_counter(); f(); ts[k].append(time.perf_counter()-t0)
        med = {k: sorted(v)[len(v)//2]*1e6 for k,v in ts.items()}
        print(f"{N}x{K} M={M}: " + "  ".join(f"{k} {v:.0f}us ({2*M*N*K/v/1e3:.0f} GF/s)" for k,v in med.items()), flush=True)
