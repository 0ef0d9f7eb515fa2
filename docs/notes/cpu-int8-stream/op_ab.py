"""Op calls (ops.int8_linear W8A16, no preparer: no packed copy) of 1-4 rows, cold (copies over ~128 MB), 2 threads,
median of 7 rounds per shape, and the route each call took ("st" stream, "ti" tiles). Run it for two trees in turn to
compare routes: PYTHONPATH=TREE OMP_NUM_THREADS=2 python op_ab.py (cwd outside the tree)."""
import os, time, torch, sys
from llmkern import ops
import llmkern._C as C
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
for isa in ("avx512_vnni", "avx2"):
    os.environ["LLMKERN_CPU_ISA"] = isa
    for N, K, G in [(1536, 576, 32), (576, 1536, 32), (49152, 576, 32), (2048, 2048, 32), (4096, 4096, 16)]:
        copies = max(2, int(128e6 / (N * K)))
        ws = [(torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8), torch.rand(N, K // G) * 0.01) for _ in range(copies)]
        row = []
        for M in (1, 2, 3, 4):
            x = torch.randn(M, K)
            best = []
            for r in range(7):
                t = time.perf_counter()
                for w, s in ws: ops.int8_linear(x, w, s, None, mode="w8a16")
                best.append((time.perf_counter() - t) / len(ws) * 1e6)
            best.sort()
            row.append(f"M={M} {C.int8_linear_route(M, K, G, 'w8a16', 0, isa)[:2]} {best[3]:.0f}")
        print(isa, f"{N}x{K}", " | ".join(row), flush=True)
