"""Released int8 W8A16 weights (w_ptr 0: GEMM panels built from the packed layout) against the canonical launch
(panels from the int8 weight tensor), interleaved call by call in one process, medians (us).

    OMP_NUM_THREADS=2 PYTHONPATH=. python docs/notes/cpu-int8-release/prefill_ab.py [avx2]
"""
import statistics
import sys
import time

import torch

import llmkern._C as C
from llmkern.ops.int8_linear import _cpu_runner

torch.set_num_threads(2)
ISA = sys.argv[1] if len(sys.argv) > 1 else ""  # "": the best this CPU has
CODE = {torch.float32: 0, torch.bfloat16: 1}


def launcher(w, s, packed, E, M, dtype, released):
    N, K = w.shape
    G = K // s.shape[1]
    x = torch.randn(M, K).to(dtype)
    out = torch.empty(M, N, dtype=dtype)
    ws = torch.empty(C.int8_linear_workspace_size(M, K, N, "w8a16", 2), dtype=torch.uint8)
    args = (x.data_ptr(), CODE[dtype], K, M, K, 0 if released else w.data_ptr(), N, s.data_ptr(), G, 0,
            out.data_ptr(), N, "w8a16", ws.data_ptr(), ws.numel(), 2, ISA, packed.data_ptr(), E)
    return lambda keep=(x, out, ws): C.int8_linear(*args)  # (keep: the tensors behind the pointers)


gen = torch.Generator().manual_seed(0)
for N, K in [(1536, 576), (576, 1536), (49152, 576), (4096, 4096)]:
    w = torch.randint(-128, 128, (N, K), generator=gen, dtype=torch.int8)
    s = (torch.rand(N, K // 32, generator=gen) * 0.02 + 1e-3).half().float()
    run = _cpu_runner(w, s, None, "w8a16", pack=True)
    for dtype in (torch.float32, torch.bfloat16):
        for M in (16, 128, 512):
            if N * M > 2 ** 24:
                continue
            fns = [launcher(w, s, run.packed, run.packed_e, M, dtype, r) for r in (False, True)]
            ts = ([], [])
            for rep in range(15):
                for i in (0, 1):
                    t = time.perf_counter()
                    fns[i]()
                    ts[i].append(time.perf_counter() - t)
            a, b = (statistics.median(t) * 1e6 for t in ts)
            print(f"{N}x{K} {str(dtype)[6:]} M={M}: canonical {a:.0f} us, released {b:.0f} us ({a / b:.2f}x)")
