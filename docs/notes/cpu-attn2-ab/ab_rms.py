"""A/B of the rms_norm cpu adapter: baseline _C ($BASE, default /tmp/ca2/base) vs the worktree _C, interleaved in one process (docs/notes/cpu-attn2.md)."""
import sys, time, statistics, importlib.util, glob, torch, torch.nn.functional as F
torch.set_num_threads(2)
import llmkern._backends as BK
from llmkern.ops.rms_norm import _cpu
spec = importlib.util.spec_from_file_location("ca2base._C", glob.glob(__import__('os').environ.get('BASE', '/tmp/ca2/base') + '/llmkern/_C*.so')[0])
base = importlib.util.module_from_spec(spec); spec.loader.exec_module(base)
orig = BK.cpu_module
class Old:  # the baseline launcher has no isa argument
    def __getattr__(self, n):
        f = getattr(base, n)
        return (lambda *a: f(*a[:-1])) if n == 'rms_norm' else f
old = Old()
def with_mod(mod, fn):
    BK.cpu_module = lambda: mod
    try: return fn()
    finally: BK.cpu_module = orig
N=int(__import__('os').environ.get('N', 200))
for M,H,dt,res in [(512,4096,torch.float32,False),(512,4096,torch.float32,True),(512,576,torch.float32,False),(512,576,torch.float32,True),(1,4096,torch.float32,False),(1,576,torch.float32,True),(512,4096,torch.bfloat16,True),(1,4096,torch.bfloat16,False)]:
    x=torch.randn(M,H).to(dt); r=torch.randn(M,H).to(dt) if res else None; w=torch.randn(H).to(dt)
    fo=lambda: with_mod(old, lambda: _cpu(x,w,1e-5,r)); fn=lambda: _cpu(x,w,1e-5,r)
    ft=(lambda: F.rms_norm(x+r,(H,),w,1e-5)) if res else (lambda: F.rms_norm(x,(H,),w,1e-5))
    a=fo(); b=fn(); assert torch.equal(a[0],b[0]) or (a[0]-b[0]).abs().max()<1e-5*a[0].abs().max(), (a[0]-b[0]).abs().max()
    T=[[],[],[]]
    for i in range(N+10):
        for j,f in enumerate((fo,fn,ft)):
            t=time.perf_counter(); f(); d=time.perf_counter()-t
            if i>=10: T[j].append(d)
    md=[statistics.median(t)*1e6 for t in T]; mn=[min(t)*1e6 for t in T]
    print(f"M{M} H{H} {str(dt)[6:]} res={res}: old/new/F.rms_norm med {md[0]:.1f}/{md[1]:.1f}/{md[2]:.1f} us  min {mn[0]:.1f}/{mn[1]:.1f}/{mn[2]:.1f}", flush=True)
