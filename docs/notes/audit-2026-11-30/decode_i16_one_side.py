"""One side of the session-19 A/B of q16_fine's cost: the int8-cache, bf16-q decode kernel (int16 path), cold caches,
2 threads, median of 180 calls per case. Alternate processes between two builds, e.g. a worktree of 9e02e96:
    for r in 1 2 3; do PYTHONPATH=/tmp/base python THIS base; PYTHONPATH=. python THIS new; done"""
import itertools, statistics, sys, time, torch
import llmkern._C as C
torch.set_num_threads(2)
CASES = {"llama-B1-L4096": (1, 4096, 32, 8, 128), "smol-B1-L1024": (1, 1024, 9, 3, 64), "smol-B8-L1024": (8, 1024, 9, 3, 64)}
for name in CASES:
    B, L, Hq, Hk, D = CASES[name]
    torch.manual_seed(0)
    q = torch.randn(B, Hq, D).to(torch.bfloat16)
    copies = max(2, (128 << 20) // (2 * B * L * Hk * D) + 1)
    def one():
        k, v = (torch.randint(-127, 128, (B, L, Hk, D), dtype=torch.int8) for _ in range(2))
        return k, v, torch.rand(B, L, Hk) * 0.01, torch.rand(B, L, Hk) * 0.01
    cyc = itertools.cycle([one() for _ in range(copies)])
    lens = torch.full((B,), L, dtype=torch.int32)
    ws_bytes = C.decode_attention_workspace_size(B, 1, Hq, Hk, D, L, 2)
    ws = torch.empty(ws_bytes, dtype=torch.uint8)
    out = torch.empty(B, Hq, D, dtype=torch.bfloat16)
    ts = []
    for i in range(200):
        k, v, ks, vs = next(cyc)
        t = time.perf_counter()
        C.decode_attention(q.data_ptr(), 1, [q.stride(0), 0, q.stride(1)], B, 1, Hq, Hk, D, k.data_ptr(), v.data_ptr(), 3,
                           list(k.stride()[:3]), list(v.stride()[:3]), ks.data_ptr(), vs.data_ptr(), list(ks.stride()), list(vs.stride()),
                           lens.data_ptr(), 0, 0, 0, L, D ** -0.5, 0.0, -1, out.data_ptr(), ws.data_ptr(), ws_bytes, 2, "avx512_vnni", i16_dot=True)
        ts.append(time.perf_counter() - t)
    print(sys.argv[1], name, f"{statistics.median(ts[20:]) * 1e6:.1f}")
