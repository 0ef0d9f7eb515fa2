"""Interleaved A/B of the packed int8 decode layout: narrow (5/6-bit weights, factored scales) against 8-bit,
same process, cold weights (copies over 4x L3 cycled), M rows, 2 threads. Prints median us per call."""
import os, sys, time, importlib, statistics
import torch
pass  # run with PYTHONPATH at a tree with narrow.patch applied
import llmkern
il = importlib.import_module("llmkern.ops.int8_linear")
torch.set_num_threads(int(os.environ.get("T", "2")))
torch.manual_seed(0)
def weights(N, K, G, kind):
    ng = K // G
    if kind == "q5_0":
        w = torch.randint(-16, 16, (N, K), dtype=torch.int8)
        s = (torch.rand(N, ng) * 0.01 + 1e-4).half().float()
    else:  # q6_k
        w = torch.randint(-32, 32, (N, K), dtype=torch.int8)
        d = (torch.rand(N, (K + 255) // 256) * 1e-3 - 5e-4).half().float()
        s = d.repeat_interleave(256 // G, 1)[:, :ng] * torch.randint(-128, 128, (N, ng)).float()
    return w, s
shapes = [(1536, 576, 32, "q5_0"), (576, 1536, 32, "q5_0"), (576, 1536, 16, "q6_k"), (4096, 4096, 32, "q5_0"), (4096, 4096, 16, "q6_k")]
M = int(os.environ.get("M", "1"))
dtype = getattr(torch, os.environ.get("DT", "float32"))
mode = os.environ.get("MODE", "w8a16")
for N, K, G, kind in shapes:
    w, s = weights(N, K, G, kind)
    copies = max(2, int(4 * 32e6 / (N * K)))
    runs = {}
    for narrow in ("1", "0"):
        os.environ["LLMKERN_INT8_NARROW"] = narrow
        runs[narrow] = [il._cpu_prepare(w.clone(), s.clone(), None, mode) for _ in range(copies)]
    x = torch.randn(M, K).to(dtype)
    t = {"1": [], "0": []}
    for r in range(int(os.environ.get("R", "15"))):
        for narrow in ("1", "0") if r % 2 == 0 else ("0", "1"):
            rs = runs[narrow]
            for run in rs[:2]:
                run(x)
            t0 = time.perf_counter()
            for run in rs:
                run(x)
            t[narrow].append((time.perf_counter() - t0) / len(rs) * 1e6)
    a, b = statistics.median(t["1"]), statistics.median(t["0"])
    nb = runs["1"][0].packed.numel(), runs["0"][0].packed.numel()
    print(f"{N}x{K} G{G} {kind} M={M} {dtype} {mode}: narrow {a:.1f} us ({nb[0]/a/1e3:.1f} GB/s)  8-bit {b:.1f} us ({nb[1]/b/1e3:.1f} GB/s)  speedup {b/a:.2f}x  bytes {nb[1]/nb[0]:.2f}x", flush=True)
