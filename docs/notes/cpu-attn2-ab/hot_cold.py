"""Kernel through the cpu adapter on the same cache every call (hot: L2/L3) and on rotating copies (cold), and
torch.sum over the same bytes cold (the memory floor). usage: hot_cold.py THREADS"""
import sys, time, statistics, torch, itertools
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv)>1 else 1)
import llmkern._C as C
from llmkern.ops.decode_attention import _cpu
def t(fn, n=300):
    for _ in range(20): fn()
    xs=[]
    for _ in range(n):
        a=time.perf_counter(); fn(); xs.append(time.perf_counter()-a)
    return statistics.median(xs)*1e6
for L in (1,64,256,1024,4096):
    q=torch.randn(1,9,64); k=torch.randn(1,L,3,64); v=torch.randn(1,L,3,64); lens=torch.tensor([L],dtype=torch.int32)
    hot=t(lambda: _cpu(q,k,v,lens,None,None,None,None,0.0,-1))
    nb=L*3*64*8; nc=max(1,min(512,-(-64*2**20//nb)))
    kv=itertools.cycle([(torch.randn(1,L,3,64),torch.randn(1,L,3,64)) for _ in range(nc)])
    cold=t(lambda: _cpu(q,*next(kv),lens,None,None,None,None,0.0,-1))
    # memory read of the same bytes cold
    bufs=itertools.cycle([torch.randn(L*3*64*2) for _ in range(nc)])
    rs=t(lambda: next(bufs).sum())
    print(f"L{L}: hot {hot:.1f} cold {cold:.1f} us; torch sum of same bytes cold {rs:.1f} us; {nb/1e3:.0f} KB")
