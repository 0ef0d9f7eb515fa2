"""Shared pieces of the quantized-linear tests: tolerances, error measures, inputs, naive definitions.

The naive definitions here are written from the op docstrings independently of llmkern/reference:
numpy for the rounding rules, explicit index gathers for groups, int64 for integer dot products.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from llmkern import ops

# DESIGN.md: ||out - ref|| / ||ref|| bounds per output dtype.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf when out has NaN/inf (so NaN never passes)."""
    out64, ref64 = out.detach().to(torch.float64).cpu(), ref.detach().to(torch.float64).cpu()
    assert out64.shape == ref64.shape, (out64.shape, ref64.shape)
    if not torch.isfinite(out64).all():
        return math.inf
    den = ref64.norm().item()
    num = (out64 - ref64).norm().item()
    return num / den if den > 0 else num


def sqnr_db(signal: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10 log10(||s||^2 / ||s - a||^2) in dB."""
    s = signal.to(torch.float64)
    noise = (s - approx.to(torch.float64)).pow(2).sum().item()
    return 10 * math.log10(s.pow(2).sum().item() / noise)


def backends(op: str) -> list[str]:
    """Every backend of `op` usable here; picks up "cpu"/"cuda"/"triton" automatically once they exist."""
    return ops.OPS[op].backends_here()


def to_backend_device(backend: str, *tensors):
    """The tensors on the device `backend` runs on (cuda/triton take CUDA tensors, cpu/reference stay on
    the CPU); None stays None. Generic tests build CPU inputs and move them per backend."""
    dev = "cuda" if backend in ("cuda", "triton") else "cpu"
    return tuple(None if t is None else t.to(dev) for t in tensors)


def make_x(lead: tuple, K: int, dtype, layout: str, gen: torch.Generator) -> torch.Tensor:
    """Random x [*lead, K] in `dtype`, laid out as "contig", "slice" (last-dim stride 2) or "transposed"."""
    # Random values are drawn in fp32 and cast before taking the view, so the view keeps its strides.
    if layout == "contig":
        x = torch.randn(*lead, K, generator=gen).to(dtype)
    elif layout == "slice":
        x = torch.randn(*lead, 2 * K, generator=gen).to(dtype)[..., ::2]  # [*lead, 2K] -> every other column
    elif layout == "transposed":
        # [K, M] transposed -> [M, K] with stride (1, M); leading batch dims unflattened from M.
        x = torch.randn(K, math.prod(lead), generator=gen).to(dtype).t()
        x = x.unflatten(0, lead)
    else:
        raise AssertionError(layout)
    assert layout == "contig" or not x.is_contiguous() or math.prod(lead) == 1
    return x


def group_index(K: int, groups: int) -> torch.Tensor:
    """Column k -> its group k // G, G = K / groups (int64 [K])."""
    return torch.arange(K) // (K // groups)


def naive_int8_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float64 [N, K]: q[n, k] * scale[n] or q[n, k] * scale[n, k // G] (exact in float64)."""
    s = scale.to(torch.float64)
    if s.dim() == 1:
        s = s[:, None].expand(q.shape)
    else:
        s = s[:, group_index(q.shape[1], s.shape[1])]  # gather [N, g] -> [N, K]
    return q.to(torch.float64) * s


def naive_unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K / 2] -> int64 [N, K]: q[2j] = low nibble of byte j, q[2j + 1] = high nibble."""
    p = qweight.to(torch.int64)
    q = torch.empty(p.shape[0], 2 * p.shape[1], dtype=torch.int64)
    q[:, 0::2] = p % 16
    q[:, 1::2] = p // 16
    return q


def naive_int4_weight(qweight, scales, offsets) -> torch.Tensor:
    """Canonical dequant as the docstring defines it: fp32 q * scale, then fp32 + offset -> float32 [N, K]."""
    q = naive_unpack_int4(qweight)
    idx = group_index(q.shape[1], scales.shape[1])
    return (q.to(torch.float32) * scales[:, idx]) + offsets[:, idx]


def np_quantize_rows_int8(x: torch.Tensor):
    """The symmetric int8 rule in numpy float32: (q int8 [..., K], scale float32 [...]).

    amax = max|x|, scale = amax / 127, q = clip(rint(x * (127 / amax)), -127, 127) (rint: half to even).
    """
    a = x.detach().to(torch.float32).cpu().numpy()
    amax = np.abs(a).max(axis=-1)
    scale = (amax / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.clip(np.rint(a * inv[..., None]), -127, 127).astype(np.int8)
    return torch.from_numpy(q), torch.from_numpy(scale)


def exact_w8a8(x, q, scale, bias) -> torch.Tensor:
    """W8A8 from its definition: float64 [..., N] from exact int64 per-group dot products."""
    K = q.shape[1]
    N = q.shape[0]
    qx, sx = np_quantize_rows_int8(x.reshape(-1, K))  # [M, K], [M]
    g = 1 if scale.dim() == 1 else scale.shape[1]
    G = K // g
    # [M, g, G] x [N, g, G] -> [M, N, g]: integer sums per group, exact in int64.
    acc = torch.einsum("mgk,ngk->mng", qx.to(torch.int64).reshape(-1, g, G), q.to(torch.int64).reshape(N, g, G))
    sw = scale.to(torch.float64).reshape(N, g)
    y = (acc.to(torch.float64) * sx.to(torch.float64)[:, None, None] * sw[None]).sum(-1)  # [M, N]
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.reshape(*x.shape[:-1], N)


def graph_replay(call, x: torch.Tensor, new_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """call(x) captured in a CUDA graph (after a warm-up call on a side stream), x then overwritten in place with
    new_x and the graph replayed: (the replay's output, call(x) run eagerly afterwards), for bit comparison."""
    st = torch.cuda.Stream()
    st.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(st):
        call(x)
    torch.cuda.current_stream().wait_stream(st)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = call(x)
    x.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    return y, call(x)


def assert_rounded_from(out: torch.Tensor, exact: torch.Tensor, what: str = "") -> None:
    """Every element of out is within one ulp (of out's dtype) of the exact float64 value: tight."""
    eps = torch.finfo(out.dtype).eps
    tiny = torch.finfo(out.dtype).tiny
    o = out.to(torch.float64)
    assert torch.isfinite(o).all(), f"{what}: non-finite output"
    bound = eps * exact.abs() + tiny
    worst = ((o - exact).abs() / bound).max().item()
    assert worst <= 1.0, f"{what}: output is {worst:.3g} x one ulp away from the exact result"


def assert_exact_products(out: torch.Tensor, exact: torch.Tensor, what: str = "") -> None:
    """A kernel whose products are exact and whose sums are fp32 (int4_linear's packed decode kernel): every
    element within one ulp of the exact float64 value plus 2^-20 of the largest one (fp32 sums of terms that
    cancel, such as a group's scale and offset parts)."""
    o = out.to(torch.float64)
    assert torch.isfinite(o).all(), f"{what}: non-finite output"
    bound = torch.finfo(out.dtype).eps * exact.abs() + 2.0 ** -20 * exact.abs().max()
    worst = ((o - exact).abs() / bound).max().item()
    assert worst <= 1.0, f"{what}: {worst:.3g} x the bound away from the exact result"
