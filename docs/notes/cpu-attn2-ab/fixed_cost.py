"""Per-call fixed cost at tiny L: registered op, cpu adapter, the bare pybind call. usage: fixed_cost.py THREADS [L]"""
import sys, time, statistics, torch
torch.set_num_threads(int(sys.argv[1]))
import llmkern, llmkern._C as C, llmkern._backends as BK
from llmkern.ops.decode_attention import _cpu, _workspace
def t(fn, n=2000):
    for _ in range(200): fn()
    xs=[]
    for _ in range(n):
        a=time.perf_counter(); fn(); xs.append(time.perf_counter()-a)
    return statistics.median(xs)*1e6
L=int(sys.argv[2]) if len(sys.argv)>2 else 1
q=torch.randn(1,9,64); k=torch.randn(1,64,3,64); v=torch.randn(1,64,3,64); lens=torch.tensor([L],dtype=torch.int32)
out=torch.empty_like(q); th=torch.get_num_threads()
n,ws=_workspace(C,1,1,9,3,64,64,th)
isa=BK.cpu_isa()
args=(q.data_ptr(),0,[576,0,64],1,1,9,3,64,k.data_ptr(),v.data_ptr(),0,list(k.stride()[:3]),list(v.stride()[:3]),0,0,[],[],lens.data_ptr(),0,0,0,64,0.125,0.0,-1,out.data_ptr(),ws.data_ptr(),n,th,isa)
print(f"threads {th} L{L}: op {t(lambda: llmkern.ops.decode_attention(q,k,v,lens,backend='cpu')):.2f}  _cpu {t(lambda: _cpu(q,k,v,lens,None,None,None,None,0.0,-1)):.2f}  pybind call {t(lambda: C.decode_attention(*args)):.2f}  empty_like {t(lambda: torch.empty_like(q)):.2f} cpu_isa {t(BK.cpu_isa):.2f} get_num_threads {t(torch.get_num_threads):.2f}")
