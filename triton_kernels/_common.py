"""Helpers shared by the Triton kernels: block sizes, dtype names, exact int8 rounding, launch context.

Kernels never allocate: launchers (one per op, in <op>.py) take torch tensors, allocate outputs and
workspaces with torch, pick a config by shape and launch.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Triton signature type names, used by the compile report (ASTSource signatures).
TL_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int8: "i8",
           torch.uint8: "u8", torch.int32: "i32", torch.int64: "i64"}


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (kernels run on the CPU: small blocks keep the interpreter fast)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def pow2(n: int, lo: int = 1) -> int:
    """The power of two >= max(n, lo)."""
    return max(triton.next_power_of_2(max(int(n), 1)), lo)


def capability(t: torch.Tensor) -> int:
    """sm version of t's GPU as 80/90/...; 80 in the interpreter (its configs are the conservative ones)."""
    if t.device.type != "cuda":
        return 80
    major, minor = torch.cuda.get_device_capability(t.device)
    return major * 10 + minor


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs must meet the fp32 tolerance (1e-5), so their dots run in IEEE fp32, not tf32."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def round_half_even(x):
    """Round fp32 x (|x| < 2^22) to the nearest integer, ties to even, in the current rounding mode.

    Adding 1.5 * 2^23 pushes the fraction bits out of the significand, so the add itself rounds (to
    nearest even, IEEE default); subtracting it back is exact. Works in the interpreter and compiled
    (Triton does not reassociate float adds).
    """
    return (x + 12582912.0) - 12582912.0


@triton.jit
def quant_int8_rows(x, AXIS: tl.constexpr):
    """Symmetric int8 quantization of fp32 x along AXIS (llmkern/ops/quant.py's rule, bit-exact).

    amax = max|x|, scale = amax / 127, q = clamp(round_half_even(x * (127 / amax)), -127, 127),
    both divisions IEEE (div_rn); amax 0 gives scale 0 and q 0. Returns (q as fp32, scale).
    """
    # NaN anywhere along AXIS gives a NaN scale, as the reference's max does (tl.max drops NaNs on a GPU: fmaxf).
    has_nan = tl.max((x != x).to(tl.int32), axis=AXIS) > 0
    amax = tl.where(has_nan, float("nan"), tl.max(tl.abs(x), axis=AXIS))
    c127 = tl.full(amax.shape, 127.0, tl.float32)
    scale = tl.math.div_rn(amax, c127)
    inv = tl.where(amax > 0, tl.math.div_rn(c127, tl.where(amax > 0, amax, 1.0)), 0.0)
    p = x * tl.expand_dims(inv, AXIS)
    # NaN products (a NaN / inf row: x * 0; a subnormal amax: 127 / amax is inf and 0 * inf) are 0, as the
    # reference's nan_to_num makes them; tl.maximum would turn them into -127 on a GPU (fmaxf drops NaN).
    p = tl.where(p == p, p, 0.0)
    q = round_half_even(tl.minimum(tl.maximum(p, -127.0), 127.0))
    return q, scale


@triton.jit
def tanh_f32(x):
    """tanh in fp32 from exp2 (tl has no portable tanh). |x| >= 0.125: 1 - 2 / (exp(2x) + 1). |x| < 0.125, where
    that form cancels (a softcap of 1000 has |x| ~ 1e-3: 2e-5 relative error in the scores, found by fuzzing):
    the odd Taylor series to x^7 (first dropped term < 2e-10 absolute). NaN stays NaN."""
    e = tl.exp2(tl.minimum(x, 40.0) * 2.8853900817779268)  # exp(2x); capped so that large x gives 1
    big = 1.0 - 2.0 / (e + 1.0)
    x2 = x * x
    small = x * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * -0.05396825396825397)))
    return tl.where(tl.abs(x) < 0.125, small, big)
