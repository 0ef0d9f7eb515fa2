"""Import `llmkern.triton_kernels` (installed, or from a source checkout: llmkern._backends makes that mapping,
never as a top-level `triton_kernels`, a name that belongs to another project shipped with Triton), and say how
kernels can run here.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def import_triton_kernels():
    """Import and return llmkern.triton_kernels (installed, or loaded from REPO/triton_kernels)."""
    from llmkern._backends import _load_source_triton_kernels

    return _load_source_triton_kernels()


def kernel_device() -> str | None:
    """'cuda' on a GPU, 'cpu' under TRITON_INTERPRET=1, else None (kernel tests cannot run here)."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    return None


def require_kernel_device():
    """The device the kernel tests run on here; skips when there is none (see conftest.py)."""
    import pytest

    dev = kernel_device()
    if dev is None:
        pytest.skip("no GPU and TRITON_INTERPRET unset: run under the interpreter by test_interpreter.py",
                    allow_module_level=True)
    return dev


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives inf (NaN never passes)."""
    import torch

    o, r = out.to(torch.float64), ref.to(torch.float64)
    if not bool(torch.isfinite(o).all()):
        return float("inf")
    den = r.norm().item()
    return (o - r).norm().item() / (den if den > 0 else 1.0)


TOL = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 1e-2}


def tol(dtype) -> float:
    return TOL[str(dtype).replace("torch.", "")]


def dtypes(device: str):
    """bf16 arithmetic is wrong in the interpreter: fp32/fp16 on the CPU, all three on a GPU."""
    import torch

    return (torch.float32, torch.float16) + ((torch.bfloat16,) if device == "cuda" else ())


def call(op_name: str, launcher_path: str, *args):
    """Run one op's Triton implementation: through the op (backend="triton", strict) on a GPU, else the
    launcher `llmkern.triton_kernels.<launcher_path>` directly on CPU tensors (the dispatcher never
    routes CPU tensors to triton). Arguments in schema order without `backend`."""
    import torch

    import llmkern.ops as ops
    from llmkern.ops._registry import OPS

    if any(isinstance(a, torch.Tensor) and a.is_cuda for a in args):
        with ops.strict():
            out = OPS[op_name](*args, "triton")
        assert OPS[op_name].last_backend == "triton"
        return out
    tk = import_triton_kernels()
    mod_name, fn_name = launcher_path.split(".")
    mod = __import__(f"llmkern.triton_kernels.{mod_name}", fromlist=[fn_name])
    return getattr(mod, fn_name)(*args)
