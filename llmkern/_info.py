"""`llmkern.info()` / `llmkern info`: what this machine offers (ops x backends, CPU ISA, torch, CUDA, GPU)."""
from __future__ import annotations

import platform

import torch

from . import _backends
from .ops._registry import ALL_BACKENDS, OPS


def info_dict() -> dict:
    """Everything `info()` prints, as data."""
    cpu = _backends.cpu_module()
    cuda = _backends.cuda_module()
    d = {
        "llmkern": __import__("llmkern").__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu": platform.processor() or platform.machine(),
        "cpu_features": cpu.cpu_features() if cpu else {},
        "cpu_isa": _backends.cpu_isa(),
        "bf16_dot_fast": _backends.cpu_bf16_dot_fast(),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "backends": {b: _backends.available(b) for b in ALL_BACKENDS},
        "backend_errors": {
            "cpu": None if cpu else _backends.import_error("llmkern._C"),
            "cuda": (None if cuda else _backends.import_error("llmkern._C_cuda")) or (
                _backends.cuda_kernels_error() if cuda and torch.cuda.is_available() else None),
        },
        "cuda_module": cuda.build_info() if cuda else None,
        "cuda_switches": _cuda_switches() if cuda else None,
        "ops": {name: op.backends_here() for name, op in sorted(OPS.items())},
        "fallbacks": {name: dict(op.fallbacks) for name, op in OPS.items() if op.fallbacks},
    }
    try:
        import triton

        d["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - not installed (CPU machines)
        d["triton"] = None
    return d


def _cuda_switches() -> dict:
    """The CUDA kernel variants with an environment switch and whether each is on: the sm_90a attention and W8A8
    ones and the untimed routes are off by default (their first GPU run timed none of them); the sm_90a int4 GEMM
    and Int4Linear's prepacked int4 kernels are on (LLMKERN_CUDA_INT4_WGMMA=0 / LLMKERN_CUDA_INT4_PACKED=0: off)."""
    import importlib

    att = importlib.import_module("llmkern.ops.attention")
    i8 = importlib.import_module("llmkern.ops.int8_linear")
    i4 = importlib.import_module("llmkern.ops.int4_linear")
    da = importlib.import_module("llmkern.ops.decode_attention")
    return {
        "attention sm_90a (LLMKERN_CUDA_ATTN_WGMMA)": att._CUDA_WGMMA,
        "attention sm_90a intra-warpgroup overlap (LLMKERN_CUDA_ATTN_OVERLAP)": att._CUDA_OVERLAP,
        "attention D=128 wide tiles (LLMKERN_CUDA_ATTN_WIDE)": att._CUDA_WIDE,
        "decode_attention cp.async-pipelined loop (LLMKERN_CUDA_DECODE_PIPELINE)": da.CUDA_DECODE_PIPELINE,
        "decode_attention tensor-core kernel (LLMKERN_CUDA_DECODE_MMA)": da.CUDA_DECODE_MMA,
        "int8_linear W8A8 sm_90a (LLMKERN_CUDA_INT8_WGMMA)": i8.CUDA_W8A8_WGMMA,
        "int4_linear W4A16 sm_90a (LLMKERN_CUDA_INT4_WGMMA=0: off)": i4.CUDA_INT4_WGMMA,
        "int4_linear prefill (M > 16) as dequantize + cuBLAS (LLMKERN_CUDA_PREFILL_CUBLAS)": i4.CUDA_PREFILL_CUBLAS,
        "int4_linear prefill (M > 16) split over K on idle SMs (LLMKERN_CUDA_GEMM_SPLITK=0: off)": i4.CUDA_GEMM_SPLITK,
        "int4_linear W4A16 prepacked, Int4Linear on a GPU (LLMKERN_CUDA_INT4_PACKED)": i4.CUDA_INT4_PACKED,
        "Int4Linear holds the packed copy alone (LLMKERN_CUDA_INT4_KEEP_CANONICAL=1: off)":
            i4.CUDA_INT4_PACKED and i4.CUDA_INT4_RELEASE,
        "generate: decode steps as a CUDA graph (LLMKERN_CUDA_GRAPH=1)": _backends.env("LLMKERN_CUDA_GRAPH") == "1",
        "paged decode steps share their step tensors across layers (LLMKERN_PAGED_STEPS=0: off)":
            _backends.env("LLMKERN_PAGED_STEPS") != "0",
    }


def info(file=None) -> dict:
    """Print and return what llmkern can run here: every op with its usable backends, CPU ISA, torch, GPU."""
    d = info_dict()
    lines = [
        f"llmkern {d['llmkern']}  python {d['python']}  torch {d['torch']} (CUDA {d['torch_cuda']})"
        f"  triton {d['triton']}",
        f"CPU: {d['cpu']}  ISA used: {d['cpu_isa']}  threads: {d['threads']}",
        "CPU features: " + (", ".join(k for k, v in d["cpu_features"].items() if v) or "(llmkern._C missing)")
        + (f"  (bf16 dot products {'fast' if d['bf16_dot_fast'] else 'slow'}: --dtype auto = "
           f"{'bfloat16' if d['bf16_dot_fast'] else 'float32'})" if d["cpu_features"].get("avx512_bf16") else ""),
        f"GPU: {d['gpu'] or 'none'}",
        "backends: " + ", ".join(f"{b}={'yes' if ok else 'no'}" for b, ok in d["backends"].items()),
    ]
    cuda_loaded = d["cuda_module"] is not None
    for name, err in d["backend_errors"].items():
        if err:
            lines.append(f"  {name}: {err}" if name == "cuda" and cuda_loaded else f"  {name} module not loaded: {err}")
    if d["cuda_module"]:
        lines.append(f"llmkern._C_cuda: {d['cuda_module']}")
        lines.append("CUDA variants (environment switches): " + ", ".join(
            f"{k} {'on' if v else 'off'}" for k, v in d["cuda_switches"].items()))
    width = max(len(n) for n in d["ops"])
    lines.append("ops (backends usable here, fastest first on each device):")
    for name, bks in d["ops"].items():
        lines.append(f"  {name:<{width}}  {', '.join(bks)}")
    for name, fb in d["fallbacks"].items():
        for (used, reason), n in fb.items():
            lines.append(f"  fallback: {name} ran on {used} {n}x because {reason}")
    print("\n".join(lines), file=file)
    return d
