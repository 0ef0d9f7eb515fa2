"""Bandwidth of the CUDA decode_attention against the GPU's measured copy bandwidth (the issue's target:
paged decode, batch >= 32, context >= 4096: >= 80% of copy bandwidth). One GPU, a few seconds:

    python scripts/bench_decode_cuda.py [--splits N]

Prints, per case, time, K/V bytes read per call, GB/s and the fraction of `y.copy_(x)` bandwidth
(bytes counted once each way), plus the split count the adapter chose. Every sequence has the full
context; the cache is paged (block 16, shuffled blocks) or contiguous, bf16 or int8.
"""
from __future__ import annotations

import argparse
import sys

import torch

import llmkern
import llmkern.ops  # noqa: F401

DA = sys.modules["llmkern.ops.decode_attention"]


def timed(fn, iters=20):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


def copy_gbs():
    x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    return 2 * x.numel() / timed(lambda: y.copy_(x)) / 1e9


def case(B, L, Hq, Hk, D, layout, cache):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, Hq, D, device="cuda", generator=g).to(torch.bfloat16)
    bs = 16
    if layout == "paged":
        nblocks = B * L // bs
        shape = (nblocks, bs, Hk, D)
        table = torch.randperm(nblocks, device="cuda").to(torch.int32).view(B, L // bs)
    else:
        shape, table = (B, L, Hk, D), None
    if cache == "int8":
        kc = torch.randint(-127, 128, shape, dtype=torch.int8, device="cuda")
        vc = torch.randint(-127, 128, shape, dtype=torch.int8, device="cuda")
        ks = torch.rand(shape[:3], device="cuda") / 64
        vs = torch.rand(shape[:3], device="cuda") / 64
        nbytes = 2 * (kc.numel() + 4 * ks.numel())
    else:
        kc = torch.randn(shape, device="cuda", generator=g).to(torch.bfloat16)
        vc = torch.randn(shape, device="cuda", generator=g).to(torch.bfloat16)
        ks = vs = None
        nbytes = 2 * kc.numel() * 2
    lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
    fn = lambda: llmkern.ops.decode_attention(q, kc, vc, lens, block_table=table, k_scale=ks, v_scale=vs,  # noqa: E731
                                              backend="cuda")
    fn()
    assert llmkern.ops.OPS["decode_attention"].last_backend == "cuda"
    rows = (Hq // Hk)
    ns = DA.cuda_num_splits(B, Hk, rows, L, torch.cuda.get_device_properties(0).multi_processor_count)
    return timed(fn), nbytes, ns


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--splits", type=int, default=None, help="force this split count")
    args = ap.parse_args()
    DA.CUDA_FORCE_SPLITS = args.splits
    cgbs = copy_gbs()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {cgbs:.0f} GB/s")
    print(f"{'case':44s} {'us':>8s} {'MB':>8s} {'GB/s':>7s} {'of copy':>8s} splits")
    for name, (Hq, Hk, D) in (("llama3-8b", (32, 8, 128)), ("smollm2", (9, 3, 64))):
        for B, L in ((1, 4096), (8, 4096), (32, 4096), (64, 4096), (32, 8192)):
            for layout in ("paged", "contiguous"):
                for cache in ("bf16", "int8"):
                    if cache == "int8" and layout == "contiguous":
                        continue
                    t, nb, ns = case(B, L, Hq, Hk, D, layout, cache)
                    gbs = nb / t / 1e9
                    tag = f"{name} B{B} L{L} {layout} {cache}"
                    print(f"{tag:44s} {t * 1e6:8.1f} {nb / 1e6:8.1f} {gbs:7.0f} {gbs / cgbs:8.1%} {ns}")


if __name__ == "__main__":
    main()
