"""Cold Int4Linear / Int8Linear module and op calls at M = 1: C copies of the layer called in turn (as a
model's layers are: each call finds the last call's Python objects evicted), medians of 7 x 2000 calls.
Run it alternately with two trees for an A/B (the numbers of docs/notes/cpu-op-overhead.md, "Bound runs"):

    PYTHONPATH=TREE python docs/notes/cpu-op-overhead/module_cold_ab.py N K {bfloat16,float32} C
"""
import time, torch, itertools, sys
from llmkern.nn import Int4Linear, Int8Linear
import llmkern
torch.set_num_threads(2)
def t(fn,n=2000):
    for _ in range(200): fn()
    ts=[]
    for r in range(7):
        t0=time.perf_counter()
        for _ in range(n): fn()
        ts.append((time.perf_counter()-t0)/n*1e6)
    ts.sort(); return ts[len(ts)//2]
N,K,dt=int(sys.argv[1]),int(sys.argv[2]),getattr(torch,sys.argv[3]); C=int(sys.argv[4])
torch.manual_seed(0)
lin=torch.nn.Linear(K,N,bias=False)
x=torch.randn(1,K).to(dt)
res={}
for name,cls in (("int4",Int4Linear),("int8",Int8Linear)):
    ms=[cls.from_linear(lin) for _ in range(C)]
    for m in ms: m(x)
    c=itertools.cycle(ms).__next__
    res[name+".module"]=t(lambda: c()(x))
    args=[(m.qweight,m.scales,m.offsets) if name=="int4" else (m.weight,m.weight_scale) for m in ms]
    ca=itertools.cycle(args).__next__
    f=llmkern.ops.int4_linear if name=="int4" else llmkern.ops.int8_linear
    res[name+".op"]=t(lambda: f(x,*ca()))
print(" ".join(f"{k}={v:.2f}" for k,v in res.items()))
