"""rotary_embedding at the SmolLM2 prefill shape (37 tokens, 9 + 3 heads, D 64), hot: the op, the module, the
backend function alone (2 and 1 threads), its check. LLMKERN_CPU_ISA=avx2 runs the portable rows.
    PYTHONPATH=. python docs/notes/cpu-startup/rotary_op.py"""
import torch, time
import llmkern
from llmkern.ops.rotary_embedding import rotary_embedding_op
from llmkern import nn as lnn
torch.set_num_threads(2)
def t(fn,n=500):
    for _ in range(50): fn()
    ts=[]
    for r in range(7):
        t0=time.perf_counter()
        for _ in range(n): fn()
        ts.append((time.perf_counter()-t0)/n*1e6)
    ts.sort(); return round(ts[3],2)
rot=lnn.RotaryEmbedding(64, max_positions=8192)
S=37
q=torch.randn(1,S,9,64); k=torch.randn(1,S,3,64); pos=torch.arange(S).view(1,S)
cs=rot.cos_sin if hasattr(rot,"cos_sin") else None
print([n for n,_ in rot.named_buffers()])
csc=rot.cos_sin_cache
print("op", t(lambda: llmkern.ops.rotary_embedding(q,k,pos,csc)))
print("module", t(lambda: rot(q,k,pos)))
q2=torch.randn(1,S,9*64+2*3*64)[..., :9*64].view(1,S,9,64)
print("op strided q", t(lambda: llmkern.ops.rotary_embedding(q2,k,pos,csc)))
with torch.inference_mode():
    print("op inference", t(lambda: llmkern.ops.rotary_embedding(q,k,pos,csc)))
import importlib; R=importlib.import_module("llmkern.ops.rotary_embedding")
print("backend _cpu direct", t(lambda: R._cpu(q,k,pos,csc,False)))
print("check", t(lambda: R._check(q,k,pos,csc,False)))
print("minmax", t(lambda: (int(pos.min()), int(pos.max()))))
torch.set_num_threads(1)
print("backend _cpu direct 1 thread", t(lambda: R._cpu(q,k,pos,csc,False)))
