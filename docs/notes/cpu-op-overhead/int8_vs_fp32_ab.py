"""int8 vs fp32 decode cache (KernelCalls, no Python in the timed loop), cold rotating copies,
interleaved rounds, medians. usage: PYTHONPATH=. python int8_vs_fp32_ab.py B L [Hq,Hk,D]"""
import time, torch, llmkern, sys, itertools, os, statistics
M = sys.modules["llmkern.ops.decode_attention"]
torch.set_num_threads(2)
B=int(sys.argv[1]); L=int(sys.argv[2]); Hq,Hk,D=[int(x) for x in (sys.argv[3] if len(sys.argv)>3 else "9,3,64").split(",")]
q=torch.randn(B,Hq,D); lens=torch.full((B,),L,dtype=torch.int32)
nbytes=B*L*Hk*D*8
n=max(2,int(200e6/nbytes))
out=torch.empty_like(q); ws=torch.empty(1<<25,dtype=torch.uint8)
f32=[]; i8=[]
for _ in range(n):
    k=torch.randn(B,L,Hk,D); v=torch.randn(B,L,Hk,D)
    f32.append((M._cpu_call(q,k,v,lens,None,None,out,ws,2),k,v))
for _ in range(max(2,2*n)):
    k=torch.randint(-127,128,(B,L,Hk,D),dtype=torch.int8); v=torch.randint(-127,128,(B,L,Hk,D),dtype=torch.int8)
    ks=torch.rand(B,L,Hk)*0.01; vs=torch.rand(B,L,Hk)*0.01
    i8.append((M._cpu_call(q,k,v,lens,ks,vs,out,ws,2),k,v,ks,vs))
nf=itertools.cycle(f32).__next__; ni=itertools.cycle(i8).__next__
rf=[]; ri=[]
reps=max(3,int(20000/(B*L/64)))
for r in range(15):
    for _ in range(2): nf()[0]()
    t0=time.perf_counter()
    for _ in range(reps): nf()[0]()
    rf.append((time.perf_counter()-t0)/reps*1e6)
    for _ in range(2): ni()[0]()
    t0=time.perf_counter()
    for _ in range(reps): ni()[0]()
    ri.append((time.perf_counter()-t0)/reps*1e6)
a,b=statistics.median(rf),statistics.median(ri)
print(f"B{B} L{L} H{Hq}/{Hk}/{D}: fp32 {a:.1f} us, int8 {b:.1f} us, int8 speedup {a/b:.2f}  (copies {n}, reps {reps})")
