"""Hot functional int4_linear / int8_linear calls at 576x576, bf16 x, M = 1: the op, its check, the backend
function, building the runner. Run it with two trees for an A/B.
    PYTHONPATH=TREE python docs/notes/cpu-op-overhead/linear_op_path.py"""
import time, torch, importlib
import llmkern
I4=importlib.import_module("llmkern.ops.int4_linear"); I8=importlib.import_module("llmkern.ops.int8_linear")
torch.set_num_threads(2)
def t(fn,n=3000):
    for _ in range(300): fn()
    ts=[]
    for r in range(7):
        t0=time.perf_counter()
        for _ in range(n): fn()
        ts.append((time.perf_counter()-t0)/n*1e6)
    ts.sort(); return round(ts[3],2)
N,K=576,576
lin=torch.nn.Linear(K,N,bias=False)
from llmkern.nn import Int4Linear, Int8Linear
m4=Int4Linear.from_linear(lin); m8=Int8Linear.from_linear(lin)
x=torch.randn(1,K).bfloat16()
a4=(x,m4.qweight,m4.scales,m4.offsets,None,"w4a16"); a8=(x,m8.weight,m8.weight_scale,None,"w8a16")
print("int4 op",t(lambda: llmkern.ops.int4_linear(*a4[:4])),"check",t(lambda: I4._check(*a4)),"_cpu",t(lambda: I4._cpu(*a4)),
      "runner",t(lambda: I4._cpu_runner(*a4[1:5],pack=False)))
print("int8 op",t(lambda: llmkern.ops.int8_linear(*a8[:3])),"check",t(lambda: I8._check(*a8)),"_cpu",t(lambda: I8._cpu(*a8)),
      "runner",t(lambda: I8._cpu_runner(*a8[1:])))
