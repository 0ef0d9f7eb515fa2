"""bf16 causal prefill attention, SmolLM2 and Llama-3-8B head shapes, S 512 and 2048: medians of 9 calls.
Alternate two trees for an A/B (the table in docs/notes/cpu-bf16-runtime.md):

    for i in 1 2 3; do for t in BASE NEW; do PYTHONPATH=$t python docs/notes/cpu-bf16-runtime/attention_ab.py $t; done; done
"""
import time, torch, sys
from llmkern import ops
torch.set_num_threads(2)
res = []
for (S, Hq, Hk, D) in ((512, 9, 3, 64), (2048, 9, 3, 64), (512, 32, 8, 128), (2048, 32, 8, 128)):
    q=torch.randn(1,S,Hq,D).bfloat16(); k=torch.randn(1,S,Hk,D).bfloat16(); v=torch.randn(1,S,Hk,D).bfloat16()
    for _ in range(2): ops.attention(q,k,v,causal=True)
    ts=[]
    for _ in range(9):
        t0=time.perf_counter(); ops.attention(q,k,v,causal=True); ts.append(time.perf_counter()-t0)
    res.append(f"S{S}/D{D} {sorted(ts)[4]*1e3:.2f}")
print(sys.argv[1], " ".join(res))
