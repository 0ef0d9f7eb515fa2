"""Paged vs contiguous decode_attention A/B (SmolLM2 heads, L=1024, fp32 or bf16 cache, 2 threads): random
block table, identity table, contiguous cache; 12 rotated copies, interleaved, medians of 60.

    PYTHONPATH=. python docs/notes/cpu-attn2-ab/paged_random_ab.py B [BLOCK_SIZE [fp32|bf16]]
"""
import time, torch, sys
from llmkern import ops
torch.set_num_threads(2)
B, L, Hq, Hk, D, BS = int(sys.argv[1]), 1024, 9, 3, 64, int(sys.argv[2]) if len(sys.argv) > 2 else 16
DT = {"fp32": torch.float32, "bf16": torch.bfloat16}[sys.argv[3] if len(sys.argv) > 3 else "fp32"]
g = torch.Generator().manual_seed(0)
copies = 12  # rotate > 128 MB? each set: 2 * B*L*Hk*D*4 bytes
sets = []
nb = B * L // BS
for c in range(copies):
    k = torch.randn(B, L, Hk, D, generator=g).to(DT); v = torch.randn(B, L, Hk, D, generator=g).to(DT)
    perm = torch.randperm(nb, generator=g).to(torch.int32).view(B, L // BS)
    ident = torch.arange(nb, dtype=torch.int32).view(B, L // BS)
    kp = torch.empty(nb, BS, Hk, D, dtype=DT); vp = torch.empty(nb, BS, Hk, D, dtype=DT)
    kp[perm.view(-1).long()] = k.view(nb, BS, Hk, D); vp[perm.view(-1).long()] = v.view(nb, BS, Hk, D)
    ki = k.view(nb, BS, Hk, D); vi = v.view(nb, BS, Hk, D)
    sets.append((k, v, kp, vp, perm, ki, vi, ident))
print("bytes per set MB", 2 * B * L * Hk * D * 4 / 1e6 * 2)
q = torch.randn(B, Hq, D, generator=g).to(DT)
lens = torch.full((B,), L, dtype=torch.int32)
fns = {
 "contiguous": lambda s: ops.decode_attention(q, s[0], s[1], lens, backend="cpu"),
 "paged-random": lambda s: ops.decode_attention(q, s[2], s[3], lens, block_table=s[4], backend="cpu"),
 "paged-identity": lambda s: ops.decode_attention(q, s[5], s[6], lens, block_table=s[7], backend="cpu"),
}
ts = {k: [] for k in fns}
i = 0
for rep in range(60):
    for name, f in fns.items():
        s = sets[i % copies]; i += 1
        t0 = time.perf_counter(); f(s); ts[name].append(time.perf_counter() - t0)
for k, v in ts.items(): print(k, f"{sorted(v)[len(v)//2]*1e6:.1f} us")
