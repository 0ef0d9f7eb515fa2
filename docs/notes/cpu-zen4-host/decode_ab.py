"""Cold-cache timing of the CPU decode_attention op on a few shapes, for A/B runs of two builds.

    PYTHONPATH=. python docs/notes/cpu-zen4-host/decode_ab.py [CASE ...]

Each case cycles the op over enough copies of its K / V cache to pass 128 MiB (so each call reads from memory)
and prints the median of N calls after a warm-up, 2 threads. To compare builds, copy each build's
llmkern/_C*.so in turn and run this in a fresh process each time, alternating (the VM's speed drifts by minutes).
How the numbers in cpu-zen4-host.md were taken (there: separate ad-hoc copies of this loop, same cases).
"""
import itertools
import statistics
import sys
import time

import torch

from llmkern.ops import decode_attention

# name: (B, L, Hq, Hk, D, cache: "fp32" | "bf16" | "int8", calls)
CASES = {
    "llama-B1-L4096-bf16": (1, 4096, 32, 8, 128, "bf16", 200),
    "llama-B1-L4096-fp32": (1, 4096, 32, 8, 128, "fp32", 200),
    "llama-B1-L4096-int8": (1, 4096, 32, 8, 128, "int8", 300),
    "smol-B8-L1024-fp32": (8, 1024, 9, 3, 64, "fp32", 600),
    "smol-B8-L1024-bf16": (8, 1024, 9, 3, 64, "bf16", 200),
    "smol-B1-L1024-fp32": (1, 1024, 9, 3, 64, "fp32", 600),
    "smol-B1-L1024-bf16": (1, 1024, 9, 3, 64, "bf16", 600),
    "smol-B1-L256-fp32": (1, 256, 9, 3, 64, "fp32", 600),
    "smol-B1-L64-fp32": (1, 64, 9, 3, 64, "fp32", 1500),
}


def make(B, L, Hq, Hk, D, cache):
    """A function that calls the op on the next copy of the cache ([B, L, Hk, D]; int8: fp32 q, per-token scales)."""
    qdt = torch.bfloat16 if cache == "bf16" else torch.float32
    q = torch.randn(B, Hq, D).to(qdt)
    per_copy = 2 * B * L * Hk * D * (1 if cache == "int8" else qdt.itemsize)
    copies = max(2, (128 << 20) // per_copy + 1)

    def one():
        if cache == "int8":
            k, v = (torch.randint(-127, 128, (B, L, Hk, D), dtype=torch.int8) for _ in range(2))
            return k, v, torch.rand(B, L, Hk) * 0.01, torch.rand(B, L, Hk) * 0.01
        return torch.randn(B, L, Hk, D).to(qdt), torch.randn(B, L, Hk, D).to(qdt), None, None

    cyc = itertools.cycle([one() for _ in range(copies)])
    lens = torch.full((B,), L, dtype=torch.int32)

    def call():
        k, v, ks, vs = next(cyc)
        return decode_attention(q, k, v, lens, k_scale=ks, v_scale=vs, backend="cpu")

    return call


def main(names):
    torch.set_num_threads(2)
    for name in names or CASES:
        *shape, calls = CASES[name]
        f = make(*shape)
        for _ in range(max(20, calls // 10)):
            f()
        ts = []
        for _ in range(calls):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        print(f"{name}: {statistics.median(ts) * 1e6:.1f} us", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
