"""Public llmkern.ops.decode_attention vs SDPA (the cache in its own layout), cold rotating copies,
interleaved rounds of calls, medians. usage: PYTHONPATH=. python op_vs_sdpa.py B L [Hq,Hk,D] [dtype]"""
import time, torch, llmkern, sys, itertools, statistics
import torch.nn.functional as F
from llmkern.ops import decode_attention
torch.set_num_threads(2)
B=int(sys.argv[1]); L=int(sys.argv[2]); Hq,Hk,D=[int(x) for x in (sys.argv[3] if len(sys.argv)>3 else "9,3,64").split(",")]
dt=getattr(torch, sys.argv[4] if len(sys.argv)>4 else "float32")
q=torch.randn(B,Hq,D).to(dt); lens=torch.full((B,),L,dtype=torch.int32)
n=max(2,int(130e6/(B*L*Hk*D*8)))
sets=[(torch.randn(B,L,Hk,D).to(dt),torch.randn(B,L,Hk,D).to(dt)) for _ in range(n)]
ssets=[(k.transpose(1,2).contiguous(),v.transpose(1,2).contiguous()) for k,v in sets]
nx=itertools.cycle(sets).__next__; sn=itertools.cycle(ssets).__next__
q4=q[:,:,None]
fo=lambda: decode_attention(q,*nx(),lens,backend="cpu")
fs=lambda: F.scaled_dot_product_attention(q4,*sn(),enable_gqa=Hq!=Hk)
ro=[]; rs=[]
reps=max(5,int(4000/(B*L/512)))
for r in range(21):
    for f,res in ((fo,ro),(fs,rs)):
        for _ in range(5): f()
        t0=time.perf_counter()
        for _ in range(reps): f()
        res.append((time.perf_counter()-t0)/reps*1e6)
a,b=statistics.median(ro),statistics.median(rs)
print(f"B{B} L{L} H{Hq}/{Hk}/{D} {dt}: op {a:.1f} us, SDPA {b:.1f} us, ratio {b/a:.2f}")
