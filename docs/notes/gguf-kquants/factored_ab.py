"""rows16 int4 decode (M = 1) of Q4_K-form weights: the factored layout (E = 1, 4.75 bits per weight) against
the fp32-scale layout (E = 4, LLMKERN_INT4_FACTORED=0), interleaved call by call, over enough weight copies
to read them from memory (cold). usage: factored_ab.py [N K] (default both Llama-2-7B shapes); 2 threads."""
import statistics
import sys
import time

import torch

sys.path.insert(0, "tests/ops")
from test_int4_linear_factored_cpu import q4k_weights  # noqa: E402

import os  # noqa: E402
from llmkern.ops.int4_linear import _cpu_runner  # noqa: E402

torch.set_num_threads(2)
shapes = [(int(sys.argv[1]), int(sys.argv[2]))] if len(sys.argv) > 2 else [(4096, 4096), (11008, 4096)]
for N, K in shapes:
    gen = torch.Generator().manual_seed(0)
    copies = max(4, (160 << 20) // (N * K // 2))  # > 4x the 32 MiB L3
    runs = {1: [], 4: []}
    for _ in range(copies):
        qw, s, o = q4k_weights(N, K, 32, gen)
        runs[1].append(_cpu_runner(qw, s, o, None, pack=False, rows16="now"))
        os.environ["LLMKERN_INT4_FACTORED"] = "0"
        runs[4].append(_cpu_runner(qw, s, o, None, pack=False, rows16="now"))
        del os.environ["LLMKERN_INT4_FACTORED"]
    assert all(r.rows16_e == 1 for r in runs[1]) and all(r.rows16_e == 4 for r in runs[4])
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(1, K).to(dtype)
        for E in runs:  # warm
            for r in runs[E]:
                r(x)
        t = {1: [], 4: []}
        for rep in range(40):
            for E in ((1, 4) if rep % 2 else (4, 1)):
                for r in runs[E]:
                    t0 = time.perf_counter()
                    r(x)
                    t[E].append(time.perf_counter() - t0)
        m1, m4 = statistics.median(t[1]) * 1e6, statistics.median(t[4]) * 1e6
        b1, b4 = runs[1][0].rows16.numel(), runs[4][0].rows16.numel()
        print(f"{N}x{K} {str(dtype)[6:]} M=1: factored {m1:.0f} us ({b1 / m1 / 1e3:.1f} GB/s), fp32 scales "
              f"{m4:.0f} us ({b4 / m4 / 1e3:.1f} GB/s): {m4 / m1:.2f}x; bytes {b1 / 2**20:.1f} vs {b4 / 2**20:.1f} MiB")
