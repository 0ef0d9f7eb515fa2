"""Quantize / dequantize / pack ops: exact rounding rules (numpy re-implementations, hand-worked ties),
zero rows and constant groups, pack layout, every backend bit-exact vs reference, opcheck, bad inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from llmkern import ops
from _quant_helpers import DTYPES, backends, group_index, naive_int4_weight, naive_unpack_int4, np_quantize_rows_int8


def np_quantize_int8(w: torch.Tensor, G: int):
    """Symmetric int8 per group of G along K (G = K: per channel), numpy float32: (q [N, K], scale [N, K // G])."""
    N, K = w.shape
    q, scale = np_quantize_rows_int8(w.reshape(N, K // G, G))  # the same rule per group
    return q.reshape(N, K), scale


def np_quantize_int4(w: torch.Tensor, G: int):
    """Asymmetric 4-bit per group in numpy float32: (q uint8 [N, K], scales, offsets [N, K // G])."""
    N, K = w.shape
    a = w.to(torch.float32).numpy().reshape(N, K // G, G)
    mn, mx = a.min(-1), a.max(-1)
    rng = (mx - mn).astype(np.float32)
    scale = (rng / np.float32(15)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(rng > 0, np.float32(15) / rng, np.float32(0)).astype(np.float32)
    q = np.clip(np.rint((a - mn[..., None]) * inv[..., None]), 0, 15).astype(np.uint8)
    return torch.from_numpy(q.reshape(N, K)), torch.from_numpy(scale), torch.from_numpy(mn)


def rand_w(N, K, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(N, K, generator=gen) * 0.05).to(dtype)


# ------------------------------------------------------------------ int8


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,K,group", [(1, 64, 0), (33, 96, 32), (257, 256, 64), (17, 4096, 0), (3, 96, 48)])
def test_quantize_int8_matches_rule(N, K, group, dtype):
    w = rand_w(N, K, dtype, seed=N * K + group)
    q, scale = ops.quantize_int8(w, group, backend="reference")
    nq, ns = np_quantize_int8(w, group or K)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert scale.shape == ((N,) if group == 0 else (N, K // group))
    assert torch.equal(q, nq)
    assert torch.equal(scale.reshape(ns.shape), ns)


def test_quantize_int8_ties_round_half_to_even():
    # amax = 127 makes the reciprocal exactly 1, so q = round(w): x.5 values are ties.
    w = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5, 3.49, -3.51, 0.0]])
    q, scale = ops.quantize_int8(w)
    assert scale.tolist() == [1.0]
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, -2, 126, -126, 3, -4, 0]]


def test_quantize_int8_zero_rows_and_groups():
    w = rand_w(4, 64, torch.float32, seed=1)
    w[1] = 0  # a whole row
    w[2, 32:] = 0  # one group of 32
    q, scale = ops.quantize_int8(w)
    assert scale[1] == 0 and not q[1].any()
    assert (scale[[0, 2, 3]] > 0).all()
    qg, sg = ops.quantize_int8(w, 32)
    assert sg[1].tolist() == [0.0, 0.0] and sg[2, 1] == 0 and sg[2, 0] > 0
    assert not qg[1].any() and not qg[2, 32:].any()
    d = ops.dequantize_int8(qg, sg)
    assert torch.isfinite(d).all() and not d[1].any() and not d[2, 32:].any()


def test_quantize_int8_refuses_nan():
    w = rand_w(3, 64, torch.float32, seed=2)
    w[1, 7] = float("nan")
    with pytest.raises(ValueError, match="w contains NaN or inf"):
        ops.quantize_int8(w)
    w[1, 7] = float("inf")
    with pytest.raises(ValueError, match="w contains NaN or inf"):
        ops.quantize_int8(w, 32)


@pytest.mark.parametrize("group", [0, 32, 3])
def test_dequantize_int8_is_the_fp32_product(group):
    gen = torch.Generator().manual_seed(3)
    q = torch.randint(-128, 128, (33, 96), generator=gen, dtype=torch.int8)
    scale = torch.rand((33,) if group == 0 else (33, 96 // group), generator=gen)
    s = scale[:, None] if group == 0 else scale[:, group_index(96, scale.shape[1])]
    expected = q.to(torch.float32) * s  # fp32 product of the docstring, gathered per column
    assert torch.equal(ops.dequantize_int8(q, scale), expected)


# ------------------------------------------------------------------ int4


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,K,group", [(1, 64, 32), (33, 96, 32), (257, 256, 64), (17, 384, 128), (3, 4096, 32)])
def test_quantize_int4_matches_rule(N, K, group, dtype):
    w = rand_w(N, K, dtype, seed=N * K + group)
    qw, s, o = ops.quantize_int4(w, group, backend="reference")
    nq, ns, no = np_quantize_int4(w, group)
    assert qw.shape == (N, K // 2) and qw.dtype == torch.uint8
    assert torch.equal(naive_unpack_int4(qw).to(torch.uint8), nq)
    assert torch.equal(s, ns) and torch.equal(o, no)


def test_quantize_int4_ties_round_half_to_even():
    # min 0, max 15 make the reciprocal exactly 1, so q = round(w - 0): x.5 values are ties.
    vals = [0.0, 15.0, 0.5, 1.5, 2.5, 13.5, 14.5, 7.5, 8.5, 3.49, 3.51] + [5.0] * 21
    q, s, o = ops.quantize_int4(torch.tensor([vals]), 32)
    assert s.tolist() == [[1.0]] and o.tolist() == [[0.0]]
    assert ops.unpack_int4(q).tolist() == [[0, 15, 0, 2, 2, 14, 14, 8, 8, 3, 4] + [5] * 21]


def test_quantize_int4_constant_groups():
    w = rand_w(3, 96, torch.float32, seed=4)
    w[0, 32:64] = 0.0  # all zeros
    w[1, :32] = -3.25  # constant, non-zero
    qw, s, o = ops.quantize_int4(w, 32)
    q = ops.unpack_int4(qw)
    assert s[0, 1] == 0 and o[0, 1] == 0 and not q[0, 32:64].any()
    assert s[1, 0] == 0 and o[1, 0] == -3.25 and not q[1, :32].any()
    d = ops.dequantize_int4(qw, s, o)
    assert torch.equal(d[0, 32:64], w[0, 32:64]) and torch.equal(d[1, :32], w[1, :32])


def test_quantize_int4_refuses_nan():
    w = rand_w(3, 64, torch.float32, seed=5)
    w[2, 0] = float("nan")
    with pytest.raises(ValueError, match="w contains NaN or inf"):
        ops.quantize_int4(w, 32)


def test_dequantize_int4_is_the_fp32_multiply_add():
    gen = torch.Generator().manual_seed(6)
    qw = torch.randint(0, 256, (17, 128), generator=gen, dtype=torch.uint8)
    s = torch.rand(17, 4, generator=gen)
    o = torch.randn(17, 4, generator=gen)
    assert torch.equal(ops.dequantize_int4(qw, s, o), naive_int4_weight(qw, s, o))


def test_pack_unpack_round_trip_and_layout():
    gen = torch.Generator().manual_seed(7)
    q = torch.randint(0, 16, (33, 96), generator=gen, dtype=torch.uint8)
    packed = ops.pack_int4(q)
    assert packed.shape == (33, 48) and packed.dtype == torch.uint8
    # Byte j = q[2j] (low nibble) | q[2j + 1] << 4, written with Python ints.
    ql = q.tolist()
    expected = [[ql[n][2 * j] + 16 * ql[n][2 * j + 1] for j in range(48)] for n in range(33)]
    assert packed.tolist() == expected
    assert torch.equal(ops.unpack_int4(packed), q)
    allbytes = torch.arange(256, dtype=torch.uint8).reshape(2, 128)
    assert torch.equal(ops.pack_int4(ops.unpack_int4(allbytes)), allbytes)


def test_pack_int4_noncontiguous_input():
    gen = torch.Generator().manual_seed(8)
    q = torch.randint(0, 16, (64, 34), generator=gen, dtype=torch.uint8).t()  # [34, 64] view
    assert torch.equal(ops.unpack_int4(ops.pack_int4(q)), q)


def test_quantize_int4_round_trip_error_bound():
    """Every dequantized weight lies within half a step (plus fp32 rounding) of the original."""
    w = rand_w(33, 256, torch.float32, seed=9)
    qw, s, o = ops.quantize_int4(w, 32)
    err = (ops.dequantize_int4(qw, s, o) - w).abs()
    step = s[:, group_index(256, 8)]
    assert (err <= 0.5 * step * (1 + 1e-5) + 1e-7).all()


# ------------------------------------------------------------------ activations


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_rows_int8_matches_rule(dtype):
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(3, 17, 2 * 96, generator=gen).to(dtype)[..., ::2]  # [3, 17, 96], non-contiguous
    x[1, 4] = 0  # an all-zero row
    q, scale = ops.quantize_rows_int8(x, backend="reference")
    nq, ns = np_quantize_rows_int8(x)
    assert q.shape == (3, 17, 96) and scale.shape == (3, 17)
    assert torch.equal(q, nq) and torch.equal(scale, ns)
    assert scale[1, 4] == 0 and not q[1, 4].any()


# ------------------------------------------------------------------ every backend bit-exact vs reference


def _quant_cases():
    gen = torch.Generator().manual_seed(12)
    w = torch.randn(257, 256, generator=gen) * 0.05
    w[3] = 0
    q8, s8 = ops.quantize_int8(w, 32, backend="reference")
    q4, s4, o4 = ops.quantize_int4(w, 64, backend="reference")
    x = torch.randn(5, 17, 256, generator=gen).to(torch.bfloat16)
    return {
        "quantize_int8": [(w, 0), (w, 32), (w.to(torch.bfloat16), 128)],
        "dequantize_int8": [(q8, s8), (q8, s8[:, 0].contiguous())],
        "quantize_int4": [(w, 32), (w.half(), 64), (w, 128)],
        "dequantize_int4": [(q4, s4, o4)],
        "pack_int4": [(ops.unpack_int4(q4),)],
        "unpack_int4": [(q4,)],
        "quantize_rows_int8": [(x,), (x.float()[:, 3],), (w,)],
    }


QUANT_OPS = ["quantize_int8", "dequantize_int8", "quantize_int4", "dequantize_int4", "pack_int4", "unpack_int4",
             "quantize_rows_int8"]


@pytest.mark.parametrize("op,backend", [(op, b) for op in QUANT_OPS for b in backends(op)])
def test_backend_bit_exact(op, backend):
    fn = getattr(ops, op)
    for args in _quant_cases()[op]:
        with ops.strict():
            out = fn(*args, backend=backend)
        ref = fn(*args, backend="reference")
        outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
        for a, b in zip(outs, refs):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(a, b), f"{op} on {backend} differs from the reference"


@pytest.mark.parametrize("op", QUANT_OPS)
def test_opcheck(op):
    overload = getattr(torch.ops.llmkern, op).default
    for args in _quant_cases()[op][:2]:
        # Keep opcheck quick: the first 9 of the 257 weight rows (x cases are small already).
        small = tuple(a[:9] if isinstance(a, torch.Tensor) and a.shape[0] == 257 else a for a in args)
        torch.library.opcheck(overload, small)


# ------------------------------------------------------------------ bad inputs


def test_bad_int4_group_size_48():
    with pytest.raises(ValueError, match="group_size must be one of"):
        ops.quantize_int4(torch.randn(4, 96), 48)


def test_bad_int8_group_not_dividing_k():
    with pytest.raises(ValueError, match="group_size must be 0 .* or divide K=96"):
        ops.quantize_int8(torch.randn(4, 96), 40)


def test_bad_int4_odd_k():
    with pytest.raises(ValueError, match=r"K \(w.shape\[1\]\) must be even"):
        ops.quantize_int4(torch.randn(4, 33), 32)


def test_bad_quantize_dtype():
    with pytest.raises(TypeError, match="w must have dtype"):
        ops.quantize_int8(torch.randint(0, 5, (4, 64)))


def test_bad_quantize_rank():
    with pytest.raises(ValueError, match="w must have rank 2"):
        ops.quantize_int4(torch.randn(2, 4, 64), 32)


def test_bad_pack_values():
    q = torch.full((2, 8), 3, dtype=torch.uint8)
    q[1, 5] = 16
    with pytest.raises(ValueError, match="q values must be in 0..15"):
        ops.pack_int4(q)


def test_bad_pack_odd_width():
    with pytest.raises(ValueError, match=r"q.shape\[1\] must be even"):
        ops.pack_int4(torch.zeros(2, 7, dtype=torch.uint8))


def test_bad_dequantize_int8_scale_shape():
    with pytest.raises(ValueError, match="scale must have shape"):
        ops.dequantize_int8(torch.zeros(4, 64, dtype=torch.int8), torch.ones(5))


def test_bad_dequantize_int4_offsets_shape():
    with pytest.raises(ValueError, match="offsets must have shape"):
        ops.dequantize_int4(torch.zeros(4, 32, dtype=torch.uint8), torch.ones(4, 2), torch.ones(4, 1))


def test_bad_dequantize_mixed_devices():
    with pytest.raises(ValueError, match="scale is on meta"):
        ops.dequantize_int8(torch.zeros(4, 64, dtype=torch.int8), torch.ones(4, device="meta"))


def test_bad_quantize_rows_rank():
    with pytest.raises(ValueError, match="x must have rank >= 1"):
        ops.quantize_rows_int8(torch.tensor(2.0))
