"""int8_linear: reference vs naive float64 / exact-integer definitions, every backend vs reference,
quantization quality, opcheck, and bad inputs (one test per case, message names the argument)."""
from __future__ import annotations

import pytest
import torch

from llmkern import ops
from _quant_helpers import (DTYPES, TOL, assert_rounded_from, backends, exact_w8a8, make_x, naive_int8_weight,
                            rel_err, sqnr_db, to_backend_device)

# (leading dims of x, N, K, group size G; 0 = per channel). G is any divisor of K for int8 (48, 3 too).
CASES = [
    ((1,), 1, 64, 0),
    ((3,), 33, 96, 32),
    ((17,), 257, 256, 0),
    ((100,), 33, 64, 32),
    ((2, 3), 257, 96, 48),
    ((1,), 257, 4096, 32),
    ((17,), 33, 256, 128),
    ((3,), 1, 96, 3),
]
LAYOUTS = ("contig", "slice", "transposed")


def make_weights(N, K, G, gen):
    """Random int8 q [N, K] over the full int8 range (GGUF Q8_0 may hold -128) and positive fp32 scales."""
    q = torch.randint(-128, 128, (N, K), generator=gen, dtype=torch.int8)
    shape = (N,) if G == 0 else (N, K // G)
    scale = torch.rand(shape, generator=gen) * 0.02 + 1e-3
    return q, scale


def make_case(i, case, dtype, with_bias, seed=0):
    lead, N, K, G = case
    gen = torch.Generator().manual_seed(1000 * i + seed)
    x = make_x(lead, K, dtype, LAYOUTS[i % len(LAYOUTS)], gen)
    q, scale = make_weights(N, K, G, gen)
    bias = torch.randn(N, generator=gen).to(dtype) if with_bias else None
    return x, q, scale, bias


def naive_w8a16(x, q, scale, bias):
    y = x.to(torch.float64) @ naive_int8_weight(q, scale).t()
    return y if bias is None else y + bias.to(torch.float64)


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"{c[0]}x{c[2]}->{c[1]}_g{c[3]}" for c in CASES])
def test_reference_w8a16_vs_naive(i, dtype, with_bias):
    x, q, scale, bias = make_case(i, CASES[i], dtype, with_bias)
    out = ops.int8_linear(x, q, scale, bias, mode="w8a16", backend="reference")
    assert out.dtype == dtype and out.shape == x.shape[:-1] + (q.shape[0],)
    err = rel_err(out, naive_w8a16(x, q, scale, bias))
    assert err <= TOL[dtype], err


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"{c[0]}x{c[2]}->{c[1]}_g{c[3]}" for c in CASES])
def test_reference_w8a8_vs_exact_integers(i, dtype, with_bias):
    """Tight: the reference output is the exact W8A8 value (int64 dot products) rounded once to x's dtype."""
    x, q, scale, bias = make_case(i, CASES[i], dtype, with_bias)
    out = ops.int8_linear(x, q, scale, bias, mode="w8a8", backend="reference")
    assert out.dtype == dtype and out.shape == x.shape[:-1] + (q.shape[0],)
    assert_rounded_from(out, exact_w8a8(x, q, scale, bias), f"w8a8 {CASES[i]} {dtype}")


def test_bias_dtype_may_differ_from_x():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(5, 64, generator=gen).to(torch.bfloat16)
    q, scale = make_weights(33, 64, 32, gen)
    bias = torch.randn(33, generator=gen)  # float32 bias with bf16 x
    for mode in ("w8a16", "w8a8"):
        out = ops.int8_linear(x, q, scale, bias, mode=mode, backend="reference")
        ref = naive_w8a16(x, q, scale, bias) if mode == "w8a16" else exact_w8a8(x, q, scale, bias)
        assert out.dtype == torch.bfloat16
        assert rel_err(out, ref) <= TOL[torch.bfloat16]


# ------------------------------------------------------------------ every backend vs reference

BACKEND_CASES = [((3,), 33, 96, 32), ((17,), 257, 256, 0), ((2, 3), 100, 128, 64), ((1,), 257, 4096, 32),
                 ((100,), 33, 256, 128)]


