"""A/B: one-row (M = 1) int4 calls, cold weights (rotated past 256 MB), the packed lane = k layout against
rows16 (kMinRows = 1 in csrc/include/llmkern/cpu/int4_linear_rows16.h since session 6; it was 2 when this
was first run, with a local rebuild); interleaved, medians.

    PYTHONPATH=. python docs/notes/cpu-int4-decode-mb/m1_cold_ab.py
"""
import time, torch, statistics, sys
from llmkern.ops.int4_linear import _cpu_runner
torch.set_num_threads(2)
G=32
for N,K in [(576,576),(1536,576),(576,1536),(4096,4096),(11008,4096)]:
    nb=N*K//2+N*K//G*4; n=max(2,int(256e6//nb)+1)
    sets=[]
    g=torch.Generator().manual_seed(0)
    for i in range(n):
        qw=torch.randint(0,256,(N,K//2),dtype=torch.uint8,generator=g)
        s=(torch.rand(N,K//G,generator=g)*0.02+0.002).half().float(); o=(-8*s).half().float()
        a=_cpu_runner(qw,s,o,None,pack=True); b=_cpu_runner(qw,s,o,None,pack=False,rows16=True)
        sets.append((a,b))
    for dt in (torch.float32, torch.bfloat16):
        x=torch.randn(1,K).to(dt); x2=torch.randn(2,K).to(dt)
        for a,b in sets: b(x2)  # pack rows16
        ts={0:[],1:[]}
        for r in range(max(6,int(2000/n))):
            for i in (0,1):
                t=time.perf_counter()
                for pair in sets: pair[i](x)
                ts[i].append((time.perf_counter()-t)/n)
        ma,mb=statistics.median(ts[0])*1e6,statistics.median(ts[1])*1e6
        print(f"{N}x{K} {str(dt)[6:]} M=1 cold: packed {ma:.1f} us, rows16 {mb:.1f} us ({ma/mb:.2f}x)")
    del sets
