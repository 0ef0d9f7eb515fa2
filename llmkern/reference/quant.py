"""Reference (pure PyTorch) quantize / dequantize / pack helpers; see llmkern/ops/quant.py for the rules.

Every rounding step is spelled out in fp32 in the order the op docstrings give, so a fast backend that
follows the same rules matches these functions bit for bit:
- scales are fp32 divisions (amax / 127, (max - min) / 15), reciprocals are fp32 divisions
  (127 / amax, 15 / (max - min)), and q = round_half_even(value * reciprocal) (torch.round);
- dequantization is one fp32 multiply (int8) or one fp32 multiply then one fp32 add (int4), never fused.
"""
import torch


def _can_read_values(t):
    """Values of meta/fake tensors, or of tensors inside torch.compile / CUDA graph capture, can't be read."""
    if t.device.type == "meta" or isinstance(t, torch._subclasses.FakeTensor) or torch.compiler.is_compiling():
        return False
    return not (t.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _require_finite(op, name, t):
    """Quantizing NaN/inf gives meaningless integers silently: refuse (where values can be read)."""
    if _can_read_values(t) and t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"llmkern.{op}: {name} contains NaN or inf; it cannot be quantized")


def _div(a, b):
    """Correctly rounded fp32 a / b, both tensors of one shape.

    Not `127.0 / t` (torch computes a Python-scalar numerator as reciprocal(t) * 127: two roundings) nor
    `t / 127.0` (CUDA multiplies by the scalar's reciprocal): a tensor by tensor division is IEEE exact.
    """
    return torch.div(a, b)


def _symmetric_int8(v):
    """v fp32 [..., G] -> (q int8 [..., G], scale fp32 [...]); the rule of quantize_int8 over the last dim.

    amax = max|v|, scale = amax / 127, q = clamp(round(v * (127 / amax)), -127, 127); amax 0 -> scale 0, q 0.
    """
    if v.shape[-1] == 0:  # empty groups (K = 0): nothing to scale
        return torch.zeros(v.shape, dtype=torch.int8, device=v.device), v.new_zeros(v.shape[:-1])
    amax = v.abs().amax(dim=-1)  # [...]
    c127 = torch.full_like(amax, 127.0)
    scale = _div(amax, c127)
    # where(amax > 0) keeps the all-zero group at q 0 (127 / 0 would be inf, and 0 * inf NaN).
    inv = torch.where(amax > 0, _div(c127, amax), torch.zeros_like(amax))
    q = torch.round(v * inv.unsqueeze(-1)).clamp_(-127, 127)
    # A NaN/inf activation row has a NaN/inf scale, so the output row is NaN/inf whatever q is; pin q
    # to 0 there so that the integer part stays deterministic (the cast of NaN to int8 is undefined).
    q = torch.nan_to_num_(q, nan=0.0)
    return q.to(torch.int8), scale


def quantize_int8(w, group_size):
    """w [N, K] float -> (q int8 [N, K], scale float32 [N] (group_size 0) or [N, K // group_size])."""
    _require_finite("quantize_int8", "w", w)
    N, K = w.shape
    G = K if group_size == 0 else group_size
    w32 = w.to(torch.float32)
    # [N, K] -> [N, K // G, G]; for per channel (G = K) that is [N, 1, K].
    groups = K // G if G else 1
    q, scale = _symmetric_int8(w32.reshape(N, groups, G))
    q = q.reshape(N, K)
    return q, (scale.reshape(N) if group_size == 0 else scale)


def _expand_groups(t, K):
    """Per-group values t [N, g] -> [N, K] (each repeated over its G = K // g columns)."""
    N, g = t.shape
    return t.unsqueeze(-1).expand(N, g, K // g).reshape(N, K)


def dequantize_int8(w, scale):
    """q int8 [N, K], scale float32 [N] or [N, K // G] -> float32 [N, K] = q * scale (one fp32 multiply)."""
    N, K = w.shape
    s = scale.reshape(N, 1) if scale.dim() == 1 else _expand_groups(scale, K)
    return w.to(torch.float32) * s


def quantize_int4(w, group_size):
    """w [N, K] float -> (qweight uint8 [N, K // 2], scales float32 [N, K // G], offsets float32 [N, K // G]).

    Per group of G along K: offset = min, scale = (max - min) / 15,
    q = clamp(round((w - min) * (15 / (max - min))), 0, 15); max == min -> scale 0, q 0.
    """
    _require_finite("quantize_int4", "w", w)
    N, K = w.shape
    G = group_size
    wg = w.to(torch.float32).reshape(N, K // G, G)  # [N, K] -> [N, groups, G]
    mn = wg.amin(dim=-1)  # [N, groups]
    mx = wg.amax(dim=-1)
    rng = mx - mn
    if _can_read_values(rng) and rng.numel() and not bool(torch.isfinite(rng).all()):
        raise ValueError("llmkern.quantize_int4: w has a group whose range max - min overflows float32")
    c15 = torch.full_like(rng, 15.0)
    scale = _div(rng, c15)
    inv = torch.where(rng > 0, _div(c15, rng), torch.zeros_like(rng))
    q = torch.round((wg - mn.unsqueeze(-1)) * inv.unsqueeze(-1)).clamp_(0, 15)
    q = q.to(torch.uint8).reshape(N, K)
    return pack_int4(q), scale, mn


def dequantize_int4(qweight, scales, offsets):
    """Canonical int4 -> float32 [N, K] = q * scale + offset (an fp32 multiply, then an fp32 add)."""
    q = unpack_int4(qweight)  # [N, K]
    K = q.shape[1]
    prod = q.to(torch.float32) * _expand_groups(scales, K)  # separate ops: no fused multiply-add
    return prod + _expand_groups(offsets, K)


def pack_int4(q):
    """q uint8 [N, K] in 0..15 -> uint8 [N, K // 2]: low nibble = q[:, 2j], high nibble = q[:, 2j + 1]."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed):
    """uint8 [N, K // 2] -> q uint8 [N, K] in 0..15 (inverse of pack_int4)."""
    N, half = packed.shape
    # [N, K/2] -> [N, K/2, 2] (low, high) -> [N, K]: element 2j is the low nibble of byte j.
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(N, 2 * half)


def quantize_rows_int8(x):
    """x [..., K] float -> (q int8 [..., K], scale float32 [...]): quantize_int8's rule per row."""
    return _symmetric_int8(x.to(torch.float32))
