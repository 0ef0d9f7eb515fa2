"""int8 W8A16 packed decode, SmolLM2 lm_head shape 49152x576 G=32 (fp16-valued scales, fp32 x), M = 1, 2, 4, 8,
the prepared runner called in a loop, medians. OLD=1 loads a baseline llmkern/_C from /tmp/base_so/ca2base (a build
of an earlier commit copied there as ca2base/_C*.so with an empty __init__.py); run old and new alternately:
    for i in 1 2 3; do OLD=1 PYTHONPATH=. python docs/notes/cpu-int8pack-rows_ab.py; PYTHONPATH=. python docs/notes/cpu-int8pack-rows_ab.py; done"""
import torch, time, statistics, sys, os
if os.environ.get("OLD"):
    sys.path.insert(0, "/tmp/base_so"); import ca2base._C as MOD
    import llmkern._backends as BK; BK.cpu_module = lambda: MOD
from llmkern.ops.int8_linear import _cpu_runner
torch.set_num_threads(2)
N,K,G=49152,576,32
w=torch.randint(-127,128,(N,K),dtype=torch.int8); s=(torch.rand(N,K//G)*0.01).half().float()
r=_cpu_runner(w,s,None,"w8a16",pack=True)
res=[]
for M in (1,2,4,8):
    x=torch.randn(M,K); r(x)
    ts=[]
    for _ in range(40):
        t=time.perf_counter(); r(x); ts.append(time.perf_counter()-t)
    res.append(f"M{M} {statistics.median(ts)*1e6:.0f}")
print("old" if os.environ.get("OLD") else "new", " ".join(res))
