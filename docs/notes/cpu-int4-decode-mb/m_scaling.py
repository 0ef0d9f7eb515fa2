"""W4A16 decode kernel time against rows M (and W4A8g beside it), weights in cache, raw launches.

    PYTHONPATH=. python docs/notes/cpu-int4-decode-mb/m_scaling.py [THREADS]

pk = the packed decode layout (fp16 scales), cn = the canonical tensors; us per call, medians.
"""
import time, torch, statistics, importlib, sys
I=importlib.import_module("llmkern.ops.int4_linear")
mod=I._backends.cpu_module(); isa=I._backends.cpu_isa()
th=int(sys.argv[1]) if len(sys.argv)>1 else 1
def T(f,n=300):
    for _ in range(30): f()
    ts=[]
    for r in range(7):
        t=time.perf_counter()
        for _ in range(n): f()
        ts.append((time.perf_counter()-t)/n*1e6)
    return statistics.median(ts)
G=32
for N,K in [(3072,576), (384,576)]:  # SmolLM2 gate+up fused; a slice that fits L2
    g=torch.Generator().manual_seed(0)
    qw=torch.randint(0,256,(N,K//2),dtype=torch.uint8,generator=g)
    s=(torch.rand(N,K//G,generator=g)*0.02+0.002).half().float(); o=(-8*s).half().float()
    row=[f"{N}x{K}"]
    for pack in (True,False):
        fn=I._cpu_runner(qw,s,o,None,pack=pack)
        for M in (1,2,4,8):
            x=torch.randn(M,K).bfloat16(); out=torch.empty(M,N,dtype=torch.bfloat16)
            ws=torch.empty(fn.workspace_size(M,th),dtype=torch.uint8)
            c=fn.call(x,out,ws,th)  # the launch as a KernelCall (bound once: no per-call argument conversion)
            row.append(f"{'pk' if pack else 'cn'}M{M}={T(c):.1f}")
    w=I._cpu_w4a8_runner(qw,s,o,None,True)
    for M in (1,4):
        x=torch.randn(M,K).bfloat16()
        row.append(f"w4a8g M{M}={T(lambda: w(x)):.1f}")
    print(" ".join(row))
