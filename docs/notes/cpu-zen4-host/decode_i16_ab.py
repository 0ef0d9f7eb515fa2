"""Cold-cache A/B of the CPU decode kernel's int16 path for an int8 cache with a bf16 q: the launcher's i16_dot
on and off, alternated in one process (10 rounds of 30 calls each way), 2 threads, AVX-512 VNNI (ISA=avx2: the
AVX2 kernels).

    PYTHONPATH=. python docs/notes/cpu-zen4-host/decode_i16_ab.py [CASE ...]     (HOT=1: one copy of the cache)

Each case cycles over enough copies of its int8 K / V cache (random values, per-token scales) to pass 128 MiB,
so each call reads from memory, and prints the median of each side.
"""
import itertools
import os
import statistics
import sys
import time

import torch

import llmkern._C as C

# name: (B, L, Hq, Hk, D)
CASES = {
    "llama-B1-L4096": (1, 4096, 32, 8, 128), "llama-B8-L1024": (8, 1024, 32, 8, 128),
    "smol-B1-L1024": (1, 1024, 9, 3, 64), "smol-B8-L1024": (8, 1024, 9, 3, 64),
    "mha-B1-L2048": (1, 2048, 32, 32, 128), "gqa8-B1-L2048": (1, 2048, 32, 4, 128),
    "gqa4-d64-B4-L1024": (4, 1024, 12, 3, 64), "mha-d64-B4-L1024": (4, 1024, 12, 12, 64),
}


def make(B, L, Hq, Hk, D, threads=2):
    """call(i16_dot): one launch on the next copy of the cache; q bf16 [B, Hq, D]."""
    q = torch.randn(B, Hq, D).to(torch.bfloat16)
    copies = 1 if os.environ.get("HOT") else max(2, (128 << 20) // (2 * B * L * Hk * D) + 1)

    def one():
        k, v = (torch.randint(-127, 128, (B, L, Hk, D), dtype=torch.int8) for _ in range(2))
        return k, v, torch.rand(B, L, Hk) * 0.01, torch.rand(B, L, Hk) * 0.01

    cyc = itertools.cycle([one() for _ in range(copies)])
    lens = torch.full((B,), L, dtype=torch.int32)
    ws_bytes = C.decode_attention_workspace_size(B, 1, Hq, Hk, D, L, threads)
    ws, out = torch.empty(ws_bytes, dtype=torch.uint8), torch.empty_like(q)

    def call(i16_dot):
        k, v, ks, vs = next(cyc)
        C.decode_attention(q.data_ptr(), 1, [q.stride(0), 0, q.stride(1)], B, 1, Hq, Hk, D, k.data_ptr(), v.data_ptr(),
                           3, list(k.stride()[:3]), list(v.stride()[:3]), ks.data_ptr(), vs.data_ptr(),
                           list(ks.stride()), list(vs.stride()), lens.data_ptr(), 0, 0, 0, L, D ** -0.5, 0.0, -1,
                           out.data_ptr(), ws.data_ptr(), ws_bytes, threads, os.environ.get("ISA", "avx512_vnni"),
                           i16_dot=i16_dot)

    return call


def main(names):
    torch.set_num_threads(2)
    for name in names or CASES:
        f = make(*CASES[name])
        ts = {True: [], False: []}
        for _ in range(10):
            for flag in (True, False):
                for _ in range(5):
                    f(flag)
                for _ in range(30):
                    t = time.perf_counter()
                    f(flag)
                    ts[flag].append(time.perf_counter() - t)
        print(f"{name}: int16 {statistics.median(ts[True]) * 1e6:.1f} us, fp32 path "
              f"{statistics.median(ts[False]) * 1e6:.1f} us", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
