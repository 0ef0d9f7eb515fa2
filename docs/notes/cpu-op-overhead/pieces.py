"""Per-call cost of each layer of a tiny decode_attention call (L = 8: the kernel is ~1 us), hot, 2 threads:
the public op, Op.dispatch, Op._run, the cpu adapter, the check, and the bare KernelCall.
usage: PYTHONPATH=. python pieces.py"""
import time, torch, llmkern, sys
M = sys.modules["llmkern.ops.decode_attention"]
op = M.decode_attention_op
torch.set_num_threads(2)
B,L,Hq,Hk,D=1,8,9,3,64
qs=torch.randn(B,Hq,D); ks=torch.randn(B,L,Hk,D); vs=torch.randn(B,L,Hk,D); ls=torch.full((B,),8,dtype=torch.int32)
def t(fn,n=5000):
    for _ in range(300): fn()
    ts=[]
    for r in range(7):
        t0=time.perf_counter()
        for _ in range(n): fn()
        ts.append((time.perf_counter()-t0)/n*1e6)
    ts.sort(); return round(ts[len(ts)//2],2)
a=(qs,ks,vs,ls,None,None,None,None,0.0,-1,"cpu")
print("op()", t(lambda: op(*a)))
print("dispatch()", t(lambda: op.dispatch(*a)))
print("_run", t(lambda: op._run(a[:-1], "cpu")))
print("_plan", t(lambda: op._plan("cpu","cpu")))
print("env_backend", t(lambda: llmkern._backends.env_backend()))
print("_cpu", t(lambda: M._cpu(*a[:-1])))
print("_check", t(lambda: M._check(*a[:-1])))
print("_cpu_fast_ok w/o values", t(lambda: M._cpu_fast_ok(*a[:-2], -1)))
print("values_ok", t(lambda: M._values_ok_cpu(ls, None, ks, 1, 1, 8)))
mod = llmkern._backends.cpu_module()
out=torch.empty_like(qs)
n, ws = M._workspace(mod, 1,1,Hq,Hk,D,8,2)
call = M._cpu_call(qs, ks, vs, ls, None, None, out, ws, 2)
print("KernelCall()", t(lambda: call()))
call1 = M._cpu_call(qs, ks, vs, ls, None, None, out, ws, 1)
print("KernelCall() 1thr", t(lambda: call1()))
print("make call", t(lambda: M._cpu_call(qs, ks, vs, ls, None, None, out, ws, 2)))