@pytest.mark.parametrize("mode", ["w8a16", "w8a8"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("i", range(len(BACKEND_CASES)), ids=[f"{c[0]}x{c[2]}->{c[1]}_g{c[3]}" for c in BACKEND_CASES])
@pytest.mark.parametrize("backend", backends("int8_linear"))
def test_backend_vs_reference(backend, i, dtype, mode):
    x, q, scale, bias = to_backend_device(backend, *make_case(i, BACKEND_CASES[i], dtype, with_bias=i % 2 == 0, seed=1))
    with ops.strict():
        out = ops.int8_linear(x, q, scale, bias, mode=mode, backend=backend)
    assert ops.OPS["int8_linear"].last_backend == backend
    ref = ops.int8_linear(x, q, scale, bias, mode=mode, backend="reference")
    assert out.dtype == dtype and out.shape == ref.shape
    err = rel_err(out, ref)
    assert err <= TOL[dtype], f"{backend}: {err}"


@pytest.mark.parametrize("backend", backends("int8_linear"))
def test_backend_nan_in_x_propagates(backend):
    """A NaN in x must show up in the output row (never a silently finite answer)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 64, generator=gen)
    x[2, 5] = float("nan")
    q, scale = make_weights(17, 64, 32, gen)
    x, q, scale = to_backend_device(backend, x, q, scale)
    for mode in ("w8a16", "w8a8"):
        with ops.strict():
            out = ops.int8_linear(x, q, scale, mode=mode, backend=backend)
        assert torch.isnan(out[2]).all(), mode
        assert torch.isfinite(out[[0, 1, 3]]).all(), mode


# ------------------------------------------------------------------ quality and dequantize-then-matmul


def test_sqnr_w8a16_per_channel():
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(257, 1024, generator=gen)
    x = torch.randn(17, 1024, generator=gen)
    q, scale = ops.quantize_int8(w)
    w_db = sqnr_db(w, ops.dequantize_int8(q, scale))
    y_float = x.double() @ w.double().t()
    y16_db = sqnr_db(y_float, ops.int8_linear(x, q, scale, mode="w8a16"))
    y8_db = sqnr_db(y_float, ops.int8_linear(x, q, scale, mode="w8a8"))
    qg, sg = ops.quantize_int8(w, 32)
    g_db = sqnr_db(w, ops.dequantize_int8(qg, sg))
    print(f"\nSQNR int8 per-channel weights {w_db:.1f} dB, group 32 {g_db:.1f} dB; "
          f"outputs W8A16 {y16_db:.1f} dB, W8A8 {y8_db:.1f} dB")
    assert w_db > 40.0
    assert g_db > w_db  # smaller groups: smaller scales, less noise
    assert y16_db > 38.0
    assert y8_db > 30.0


@pytest.mark.parametrize("group", [0, 32])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", backends("int8_linear"))
def test_dequantize_then_matmul(backend, dtype, group):
    """W8A16 against dequantize_int8 + float64 matmul on the same quantized weights: the kernel's own error."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(257, 256, generator=gen)
    x = torch.randn(33, 256, generator=gen).to(dtype)
    q, scale = ops.quantize_int8(w, group)
    ref = x.double() @ ops.dequantize_int8(q, scale).double().t()
    x, q, scale = to_backend_device(backend, x, q, scale)
    with ops.strict():
        out = ops.int8_linear(x, q, scale, mode="w8a16", backend=backend)
    err = rel_err(out, ref)
    # The reference only rounds its float64 result once to x's dtype.
    bound = TOL[dtype] if backend != "reference" else torch.finfo(dtype).eps
    assert err <= bound, err


# ------------------------------------------------------------------ opcheck


@pytest.mark.parametrize("backend", [None] + backends("int8_linear"))
@pytest.mark.parametrize("mode", ["w8a16", "w8a8"])
def test_opcheck(mode, backend):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 64, generator=gen)
    for G, bias in ((0, None), (32, torch.randn(17, generator=gen))):
        q, scale = make_weights(17, 64, G, gen)
        torch.library.opcheck(torch.ops.llmkern.int8_linear.default, (x, q, scale, bias, mode, backend))


# ------------------------------------------------------------------ bad inputs


def _good():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 64, generator=gen)
    q, scale = make_weights(17, 64, 0, gen)
    return x, q, scale, torch.randn(17, generator=gen)


def test_bad_x_rank():
    _, q, s, b = _good()
    with pytest.raises(ValueError, match="x must have rank"):
        ops.int8_linear(torch.tensor(1.0), q, s, b)


def test_bad_weight_rank():
    x, q, s, b = _good()
    with pytest.raises(ValueError, match="weight must have rank 2"):
        ops.int8_linear(x, q.reshape(17, 8, 8), s, b)


def test_bad_k_mismatch():
    x, q, s, b = _good()
    with pytest.raises(ValueError, match="x must have shape"):
        ops.int8_linear(x[:, :48], q, s, b)


def test_bad_x_dtype():
    x, q, s, b = _good()
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.int8_linear(x.to(torch.int32), q, s, b)


def test_bad_weight_dtype():
    x, q, s, b = _good()
    with pytest.raises(TypeError, match="weight must have dtype int8"):
        ops.int8_linear(x, q.to(torch.uint8), s, b)


def test_bad_scale_dtype():
    x, q, s, b = _good()
    with pytest.raises(TypeError, match="weight_scale must have dtype float32"):
        ops.int8_linear(x, q, s.half(), b)


def test_bad_scale_shape():
    x, q, s, b = _good()
    with pytest.raises(ValueError, match="weight_scale must have shape"):
        ops.int8_linear(x, q, torch.ones(18), b)


def test_bad_scale_groups_not_dividing_k():
    x, q, s, b = _good()
    with pytest.raises(ValueError, match="weight_scale has 5 groups"):
        ops.int8_linear(x, q, torch.ones(17, 5), b)


def test_bad_mode():
    x, q, s, b = _good()
    with pytest.raises(ValueError, match="mode must be one of"):
        ops.int8_linear(x, q, s, b, mode="w4a4")


def test_bad_bias_length():
    x, q, s, b = _good()
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.int8_linear(x, q, s, torch.randn(16))


def test_bad_bias_dtype():
    x, q, s, b = _good()
    with pytest.raises(TypeError, match="bias must have dtype"):
        ops.int8_linear(x, q, s, b.to(torch.int64))


def test_bad_mixed_devices():
    x, q, s, b = _good()
    with pytest.raises(ValueError, match="weight is on meta"):
        ops.int8_linear(x, q.to("meta"), s, b)
    with pytest.raises(ValueError, match="bias is on meta"):
        ops.int8_linear(x, q, s, b.to("meta"))


def test_bad_backend_name():
    x, q, s, b = _good()
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.int8_linear(x, q, s, b, backend="vnni")
