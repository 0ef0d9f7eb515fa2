"""A/B of the decode_attention cpu adapter with the baseline _C (/tmp/ca2/base) vs the worktree _C, same process,
interleaved calls, cold caches (rotating copies > 2x L3)."""
import sys, time, itertools, statistics, importlib.util, torch, torch.nn.functional as F
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
import llmkern._backends as BK
from llmkern.ops.decode_attention import _cpu
spec = importlib.util.spec_from_file_location("ca2base._C", [p for p in __import__('glob').glob(__import__('os').environ.get('BASE','/tmp/ca2/base')+'/llmkern/_C*.so')][0])
base = importlib.util.module_from_spec(spec); spec.loader.exec_module(base)
new = BK.cpu_module()
orig = BK.cpu_module
def with_mod(mod, fn):
    BK.cpu_module = lambda: mod
    try: return fn()
    finally: BK.cpu_module = orig
cases=[(1,1024,9,3,64),(8,1024,9,3,64),(1,4096,32,8,128),(1,8192,32,8,128),(8,512,32,8,128),(1,512,9,3,64)]
if len(sys.argv)>1 and sys.argv[1] != 'all': cases=[cases[int(i)] for i in sys.argv[1].split(',')]
N=int(__import__('os').environ.get('N', 150))
for B,L,Hq,Hk,D in cases:
    q=torch.randn(B,Hq,D)
    nb=B*L*Hk*D*4*2
    ncop=max(1,min(64,-(-2*32*2**20//nb)))
    kv=[(torch.randn(B,L,Hk,D),torch.randn(B,L,Hk,D)) for _ in range(ncop)]
    kvs=[(k.transpose(1,2).contiguous(),v.transpose(1,2).contiguous()) for k,v in kv]
    nb8=B*L*Hk*(D+4)*2  # int8 values + fp32 scales: their own copy count, so int8 reads are cold too
    ncop8=max(1,min(256,-(-2*32*2**20//nb8)))
    kq=[(torch.randint(-127,127,(B,L,Hk,D),dtype=torch.int8),torch.randint(-127,127,(B,L,Hk,D),dtype=torch.int8),torch.rand(B,L,Hk),torch.rand(B,L,Hk)) for _ in range(ncop8)]
    nbk=L//16
    tbl=torch.randperm(B*nbk).to(torch.int32).view(B,nbk)
    kvp=[]
    for k,v in kv:
        pk=torch.empty(B*nbk,16,Hk,D); pv=torch.empty(B*nbk,16,Hk,D)
        pk[tbl.flatten().long()]=k.reshape(B*nbk,16,Hk,D); pv[tbl.flatten().long()]=v.reshape(B*nbk,16,Hk,D)
        kvp.append((pk,pv))
    lens=torch.full((B,),L,dtype=torch.int32)
    c1=itertools.cycle(kv); c2=itertools.cycle(kvs); c3=itertools.cycle(kq); c4=itertools.cycle(kvp)
    q4=q[:,:,None]
    fns={
      'fp32': lambda: _cpu(q,*next(c1),lens,None,None,None,None,0.0,-1),
      'paged': lambda: _cpu(q,*next(c4),lens,tbl,None,None,None,0.0,-1),
      'int8': lambda: (lambda a: _cpu(q,a[0],a[1],lens,None,a[2],a[3],None,0.0,-1))(next(c3)),
    }
    # correctness old vs new
    k0,v0=kv[0]
    o_old=with_mod(base, lambda: _cpu(q,k0,v0,lens,None,None,None,None,0.0,-1)); o_new=_cpu(q,k0,v0,lens,None,None,None,None,0.0,-1)
    assert (o_old-o_new).abs().max() < 1e-4, (o_old-o_new).abs().max()
    sd=lambda: F.scaled_dot_product_attention(q4,*next(c2),enable_gqa=True)
    res={}
    for name,fn in fns.items():
        to,tn,ts=[],[],[]
        for i in range(N+10):
            t=time.perf_counter(); with_mod(base, fn); a=time.perf_counter()-t
            t=time.perf_counter(); fn(); b_=time.perf_counter()-t
            if name=='fp32':
                t=time.perf_counter(); sd(); c=time.perf_counter()-t
                if i>=10: ts.append(c)
            if i>=10: to.append(a); tn.append(b_)
        res[name]=(statistics.median(to)*1e6, statistics.median(tn)*1e6, min(to)*1e6, min(tn)*1e6)
        if ts: res['sdpa']=(statistics.median(ts)*1e6, min(ts)*1e6)
    line=f"B{B} L{L} {Hq}/{Hk} D{D} [{nb/2**20:.1f} MiB fp32 KV]:"
    for k,v in res.items():
        if k=='sdpa': line+=f" | SDPA med {v[0]:.1f} min {v[1]:.1f}"
        else: line+=f" | {k} old/new med {v[0]:.1f}/{v[1]:.1f} min {v[2]:.1f}/{v[3]:.1f}"
    print(line, flush=True)
