"""The extra error of int4_linear's W4A8 modes over W4A16 (docs/notes/cpu-w4a8.md).

Two measurements, printed as a table:
1. Gaussian weights [N, K] quantized to int4 (round to nearest, group G), activations x [M, K] Gaussian and
   heavy-tailed (a few outlier channels, as LLM hidden states have): SQNR in dB of W4A16, W4A8 (a scale
   per row) and W4A8g (a scale per group) outputs against the float matmul, and of W4A8/W4A8g against
   W4A16 (the activation rounding alone).
2. Per layer of the default model (layers 0/10/20/29), on its own activations for a fixed text: W4A8 and
   W4A8g outputs against W4A16 (SQNR), and how far the row maximum stands above the row median.
3. The default model (SmolLM2-135M-Instruct Q4_1 + Q8_0 lm_head) on a fixed prompt: the next-token logits
   of every position with all linears W4A16/W8A16 vs W4A8/W8A8 (SQNR, top-1 agreement), and the greedy
   tokens of a 48-token generation of each.

    PYTHONPATH=. python scripts/w4a8_error.py [--no-model]
"""
from __future__ import annotations

import argparse
import math

import torch

from llmkern import ops


def sqnr(ref, out):
    ref, out = ref.double(), out.double()
    return 10 * math.log10(ref.pow(2).sum().item() / max((ref - out).pow(2).sum().item(), 1e-300))


def synthetic():
    gen = torch.Generator().manual_seed(0)
    print("| weights N x K, G | activations | W4A16 vs float | W4A8 vs float | W4A8g vs float | W4A8 vs W4A16 "
          "| W4A8g vs W4A16 |")
    print("|---|---|---|---|---|---|---|")
    for N, K, G in ((1536, 576, 32), (4096, 4096, 32), (4096, 4096, 128)):
        w = torch.randn(N, K, generator=gen)
        q, s, o = ops.quantize_int4(w, G)
        for kind in ("gaussian", "outliers"):
            x = torch.randn(64, K, generator=gen)
            if kind == "outliers":  # 1% of the channels 20x larger: per-row int8 scales then waste bits
                idx = torch.randperm(K, generator=gen)[: max(1, K // 100)]
                x[:, idx] *= 20
            y = x.double() @ w.double().T
            a16 = ops.int4_linear(x, q, s, o, None, "w4a16", backend="cpu")
            a8 = ops.int4_linear(x, q, s, o, None, "w4a8", backend="cpu")
            a8g = ops.int4_linear(x, q, s, o, None, "w4a8g", backend="cpu")
            print(f"| {N} x {K}, G{G} | {kind} | {sqnr(y, a16):.1f} dB | {sqnr(y, a8):.1f} dB | {sqnr(y, a8g):.1f} dB "
                  f"| {sqnr(a16, a8):.1f} dB | {sqnr(a16, a8g):.1f} dB |")


TEXT = ("The history of astronomy spans thousands of years. Early observers tracked the motions of the Sun, "
        "the Moon and the planets to keep calendars and to navigate. Later, telescopes revealed moons around "
        "Jupiter, the phases of Venus and countless stars in the Milky Way. Today, space telescopes measure the "
        "light of galaxies billions of light years away, and physicists use those measurements to study how the "
        "universe began and how it will evolve.")


def layers():
    from llmkern.models import load_gguf
    from llmkern.nn import Int4Linear

    m, tok = load_gguf(progress=False)
    caps = {}

    def hook(name):
        def f(mod, inp, out):
            caps.setdefault(name, inp[0].detach().reshape(-1, inp[0].shape[-1]).float().clone())  # [M, K]
        return f

    for n, mod in m.named_modules():
        if isinstance(mod, Int4Linear) and n.startswith(("layers.0.", "layers.10.", "layers.20.", "layers.29.")):
            mod.register_forward_hook(hook(n))
    with torch.inference_mode():
        m(torch.tensor([tok.encode(TEXT)]))
    print(f"\nSmolLM2-135M-Instruct, per layer, {next(iter(caps.values())).shape[0]} positions of a fixed text:\n")
    print("| layer | median over rows of max/median abs activation | W4A8 vs W4A16 | W4A8g vs W4A16 |")
    print("|---|---|---|---|")
    for n, x in caps.items():
        mod = m.get_submodule(n)
        args = (mod.qweight, mod.scales, mod.offsets, None)
        y16 = ops.int4_linear(x, *args, "w4a16", backend="cpu")
        ratio = (x.abs().amax(1) / x.abs().median(1).values).median().item()
        r = [sqnr(y16, ops.int4_linear(x, *args, mode, backend="cpu")) for mode in ("w4a8", "w4a8g")]
        print(f"| {n} | {ratio:.0f} | {r[0]:.1f} dB | {r[1]:.1f} dB |")


def model():
    from llmkern.models import generate, load_gguf
    from llmkern.nn import set_linear_modes

    m, tok = load_gguf(progress=False)
    ids = torch.tensor([tok.encode(TEXT)])
    prompts = ["Explain in two sentences why the sky is blue, then name three primary colors.",
               "What is the capital of France?"]
    configs = [("W4A16 + W8A16 (as loaded)", "w4a16", "w8a16"), ("W4A8 + W8A16", "w4a8", "w8a16"),
               ("W4A8g + W8A16", "w4a8g", "w8a16"), ("W4A16 + W8A8", "w4a16", "w8a8"),
               ("W4A8 + W8A8", "w4a8", "w8a8"), ("W4A8g + W8A8 (--act-int8)", "w4a8g", "w8a8")]
    res = {}
    with torch.inference_mode():
        for name, i4, i8 in configs:
            set_linear_modes(m, int4=i4, int8=i8)
            res[name] = (m(ids)[0], [generate(m, tok, p, max_new_tokens=48).tokens[0] for p in prompts],
                         generate(m, tok, prompts[1], max_new_tokens=12).texts[0])
    ref, ref_tokens, _ = res[configs[0][0]]
    print(f"\nSmolLM2-135M-Instruct (Q4_1 layers, Q8_0 lm_head), {ids.shape[1]} positions of a fixed text; "
          "greedy answers of 48 tokens to two fixed prompts:\n")
    print("| linears | logits SQNR vs as loaded | next-token top-1 agreement | greedy tokens equal before the first "
          "difference (prompts 1, 2) | 'What is the capital of France?' |")
    print("|---|---|---|---|---|")
    for name, _, _ in configs:
        logits, tokens, answer = res[name]
        agree = (ref.argmax(-1) == logits.argmax(-1)).float().mean().item()
        same = [next((i for i, (a, b) in enumerate(zip(r, t)) if a != b), min(len(r), len(t)))
                for r, t in zip(ref_tokens, tokens)]
        print(f"| {name} | {sqnr(ref, logits):.1f} dB | {100 * agree:.1f}% | {same[0]} of {len(ref_tokens[0])}, "
              f"{same[1]} of {len(ref_tokens[1])} | {answer!r} |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-model", action="store_true", help="skip the default-model comparison")
    args = p.parse_args()
    torch.manual_seed(0)
    synthetic()
    if not args.no_model:
        layers()
        model()
