"""kv_cache_append through the registered op (as the bench calls it) vs eager; run with PYTHONPATH=<tree>."""
import sys, time, statistics, torch
torch.set_num_threads(2)
from llmkern.ops import kv_cache_append, rotary_cos_sin
def rope(x, cs):
    half = x.shape[-1] // 2
    c, s = cs[..., :half][..., None, :], cs[..., half:][..., None, :]
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * c - b * s, b * c + a * s], -1).to(x.dtype)
N=400
def med(fn):
    for _ in range(20): fn()
    ts=[]
    for _ in range(N):
        t=time.perf_counter(); fn(); ts.append(time.perf_counter()-t)
    return statistics.median(ts)*1e6, min(ts)*1e6
for (B,S,Hk,Hq,D,Smax) in [(8,1,3,9,64,1024),(1,512,3,9,64,1024),(8,1,8,32,128,1024)]:
  for dt in (torch.float32, torch.bfloat16):
    k=torch.randn(B,S,Hk,D).to(dt); v=torch.randn(B,S,Hk,D).to(dt); q=torch.randn(B,S,Hq,D).to(dt)
    kc=torch.zeros(B,Smax,Hk,D,dtype=dt); vc=torch.zeros(B,Smax,Hk,D,dtype=dt)
    pos=(torch.arange(S)[None]+100).expand(B,S).contiguous()
    slots=(torch.arange(B)[:,None]*Smax+pos).contiguous(); flat=slots.flatten()
    cs=rotary_cos_sin(Smax, D, base=10000.0)
    r={}
    r['float']=med(lambda: kv_cache_append(k,v,kc,vc,slots,backend='cpu'))
    r['eager.float']=med(lambda: (kc.view(-1,Hk,D).index_copy_(0,flat,k.reshape(-1,Hk,D)), vc.view(-1,Hk,D).index_copy_(0,flat,v.reshape(-1,Hk,D))))
    r['rotary']=med(lambda: kv_cache_append(k,v,kc,vc,slots,q=q,positions=pos,cos_sin_cache=cs,backend='cpu'))
    def eag():
        rows=cs[pos]
        q.copy_(rope(q,rows))
        kc.view(-1,Hk,D).index_copy_(0,flat,rope(k,rows).reshape(-1,Hk,D)); vc.view(-1,Hk,D).index_copy_(0,flat,v.reshape(-1,Hk,D))
    r['eager.rotary']=med(eag)
    print(f"B{B} S{S} Hk{Hk} D{D} {str(dt)[6:]}: "+"  ".join(f"{a} {m:.1f}/{n:.1f}" for a,(m,n) in r.items()), flush=True)
