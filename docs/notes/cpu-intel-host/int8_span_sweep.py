"""Int8Linear W8A16, fp32 x, M = 512: K-span lengths (K blocks per span, int8_linear_f32.h) alternated call by
call in one process, each as F.linear time on the dequantized weight over Int8Linear time (higher is better);
asserts that every span length gives the same bits. Needs a build with int8_span_hook.patch applied (a setter
for the span length, not landed): git apply docs/notes/cpu-intel-host/int8_span_hook.patch, build, then
python docs/notes/cpu-intel-host/int8_span_sweep.py THREADS"""
import sys, time, statistics, torch
import torch.nn.functional as F
import llmkern, llmkern._C as C
from llmkern.nn import Int8Linear
torch.manual_seed(0); torch.set_num_threads(int(sys.argv[1]))
spans = [1, 2, 3, 5, 10]
M = 512
for (N, K, G) in [(3072, 576, 0), (576, 1536, 0), (960, 576, 0), (3072, 576, 32)]:
    lin = torch.nn.Linear(K, N, bias=False).requires_grad_(False)
    q = Int8Linear.from_linear(lin, group_size=G)
    wd = llmkern.ops.dequantize_int8(q.weight, q.weight_scale)
    x = torch.randn(M, K)
    t = {s: [] for s in spans}; ref = []
    with torch.inference_mode():
        outs = {}
        for s in spans:
            C.exp_set_span_blocks(s); outs[s] = q(x)
        assert all(torch.equal(outs[s], outs[1]) for s in spans)
        for rep in range(20):
            for s in spans[rep % 5:] + spans[:rep % 5]:
                C.exp_set_span_blocks(s)
                t0 = time.perf_counter(); q(x); t[s].append(time.perf_counter() - t0)
            t0 = time.perf_counter(); F.linear(x, wd); ref.append(time.perf_counter() - t0)
    fl = statistics.median(ref)
    print(f"{N}x{K} G{G}: F.linear {fl*1e3:.2f} ms; " + ", ".join(f"span {s}: {fl/statistics.median(t[s]):.3f}" for s in spans))
