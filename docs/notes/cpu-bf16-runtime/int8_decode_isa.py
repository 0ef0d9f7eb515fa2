"""Int8Linear at one row from cache (the same module called back to back), per channel, groups of 32 and
W8A8, on the ISA that LLMKERN_CPU_ISA pins and T threads: the AVX2 W8A16 rate in cpu-bf16-runtime.md.

    LLMKERN_CPU_ISA=avx2 T=1 PYTHONPATH=. python docs/notes/cpu-bf16-runtime/int8_decode_isa.py
"""
import torch, time, os
from llmkern.nn import Int8Linear
torch.set_num_threads(int(os.environ.get("T", "2")))
def t(fn, n=200):
    for _ in range(20): fn()
    t0 = time.perf_counter()
    for _ in range(n): fn()
    return (time.perf_counter() - t0) / n * 1e6
torch.manual_seed(0)
for N, K in ((576, 576), (1536, 576), (4096, 576)):
    lin = torch.nn.Linear(K, N, bias=False); x = torch.randn(1, K)
    m = Int8Linear.from_linear(lin)
    us = t(lambda: m(x))
    print(os.environ.get("LLMKERN_CPU_ISA"), N, K, f"{us:.1f} us  {N*K/us/1e3:.2f} GMAC/s")
for N, K in ((576, 576), (4096, 576)):
    lin = torch.nn.Linear(K, N, bias=False); x = torch.randn(1, K)
    for G in (32,):
        m = Int8Linear.from_linear(lin, group_size=G)
        us = t(lambda: m(x)); print(os.environ.get("LLMKERN_CPU_ISA"), "w8a16 G32", N, K, f"{us:.1f} us  {N*K/us/1e3:.2f} GMAC/s")
    m = Int8Linear.from_linear(lin, mode="w8a8")
    us = t(lambda: m(x)); print(os.environ.get("LLMKERN_CPU_ISA"), "w8a8", N, K, f"{us:.1f} us  {N*K/us/1e3:.2f} GMAC/s")
