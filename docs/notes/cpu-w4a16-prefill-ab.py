"""Int4Linear W4A16 prefill (bf16 x) against F.linear bf16 on the dequantized weights, alternated call by
call (R rounds of 5 timed calls each, medians), weights hot: the ratio the README's W4A16 prefill row cites.

    PYTHONPATH=. python docs/notes/cpu-w4a16-prefill-ab.py 4096 4096 [R]
"""
import time, torch, sys
import torch.nn.functional as F
from llmkern.nn import Int4Linear
torch.set_num_threads(2)
def t(fn,n=5):
    fn()
    ts=[]
    for r in range(n):
        t0=time.perf_counter(); fn(); ts.append(time.perf_counter()-t0)
    ts.sort(); return ts[len(ts)//2]*1e3
N,K=int(sys.argv[1]),int(sys.argv[2]); R=int(sys.argv[3]) if len(sys.argv)>3 else 7
torch.manual_seed(0)
lin=torch.nn.Linear(K,N,bias=False)
m=Int4Linear.from_linear(lin)
for M in (128,512):
    x=torch.randn(M,K).bfloat16(); m(x)
    w=lin.weight.detach().bfloat16()
    a,b=[],[]
    for i in range(R):
        a.append(t(lambda: m(x))); b.append(t(lambda: F.linear(x,w)))
    a.sort(); b.sort(); h=R//2
    fl=2*M*N*K
    print(f"{N}x{K} M={M}: int4 w4a16 {a[h]:.2f} ms ({fl/a[h]/1e6:.0f} GFLOP/s)  F.linear bf16 {b[h]:.2f} ms ({fl/b[h]/1e6:.0f})  ratio {b[h]/a[h]:.3f}  [all int4 {' '.join(f'{v:.2f}' for v in a)}] [F {' '.join(f'{v:.2f}' for v in b)}]")
