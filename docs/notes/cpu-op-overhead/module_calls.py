"""Int4Linear / Int8Linear called in a loop (hot, M = 1, 2 threads): the module, its prepared run(x), the
backend function behind it, and F.linear fp32/bf16 (with and without grad). The numbers of
docs/notes/cpu-op-overhead.md "Modules". usage: PYTHONPATH=. python docs/notes/cpu-op-overhead/module_calls.py"""
import time, torch, llmkern, sys
from llmkern.nn import Int4Linear, Int8Linear
import torch.nn.functional as F
torch.set_num_threads(2)
def t(fn,n=5000):
    for _ in range(300): fn()
    ts=[]
    for r in range(7):
        t0=time.perf_counter()
        for _ in range(n): fn()
        ts.append((time.perf_counter()-t0)/n*1e6)
    ts.sort(); return round(ts[len(ts)//2],2)
for N,K in [(576,576),(192,576)]:
    lin=torch.nn.Linear(K,N,bias=False)
    m4=Int4Linear.from_linear(lin); m8=Int8Linear.from_linear(lin)
    x=torch.randn(1,K); xb=x.bfloat16(); wb=lin.weight.detach().bfloat16()
    m4(x); m4(x); m8(x); m8(x)
    print(N,K,"int4 module", t(lambda: m4(x)), "run", t(lambda: m4._run(x)), "impl", t(lambda: m4._run.impl(x)))
    print(N,K,"int8 module", t(lambda: m8(x)), "run", t(lambda: m8._run(x)), "impl", t(lambda: m8._run.impl(x)))
    print(N,K,"F.linear fp32", t(lambda: F.linear(x, lin.weight)), "bf16", t(lambda: F.linear(xb, wb)))
    with torch.no_grad():
        print(N,K,"F.linear fp32 nograd", t(lambda: F.linear(x, lin.weight)), "lin()", t(lambda: lin(x)))
