"""A/B of packed weight copies in transparent huge pages (ops/_cpu_linear.py packed_buffer) against torch's
4 KiB-page memory, for prepared modules at M = 1: copies enough to exceed the L3 cycled in turn (cold), the two
arms interleaved in one process, 2 threads; medians.

    python docs/notes/cpu-hugepages/huge_ab.py [--rounds 21]
"""
import argparse
import statistics
import time

import torch

import llmkern.ops._cpu_linear as CL
from llmkern.nn import Int4Linear, Int8Linear


def meminfo_huge():
    return [ln for ln in open("/proc/meminfo") if ln.startswith("AnonHugePages")][0].split()[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=21)
    a = ap.parse_args()
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    print(f"{'module':34} {'4K pages us':>12} {'huge pages us':>14} {'speedup':>8}", flush=True)
    cases = [("int4 4096x4096 G32 fp16-scales", 4096, 4096, "int4"), ("int4 11008x4096", 11008, 4096, "int4"),
             ("int4 4096x11008", 4096, 11008, "int4"), ("int8 w8a8 4096x4096 G32", 4096, 4096, "int8"),
             ("int8 w8a16 2048x1536 G32 (packed)", 2048, 1536, "int8")]
    for name, N, K, kind in cases:
        w = torch.randn(N, K, generator=gen) * 0.02
        lin = torch.nn.Linear(K, N, bias=False)
        lin.weight.data = w
        x = torch.randn(1, K, generator=gen)
        mods = {}
        for huge in (False, True):
            CL.HUGEPAGES = huge
            copies = []
            for _ in range(max(2, (96 << 20) // (N * K // (2 if kind == "int4" else 1)))):
                if kind == "int4":
                    m = Int4Linear.from_linear(lin, group_size=32)
                    m.scales = m.scales.half().float()
                    m.offsets = m.offsets.half().float()
                else:
                    m = Int8Linear.from_linear(lin, group_size=32, mode="w8a8" if "w8a8" in name else "w8a16")
                m(x)  # prepares (packs)
                copies.append(m)
            mods[huge] = copies
        t = {False: [], True: []}
        for r in range(a.rounds):
            for huge in (False, True):
                m = mods[huge][r % len(mods[huge])]
                t0 = time.perf_counter()
                m(x)
                t[huge].append(time.perf_counter() - t0)
        f, h = statistics.median(t[False]) * 1e6, statistics.median(t[True]) * 1e6
        print(f"{name:34} {f:12.0f} {h:14.0f} {f / h:7.2f}x   (AnonHugePages {meminfo_huge()} kB)", flush=True)
        del mods


if __name__ == "__main__":
    main()
