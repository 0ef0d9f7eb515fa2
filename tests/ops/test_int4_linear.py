"""int4_linear: reference vs a naive float64 definition, every backend vs reference, quantization
quality, opcheck, and bad inputs (one test per case, message names the argument)."""
from __future__ import annotations

import pytest
import torch

from llmkern import ops
from _quant_helpers import (DTYPES, TOL, backends, make_x, naive_int4_weight, rel_err, sqnr_db,
                            to_backend_device)

# (leading dims of x, N, K, group size G in {32, 64, 128})
CASES = [
    ((1,), 1, 64, 32),
    ((3,), 33, 96, 32),
    ((17,), 257, 256, 64),
    ((100,), 33, 128, 128),
    ((2, 3), 257, 384, 128),
    ((1,), 257, 4096, 32),
    ((17,), 1, 192, 64),
]
LAYOUTS = ("contig", "slice", "transposed")
IDS = [f"{c[0]}x{c[2]}->{c[1]}_g{c[3]}" for c in CASES]


def make_weights(N, K, G, gen):
    """Random canonical int4: every nibble value, positive scales, offsets of either sign (GGUF-like)."""
    qweight = torch.randint(0, 256, (N, K // 2), generator=gen, dtype=torch.uint8)
    scales = torch.rand(N, K // G, generator=gen) * 0.02 + 1e-3
    offsets = -8 * scales + torch.randn(N, K // G, generator=gen) * 0.01
    return qweight, scales, offsets


def make_case(i, case, dtype, with_bias, seed=0):
    lead, N, K, G = case
    gen = torch.Generator().manual_seed(1000 * i + seed)
    x = make_x(lead, K, dtype, LAYOUTS[i % len(LAYOUTS)], gen)
    qweight, scales, offsets = make_weights(N, K, G, gen)
    bias = torch.randn(N, generator=gen).to(dtype) if with_bias else None
    return x, qweight, scales, offsets, bias


def naive(x, qweight, scales, offsets, bias):
    y = x.to(torch.float64) @ naive_int4_weight(qweight, scales, offsets).to(torch.float64).t()
    return y if bias is None else y + bias.to(torch.float64)


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("i", range(len(CASES)), ids=IDS)
def test_reference_vs_naive(i, dtype, with_bias):
    x, qw, s, o, bias = make_case(i, CASES[i], dtype, with_bias)
    out = ops.int4_linear(x, qw, s, o, bias, backend="reference")
    assert out.dtype == dtype and out.shape == x.shape[:-1] + (qw.shape[0],)
    err = rel_err(out, naive(x, qw, s, o, bias))
    assert err <= TOL[dtype], err


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("i", range(len(CASES)), ids=IDS)
@pytest.mark.parametrize("backend", backends("int4_linear"))
def test_backend_vs_reference(backend, i, dtype):
    x, qw, s, o, bias = to_backend_device(backend, *make_case(i, CASES[i], dtype, with_bias=i % 2 == 0, seed=1))
    with ops.strict():
        out = ops.int4_linear(x, qw, s, o, bias, backend=backend)
    assert ops.OPS["int4_linear"].last_backend == backend
    ref = ops.int4_linear(x, qw, s, o, bias, backend="reference")
    assert out.dtype == dtype and out.shape == ref.shape
    err = rel_err(out, ref)
    assert err <= TOL[dtype], f"{backend}: {err}"


@pytest.mark.parametrize("backend", backends("int4_linear"))
def test_backend_nan_in_x_propagates(backend):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 64, generator=gen)
    x[1, 40] = float("nan")
    qw, s, o = make_weights(17, 64, 32, gen)
    x, qw, s, o = to_backend_device(backend, x, qw, s, o)
    with ops.strict():
        out = ops.int4_linear(x, qw, s, o, backend=backend)
    assert torch.isnan(out[1]).all()
    assert torch.isfinite(out[[0, 2, 3]]).all()


def test_sqnr_int4_g32():
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(257, 1024, generator=gen)
    x = torch.randn(17, 1024, generator=gen)
    db = {}
    for G in (32, 64, 128):
        qw, s, o = ops.quantize_int4(w, G)
        db[G] = sqnr_db(w, ops.dequantize_int4(qw, s, o))
    qw, s, o = ops.quantize_int4(w, 32)
    y_db = sqnr_db(x.double() @ w.double().t(), ops.int4_linear(x, qw, s, o))
    print(f"\nSQNR int4 weights g32 {db[32]:.1f} dB, g64 {db[64]:.1f} dB, g128 {db[128]:.1f} dB; output g32 {y_db:.1f} dB")
    assert db[32] > 20.0
    assert db[32] > db[64] > db[128]
    assert y_db > 19.0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", backends("int4_linear"))
def test_dequantize_then_matmul(backend, dtype):
    """int4_linear against dequantize_int4 + float64 matmul on the same quantized weights."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(257, 256, generator=gen)
    x = torch.randn(33, 256, generator=gen).to(dtype)
    qw, s, o = ops.quantize_int4(w, 32)
    ref = x.double() @ ops.dequantize_int4(qw, s, o).double().t()
    x, qw, s, o = to_backend_device(backend, x, qw, s, o)
    with ops.strict():
        out = ops.int4_linear(x, qw, s, o, backend=backend)
    err = rel_err(out, ref)
    bound = TOL[dtype] if backend != "reference" else torch.finfo(dtype).eps
    assert err <= bound, err


@pytest.mark.parametrize("backend", [None] + backends("int4_linear"))
def test_opcheck(backend):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 128, generator=gen)
    for G, bias in ((32, None), (128, torch.randn(17, generator=gen))):
        qw, s, o = make_weights(17, 128, G, gen)
        for mode in ("w4a16", "w4a8"):
            torch.library.opcheck(torch.ops.llmkern.int4_linear.default, (x, qw, s, o, bias, mode, backend))


# ------------------------------------------------------------------ bad inputs


def _good():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 96, generator=gen)
    qw, s, o = make_weights(17, 96, 32, gen)
    return x, qw, s, o, torch.randn(17, generator=gen)


def test_bad_x_rank():
    _, qw, s, o, b = _good()
    with pytest.raises(ValueError, match="x must have rank"):
        ops.int4_linear(torch.tensor(1.0), qw, s, o, b)


def test_bad_qweight_rank():
    x, qw, s, o, b = _good()
    with pytest.raises(ValueError, match="qweight must have rank 2"):
        ops.int4_linear(x, qw.reshape(17, 3, 16), s, o, b)


def test_bad_k_mismatch():
    x, qw, s, o, b = _good()
    with pytest.raises(ValueError, match="x must have shape"):
        ops.int4_linear(torch.randn(3, 64), qw, s, o, b)


def test_bad_x_dtype():
    x, qw, s, o, b = _good()
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.int4_linear(x.double(), qw, s, o, b)


def test_bad_qweight_dtype():
    x, qw, s, o, b = _good()
    with pytest.raises(TypeError, match="qweight must have dtype uint8"):
        ops.int4_linear(x, qw.to(torch.int8), s, o, b)


def test_bad_scales_dtype():
    x, qw, s, o, b = _good()
    with pytest.raises(TypeError, match="scales must have dtype float32"):
        ops.int4_linear(x, qw, s.to(torch.bfloat16), o, b)


def test_bad_group_size_48():
    x, qw, s, o, b = _good()
    # K = 96 over 2 groups is G = 48, not one of 32/64/128.
    with pytest.raises(ValueError, match=r"group size \(K / scales.shape\[1\]\)"):
        ops.int4_linear(x, qw, s[:, :2].contiguous(), o[:, :2].contiguous(), b)


def test_bad_scales_shape():
    x, qw, s, o, b = _good()
    with pytest.raises(ValueError, match="scales must have shape"):
        ops.int4_linear(x, qw, torch.ones(16, 3), o, b)


def test_bad_offsets_shape():
    x, qw, s, o, b = _good()
    with pytest.raises(ValueError, match="offsets must have shape"):
        ops.int4_linear(x, qw, s, o[:, :1], b)


def test_bad_bias_length():
    x, qw, s, o, b = _good()
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.int4_linear(x, qw, s, o, torch.randn(18))


def test_bad_mixed_devices():
    x, qw, s, o, b = _good()
    with pytest.raises(ValueError, match="offsets is on meta"):
        ops.int4_linear(x, qw, s, o.to("meta"), b)
