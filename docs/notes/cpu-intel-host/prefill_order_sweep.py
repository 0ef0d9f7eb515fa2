"""The fp32 prefill's loop order, swept in one process: K-span lengths (int8: K blocks per span) or row-group sizes
(int8 or int4: 8-row blocks that take each K block of a span in turn), alternated call by call, each as F.linear's
time on the dequantized weight over the module's (higher is better); asserts that every setting gives the same bits.

Needs a build with prefill_order_hook.patch applied (setters for the two constants, not landed):
    git apply docs/notes/cpu-intel-host/prefill_order_hook.patch && python setup.py build_ext --inplace
    python docs/notes/cpu-intel-host/prefill_order_sweep.py {int8-span,int8-group,int4-group} THREADS [M] [bf16]
(bf16: x in bf16, the modules' bf16 routes where the CPU has AVX512-BF16; F.linear then runs in bf16 too.)
"""
import sys
import statistics
import time

import torch
import torch.nn.functional as F

import llmkern
import llmkern._C as C
from llmkern.nn import Int4Linear, Int8Linear

what, threads = sys.argv[1], int(sys.argv[2])
M = int(sys.argv[3]) if len(sys.argv) > 3 else 512
dtype = torch.bfloat16 if len(sys.argv) > 4 and sys.argv[4] == "bf16" else torch.float32
torch.manual_seed(0)
torch.set_num_threads(threads)
setter, values, label = {
    "int8-span": (C.exp_set_span_blocks, [1, 2, 3, 5, 10], "span"),
    "int8-group": (C.exp_set_group_blocks, [1, 2, 4, 8], "rows"),
    "int4-group": (C.exp_set_group_blocks_i4, [1, 2, 4], "rows"),
}[what]
shapes = [(3072, 576, 0), (576, 1536, 0), (960, 576, 0), (3072, 576, 32), (4096, 4096, 0)]
for (N, K, G) in shapes:
    lin = torch.nn.Linear(K, N, bias=False).requires_grad_(False)
    if what.startswith("int4"):
        q = Int4Linear.from_linear(lin, group_size=G or 32)
        wd = llmkern.ops.dequantize_int4(q.qweight, q.scales, q.offsets)
    else:
        q = Int8Linear.from_linear(lin, group_size=G)
        wd = llmkern.ops.dequantize_int8(q.weight, q.weight_scale)
    x = torch.randn(M, K).to(dtype)  # [M, K]
    wd = wd.to(dtype)
    t = {v: [] for v in values}
    ref = []
    reps = 20 if K < 4096 else 6
    with torch.inference_mode():
        outs = {}
        for v in values:
            setter(v)
            outs[v] = q(x)
        assert all(torch.equal(outs[v], outs[values[0]]) for v in values), "a setting changed the bits"
        for rep in range(reps):
            n = rep % len(values)
            for v in values[n:] + values[:n]:
                setter(v)
                t0 = time.perf_counter()
                q(x)
                t[v].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            F.linear(x, wd)
            ref.append(time.perf_counter() - t0)
    fl = statistics.median(ref)
    shown = [(8 * v if label == "rows" else v) for v in values]
    print(f"{what} {N}x{K} G{G} M{M} {str(dtype)[6:]}: F.linear {fl * 1e3:.2f} ms; "
          + ", ".join(f"{label} {s}: {fl / statistics.median(t[v]):.3f}" for s, v in zip(shown, values)), flush=True)
