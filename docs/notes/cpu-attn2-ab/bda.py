"""Decode attention through llmkern.ops.decode_attention (op) and its cpu adapter (direct) vs SDPA, cold caches (docs/notes/cpu-attn2.md)."""
import sys, time, itertools, statistics, torch, torch.nn.functional as F
torch.set_num_threads(2)
from llmkern.ops import decode_attention
from llmkern.ops.decode_attention import _cpu
def med(fn, n=200):
    for _ in range(10): fn()
    ts=[]
    for _ in range(n):
        t=time.perf_counter(); fn(); ts.append(time.perf_counter()-t)
    return statistics.median(ts)*1e6
cases=[(1,1024,9,3,64),(8,1024,9,3,64),(1,4096,32,8,128),(1,8192,32,8,128),(8,512,32,8,128),(1,512,9,3,64)]
if len(sys.argv)>1: cases=[cases[int(i)] for i in sys.argv[1].split(',')]
for B,L,Hq,Hk,D in cases:
    q=torch.randn(B,Hq,D)
    nb=B*L*Hk*D*4*2
    ncop=max(1,min(64,-(-2*32*2**20//nb)))
    kv=[(torch.randn(B,L,Hk,D),torch.randn(B,L,Hk,D)) for _ in range(ncop)]
    kvs=[(k.transpose(1,2).contiguous(),v.transpose(1,2).contiguous()) for k,v in kv]
    nb8=B*L*Hk*(D+4)*2  # int8 values + fp32 scales: their own copy count, so int8 reads are cold too
    ncop8=max(1,min(256,-(-2*32*2**20//nb8)))
    kq=[(torch.randint(-127,127,(B,L,Hk,D),dtype=torch.int8),torch.randint(-127,127,(B,L,Hk,D),dtype=torch.int8),torch.rand(B,L,Hk),torch.rand(B,L,Hk)) for _ in range(ncop8)]
    lens=torch.full((B,),L,dtype=torch.int32)
    c1=itertools.cycle(kv); c2=itertools.cycle(kvs); c3=itertools.cycle(kq)
    q4=q[:,:,None]
    r={}
    r['op']=med(lambda: decode_attention(q,*next(c1),lens,backend='cpu'))
    r['direct']=med(lambda: _cpu(q,*next(c1),lens,None,None,None,None,0.0,-1))
    r['int8']=med(lambda: (lambda a: decode_attention(q,a[0],a[1],lens,k_scale=a[2],v_scale=a[3],backend='cpu'))(next(c3)))
    r['sdpa']=med(lambda: F.scaled_dot_product_attention(q4,*next(c2),enable_gqa=True))
    gb=nb/ (r['direct']*1e-6)/1e9
    print(f"B{B} L{L} {Hq}/{Hk} D{D}: "+"  ".join(f"{k} {v:.1f}" for k,v in r.items())+f"  x_sdpa(op) {r['sdpa']/r['op']:.2f}  direct GB/s {gb:.1f}", flush=True)
