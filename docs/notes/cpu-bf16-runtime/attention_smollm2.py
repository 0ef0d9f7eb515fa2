"""Causal prefill attention at SmolLM2's head shape (9 query / 3 KV heads, D = 64), llmkern against SDPA,
fp32 and bf16, S = 37 / 128 / 512 / 2048; medians of 20 calls, 2 threads, warm caches.

    PYTHONPATH=. python docs/notes/cpu-bf16-runtime/attention_smollm2.py
"""
import time

import torch
import torch.nn.functional as F

from llmkern import ops

torch.set_num_threads(2)


def median_ms(fn, n=20):
    for _ in range(3):
        fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[n // 2] * 1e3


for S in (37, 128, 512, 2048):
    for dt in (torch.float32, torch.bfloat16):
        q, k, v = torch.randn(1, S, 9, 64).to(dt), torch.randn(1, S, 3, 64).to(dt), torch.randn(1, S, 3, 64).to(dt)
        ours = median_ms(lambda: ops.attention(q, k, v, causal=True))
        # SDPA takes [B, H, S, D] with as many K/V heads as query heads
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(3, 1), v.transpose(1, 2).repeat_interleave(3, 1)
        sdpa = median_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True))
        gflop = 4 * S * S / 2 * 64 * 9 / 1e9  # Q K^T and P V over the causal half
        print(f"S={S:5d} {str(dt):15s} llmkern {ours:8.3f} ms ({gflop / ours * 1e3:4.0f} GFLOP/s)   SDPA {sdpa:8.3f} ms")
