"""Int4Linear (G = 32, fp16-valued scales) against F.linear on its dequantized weight, fp32 x, M = 512, alternated
call by call: python prefill_ab.py THREADS"""
import torch, time, statistics
import torch.nn.functional as F
import llmkern
from llmkern.nn import Int4Linear
import sys; torch.manual_seed(0); torch.set_num_threads(int(sys.argv[1]))
M = 512
for (N, K) in [(3072, 576), (576, 1536)]:
    lin = torch.nn.Linear(K, N, bias=False).requires_grad_(False)
    q = Int4Linear.from_linear(lin, group_size=32)
    sc = q.scales.half().float(); of = q.offsets.half().float()
    q = Int4Linear.from_quantized(q.qweight, sc, of)
    wd = llmkern.ops.dequantize_int4(q.qweight, sc, of)
    x = torch.randn(M, K); q(x[:1]); q(x)
    a, b = [], []
    for _ in range(40):
        t = time.perf_counter(); q(x); a.append(time.perf_counter() - t)
        t = time.perf_counter(); F.linear(x, wd); b.append(time.perf_counter() - t)
    ra = [y / x_ for x_, y in zip(a, b)]
    print(f"{N}x{K} M={M} fp32 interleaved: Int4Linear {statistics.median(a)*1e3:.2f} ms, F.linear {statistics.median(b)*1e3:.2f} ms, per-pair ratio median {statistics.median(ra):.2f}x (F.linear time / ours)")
