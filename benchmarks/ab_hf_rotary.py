"""A/B: a `llmkern.patch`ed transformers SmolLM2-135M decode step with and without the routed attention
forward (llmkern rotary fused into the LlmkernCache append, models/hf_attention.py), interleaved.

Not a pytest benchmark: a same-process comparison on a noisy machine. "before" is the patch with the
routed forwards removed (`hf_attention.unroute`): transformers' attention module with its own rotary,
llmkern's attention function and LlmkernCache, i.e. the patch as it was before the routing existed.
"after" is the full patch. One model (loaded from the SmolLM2 GGUF like benchmarks/bench_generate.py,
`patch(quant=...)`), the routing toggled between rounds; each round rebuilds a fresh cache (untimed:
prefill CTX-1 tokens, one decode step) then times STEPS decode steps one by one, at contexts CTX..CTX+STEPS-1,
variants in alternating order; medians over every timed step. Usage:
  PYTHONPATH=. python benchmarks/ab_hf_rotary.py --threads 1 [--rounds 40] [--steps 8] [--ctx 64] [--quant int8]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--ctx", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--quant", default="int8", choices=["none", "int8", "int4"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import transformers

    from llmkern.models import default_model_path, patch
    from llmkern.models.gguf_loader import load_gguf
    from llmkern.models.hf_attention import route, unroute
    from llmkern.models.hf_cache import new_cache

    path = default_model_path()
    _, tok = load_gguf(path, progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    patch(model, quant=args.quant)
    undo, impl, routed, hooks = model._llmkern_undo
    text = "The quick brown fox jumps over the lazy dog. " * (args.ctx // 4 + 8)
    ids = torch.tensor([tok.encode(text)[:args.ctx + args.steps]])  # [1, ctx + steps]
    C = args.ctx

    def set_variant(name):
        nonlocal routed
        if name == "before" and routed:
            unroute(routed)
            routed = []
        elif name == "after" and not routed:
            routed = route(model, None, impl)
        model._llmkern_undo = (undo, impl, routed, hooks)

    def one(name):
        set_variant(name)
        cache = new_cache()
        model(ids[:, :C - 1], cache=cache, use_cache=True)
        model(ids[:, C - 1:C], cache=cache, use_cache=True)
        dts, outs = [], []
        for i in range(C, C + args.steps):
            t0 = time.perf_counter()
            out = model(ids[:, i:i + 1], cache=cache, use_cache=True, logits_to_keep=1).logits
            dts.append(time.perf_counter() - t0)
            outs.append(out)
        return dts, torch.cat(outs, dim=1)

    times = {"before": [], "after": []}
    with torch.inference_mode():
        _, a = one("before")
        _, b = one("after")
        err = ((a - b).norm() / a.norm()).item()
        for r in range(args.rounds):
            order = ("before", "after") if r % 2 == 0 else ("after", "before")
            for name in order:
                times[name] += one(name)[0]
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"SmolLM2-135M patched (quant={args.quant}) decode step @ctx {C}..{C + args.steps - 1}, "
          f"{args.threads} thread(s), {args.rounds} interleaved rounds x {args.steps} steps; "
          f"logits rel diff after/before {err:.2e}")
    for k in ("before", "after"):
        v = sorted(times[k])
        print(f"  {k:6s} median {med[k]:.3f} ms  (q1 {v[len(v) // 4] * 1e3:.3f}, q3 {v[3 * len(v) // 4] * 1e3:.3f})")
    print(f"  speedup {med['before'] / med['after']:.3f}x")


if __name__ == "__main__":
    main()
