"""Int8Linear W8A16 (per channel and GGUF-like groups of 32) with bf16 x against F.linear bf16, prefill
shapes (Llama-2-7B 4096x4096 at M 128 / 512, SmolLM2 layers at M 512): medians of 7 calls, 2 threads.

    PYTHONPATH=TREE python docs/notes/cpu-bf16-runtime/int8_w8a16_prefill.py LABEL
"""
import torch, time, sys
import torch.nn.functional as F
from llmkern.nn import Int8Linear
torch.set_num_threads(2)
def t(fn, n=7):
    for _ in range(2): fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    return sorted(ts)[n // 2] * 1e3
for (M, N, K) in ((128, 4096, 4096), (512, 4096, 4096), (512, 576, 576), (512, 3072, 576), (512, 576, 1536)):
    lin = torch.nn.Linear(K, N, bias=False)
    m = Int8Linear.from_linear(lin); mg = Int8Linear.from_linear(lin, group_size=32)
    x = torch.randn(M, K).bfloat16(); w = lin.weight.detach().bfloat16()
    print(sys.argv[1] if len(sys.argv) > 1 else "", M, N, K, f"w8a16 {t(lambda: m(x)):.2f} ms  g32 {t(lambda: mg(x)):.2f} ms  F.linear bf16 {t(lambda: F.linear(x, w)):.2f} ms")
