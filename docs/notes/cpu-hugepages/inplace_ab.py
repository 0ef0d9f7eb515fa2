"""A/B of weights read in place from huge pages: Int8Linear W8A16 with K >= 2048 decodes from its canonical
tensors (the "stream" route, no packed copy) and Int4Linear on AVX2-only CPUs reads its canonical tensors; here
the module's weight tensor sits in `packed_buffer` memory (transparent huge pages) or in torch's, M = 1, copies
cycled beyond the L3 (cold), both arms interleaved in one process, 2 threads; medians.

    python docs/notes/cpu-hugepages/inplace_ab.py [--rounds 31]
"""
import argparse
import statistics
import time

import torch

from llmkern.nn import Int8Linear
from llmkern.ops._cpu_linear import packed_buffer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=31)
    a = ap.parse_args()
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    print(f"{'Int8Linear W8A16 (stream route)':34} {'4K pages us':>12} {'huge pages us':>14} {'speedup':>8}", flush=True)
    for N, K, G in [(4096, 4096, 32), (11008, 4096, 32), (4096, 11008, 32), (4096, 4096, 0)]:
        w = torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8)
        s = (torch.rand(N, K // G if G else 1, generator=gen) * 0.01).half().float()
        x = torch.randn(1, K, generator=gen)
        mods = {}
        for huge in (False, True):
            copies = []
            for _ in range(max(2, (128 << 20) // (N * K))):
                wt = w.clone()
                if huge:
                    wt = packed_buffer(w.numel()).view(torch.int8).view(N, K)
                    wt.copy_(w)
                m = Int8Linear.from_quantized(wt, s.clone())
                m(x)
                copies.append(m)
            mods[huge] = copies
        assert torch.equal(mods[True][0](x), mods[False][0](x))
        t = {False: [], True: []}
        for r in range(a.rounds):
            for huge in (False, True):
                m = mods[huge][r % len(mods[huge])]
                t0 = time.perf_counter()
                m(x)
                t[huge].append(time.perf_counter() - t0)
        f, h = statistics.median(t[False]) * 1e6, statistics.median(t[True]) * 1e6
        print(f"{f'{N} x {K}, G {G or K}':34} {f:12.0f} {h:14.0f} {f / h:7.2f}x", flush=True)


if __name__ == "__main__":
    main()
