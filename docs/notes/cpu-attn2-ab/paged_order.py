"""Contiguous vs the same cache as a paged pool (block 16) with an identity and a shuffled block table, SmolLM2 L1024. usage: paged_order.py THREADS B"""
import sys, time, statistics, itertools, torch
torch.set_num_threads(int(sys.argv[1]))
from llmkern.ops.decode_attention import _cpu
B,L,Hk,D=int(sys.argv[2]),1024,3,64
q=torch.randn(B,9,D); lens=torch.full((B,),L,dtype=torch.int32)
nb=B*L*Hk*D*8; nc=max(1,min(256,-(-64*2**20//nb)))
nbk=L//16
def med(fn,n=150):
    for _ in range(10): fn()
    xs=[]
    for _ in range(n):
        t=time.perf_counter(); fn(); xs.append(time.perf_counter()-t)
    return statistics.median(xs)*1e6
kv=[(torch.randn(B,L,Hk,D),torch.randn(B,L,Hk,D)) for _ in range(nc)]
ident=torch.arange(B*nbk,dtype=torch.int32).view(B,nbk)
rnd=torch.randperm(B*nbk).to(torch.int32).view(B,nbk)
pk=[(k.view(B*nbk,16,Hk,D),v.view(B*nbk,16,Hk,D)) for k,v in kv]
res={}
for rep in range(3):
    c=itertools.cycle(kv); res.setdefault('contig',[]).append(med(lambda: _cpu(q,*next(c),lens,None,None,None,None,0.0,-1)))
    c=itertools.cycle(pk); res.setdefault('paged identity',[]).append(med(lambda: _cpu(q,*next(c),lens,ident,None,None,None,0.0,-1)))
    c=itertools.cycle(pk); res.setdefault('paged random',[]).append(med(lambda: _cpu(q,*next(c),lens,rnd,None,None,None,0.0,-1)))
for k,v in res.items(): print(f"th{sys.argv[1]} B{B} {k}: " + " ".join(f"{x:.1f}" for x in v))
