"""Interleaved A/B, one process: Int8Linear's W8A16 decode from the canonical tensors (the "stream" kernels,
the preparer's choice for K >= 2048) against the packed copy (LLMKERN_INT8_PACK=1), cold weights (copies
over 4x the L3 cycled), M activation rows, fp32 x.

    OMP_NUM_THREADS=2 python stream_ab.py [--rows 1] [--rounds 15] [--isa avx512_vnni|avx2] [--per-channel]

Prints the median us per call of each and the bytes each holds (canonical only / canonical + packed)."""
import argparse
import importlib
import os
import statistics
import time

import torch

ap = argparse.ArgumentParser()
ap.add_argument("--rows", type=int, default=1)
ap.add_argument("--rounds", type=int, default=15)
ap.add_argument("--isa", default="")
ap.add_argument("--per-channel", action="store_true", help="per-channel scales (quantize_int8's default) and G = 128")
ap.add_argument("--small", action="store_true", help="SmolLM2-135M's shapes (G 32, Q8_0-like fp16 scales; G 16)")
ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="x's dtype")
args = ap.parse_args()
if args.isa:
    os.environ["LLMKERN_CPU_ISA"] = args.isa
I8 = importlib.import_module("llmkern.ops.int8_linear")
torch.manual_seed(0)
# (N, K, G, scales): Llama-2-7B / Llama-3-8B shapes, GGUF Q8_0 (fp16-valued d, G 32) and Q6_K (G 16) scales
SHAPES = [(4096, 4096, 32, "f16"), (4096, 4096, 16, "f32"), (11008, 4096, 32, "f16"), (4096, 11008, 32, "f16"),
          (14336, 4096, 16, "f32"), (4096, 14336, 32, "f16"), (2048, 2048, 32, "f16")]
if args.small:
    SHAPES = [(1536, 576, 32, "f16"), (576, 1536, 32, "f16"), (576, 576, 32, "f16"), (49152, 576, 32, "f16"),
              (576, 1536, 16, "f32"), (2048, 2048, 32, "f16")]
if args.per_channel:
    SHAPES = [(4096, 4096, 0, "f32"), (11008, 4096, 0, "f32"), (4096, 11008, 0, "f32"), (4096, 4096, 128, "f32"),
              (1536, 576, 0, "f32"), (49152, 576, 0, "f32")]


def prepare(w, s, pack):
    os.environ["LLMKERN_INT8_PACK"] = "1" if pack else "0"  # (0: no packed copy, whatever the preparer's rule)
    return I8._cpu_prepare(w, s, None, "w8a16")


for N, K, G, kind in SHAPES:
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    s = torch.rand(N, K // G) * 0.01 + 1e-4 if G else torch.rand(N) * 0.01 + 1e-4
    if kind == "f16":
        s = s.half().float()
    copies = max(2, int(4 * 32e6 / (N * K)))
    ws = [(w.clone(), s.clone()) for _ in range(copies)]
    runs = {"stream": [prepare(a, b, False) for a, b in ws], "packed": [prepare(a, b, True) for a, b in ws]}
    assert runs["stream"][0].packed is None and runs["packed"][0].packed is not None
    x = torch.randn(args.rows, K).to(getattr(torch, args.dtype))
    assert torch.equal(runs["stream"][0](x), runs["packed"][0](x))
    t = {"stream": [], "packed": []}
    for r in range(args.rounds):
        for name in ("stream", "packed") if r % 2 == 0 else ("packed", "stream"):
            rs = runs[name]
            for run in rs[:2]:
                run(x)
            t0 = time.perf_counter()
            for run in rs:
                run(x)
            t[name].append((time.perf_counter() - t0) / len(rs) * 1e6)
    a, b = statistics.median(t["stream"]), statistics.median(t["packed"])
    G = G or K
    held_s = w.numel() + s.numel() * 4
    held_p = held_s + runs["packed"][0].packed.numel()
    print(f"{N}x{K} G{G} {kind} M={args.rows} {args.dtype}: stream {a:.0f} us ({held_s / a / 1e3:.1f} GB/s), packed {b:.0f} us "
          f"({runs['packed'][0].packed.numel() / b / 1e3:.1f} GB/s); stream/packed speed {b / a:.2f}x; "
          f"held {held_s / 1e6:.1f} MB against {held_p / 1e6:.1f} MB", flush=True)
