"""A/B: int4 calls of 2..16 rows with and without the rows16 layout (`_cpu_runner` rows16 off / on, the
same packed M = 1 layout in both), weights in cache, interleaved, medians (docs/notes/cpu-int4-decode-compute.md).

    PYTHONPATH=. python docs/notes/cpu-int4-decode-mb/rows16_ab.py THREADS [fp32]
"""
import time, torch, statistics, sys
from llmkern.ops.int4_linear import _cpu_runner
th=int(sys.argv[1]); torch.set_num_threads(th)
G=32
DT=torch.float32 if len(sys.argv)>2 and sys.argv[2]=="fp32" else torch.bfloat16
for N,K in [(3072,576),(576,1536),(4096,4096)]:
    g=torch.Generator().manual_seed(0)
    qw=torch.randint(0,256,(N,K//2),dtype=torch.uint8,generator=g)
    s=(torch.rand(N,K//G,generator=g)*0.02+0.002).half().float(); o=(-8*s).half().float()
    a=_cpu_runner(qw,s,o,None,pack=True); b=_cpu_runner(qw,s,o,None,pack=True,rows16=True)
    row=[f"{N}x{K}"]
    for M in (2,4,8,16):
        x=torch.randn(M,K).to(DT)
        ts={0:[],1:[]}
        for r in range(40):
            for i,f in ((0,a),(1,b)):
                t=time.perf_counter(); f(x); ts[i].append(time.perf_counter()-t)
        ma,mb=statistics.median(ts[0])*1e6,statistics.median(ts[1])*1e6
        row.append(f"M{M}: {ma:.0f}->{mb:.0f}us ({ma/mb:.2f}x)")
    print(" ".join(row))
