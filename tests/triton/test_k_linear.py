"""Triton int4_linear (W4A16) and int8_linear (W8A8, W8A16) against the float64 reference.

Runs on a GPU, or on the CPU under TRITON_INTERPRET=1 (test_interpreter.py): tiny odd shapes (M 1/3/17,
N 1/33), fp32/fp16 (bf16 only on a GPU), bias or not, strided x, split-K forced on and off, outputs
NaN-poisoned (the launchers take an `out` buffer), W8A8 row quantization bit-exact.
"""
import pytest

pytest.importorskip("triton", reason="triton not installed")

import torch  # noqa: E402

from llmkern import reference  # noqa: E402
from llmkern.reference.quant import quantize_rows_int8  # noqa: E402
from triton_testutil import call, dtypes, import_triton_kernels, rel_err, require_kernel_device, tol  # noqa: E402

DEV = require_kernel_device()
import_triton_kernels()
from llmkern.triton_kernels import int4_linear as t4  # noqa: E402
from llmkern.triton_kernels import int8_linear as t8  # noqa: E402


def _x(shape, K, layout, dtype, g):
    """Random x [*shape, K] in a layout: contiguous, rows with padding (row stride K + 8: strided view
    kept by the launcher), or every other column (unit stride lost: the launcher copies)."""
    if layout == "contiguous":
        x = torch.randn(*shape, K, generator=g)
    elif layout == "padded_rows":
        x = torch.randn(*shape, K + 8, generator=g)[..., :K]
    else:
        x = torch.randn(*shape, 2 * K, generator=g)[..., ::2]
    return x.to(dtype).to(DEV)


def _poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEV)


# (lead shape of x, N, K, group, bias, x layout, split_k for the launcher: None = its own choice)
INT4_CASES = [
    ((1,), 33, 128, 32, True, "contiguous", None),  # decode: split-K by default
    ((3,), 1, 128, 64, False, "every_other", 1),  # split-K off
    ((3,), 33, 128, 128, True, "padded_rows", 3),  # split-K on (3 splits of one block each here)
    ((17,), 33, 128, 32, True, "contiguous", 2),
    ((2, 3), 33, 128, 64, False, "padded_rows", None),  # [2, 3, K] -> 6 rows through a strided view
]


@pytest.mark.parametrize("dtype", dtypes(DEV))
@pytest.mark.parametrize("case", INT4_CASES, ids=lambda c: f"M{c[0]}-N{c[1]}-G{c[3]}-bias{c[4]}-{c[5]}-split{c[6]}")
def test_int4_linear(dtype, case):
    lead, N, K, G, has_bias, layout, split_k = case
    g = torch.Generator().manual_seed(40 + N + G)
    x = _x(lead, K, layout, dtype, g)
    qw = torch.randint(0, 256, (N, K // 2), generator=g, dtype=torch.uint8).to(DEV)  # every nibble value
    sc = (torch.rand(N, K // G, generator=g) / 8 + 0.01).to(DEV)
    of = (-torch.rand(N, K // G, generator=g)).to(DEV)
    bias = torch.randn(N, generator=g).to(dtype).to(DEV) if has_bias else None
    ref = reference.int4_linear(x.double(), qw, sc, of, None if bias is None else bias.double())
    out = t4.int4_linear(x, qw, sc, of, bias, split_k=split_k, out=_poisoned(lead + (N,), dtype))
    assert out.shape == lead + (N,) and out.dtype == dtype
    assert rel_err(out, ref) <= tol(dtype)
    if DEV == "cuda":  # through the op too (strict: the triton backend must run)
        assert rel_err(call("int4_linear", "int4_linear.int4_linear", x, qw, sc, of, bias), ref) <= tol(dtype)


def test_int4_config_splits_small_m_only():
    """The config table: split-K for M <= 16 with many K steps, never for large M; splits cover K."""
    c = t4.config(1, 4096, 4096, torch.float16, num_sms=132)
    assert c["splits"] > 1 and c["splits"] * c["split_len"] >= 4096 > (c["splits"] - 1) * c["split_len"]
    assert t4.config(4096, 4096, 4096, torch.float16)["splits"] == 1


# (lead shape, N, K, weight groups per row (0 = per channel), bias, x layout)
INT8_CASES = [
    ((1,), 33, 64, 0, True, "contiguous"),
    ((3,), 1, 96, 0, False, "every_other"),
    ((17,), 33, 96, 3, True, "padded_rows"),  # G = 32
    ((3,), 33, 64, 1, False, "contiguous"),  # one group of 64
]


def _int8_inputs(case, dtype, seed):
    lead, N, K, ng, has_bias, layout = case
    g = torch.Generator().manual_seed(seed)
    x = _x(lead, K, layout, dtype, g)
    w = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8).to(DEV)  # -128 as in GGUF Q8_0
    ws = (torch.rand(*((N, ng) if ng else (N,)), generator=g) / 50 + 1e-3).to(DEV)
    bias = torch.randn(N, generator=g).to(dtype).to(DEV) if has_bias else None
    return x, w, ws, bias


@pytest.mark.parametrize("dtype", dtypes(DEV))
@pytest.mark.parametrize("mode", ["w8a16", "w8a8"])
@pytest.mark.parametrize("case", INT8_CASES, ids=lambda c: f"M{c[0]}-N{c[1]}-K{c[2]}-g{c[3]}-bias{c[4]}-{c[5]}")
def test_int8_linear(dtype, mode, case):
    x, w, ws, bias = _int8_inputs(case, dtype, 80 + case[1] + case[3])
    N = w.shape[0]
    ref = reference.int8_linear(x.double(), w, ws, None if bias is None else bias.double(), mode)
    out = t8.int8_linear(x, w, ws, bias, mode, out=_poisoned(x.shape[:-1] + (N,), dtype))
    assert out.shape == x.shape[:-1] + (N,) and out.dtype == dtype
    assert rel_err(out, ref) <= tol(dtype)
    if mode == "w8a8":
        # The integer part is exact, so only the fp32 epilogue (scale products, bias add) and the final
        # rounding to x's dtype separate the kernel from the float64 reference.
        assert rel_err(out, ref) <= (1e-6 if dtype == torch.float32 else 1e-3)
    if DEV == "cuda":
        assert rel_err(call("int8_linear", "int8_linear.int8_linear", x, w, ws, bias, mode), ref) <= tol(dtype)


@pytest.mark.parametrize("dtype", dtypes(DEV))
def test_quantize_rows_bit_exact(dtype):
    """The fused row quantization is quantize_rows_int8 bit for bit: odd K over several kernel steps, an
    all-zero row (scale 0, q 0), and a row of exact ties (amax 127: x * 1 = k + 0.5 rounds to even)."""
    g = torch.Generator().manual_seed(9)
    K = t8.QUANT_BLOCK + 37 if DEV == "cuda" else 100
    x = torch.randn(4, K, generator=g) * 3
    x[1] = 0
    x[2] = torch.arange(K) % 9 - 4.5  # ties: -4.5 .. 3.5
    x[2, 0] = 127.0  # amax 127 -> 127 / amax = 1 exactly
    x = x.to(dtype).to(DEV)
    q, s = t8.quantize_rows(x)
    qr, sr = quantize_rows_int8(x.cpu())
    assert torch.equal(q.cpu(), qr) and torch.equal(s.cpu(), sr)
    assert torch.all(q[1] == 0) and s[1] == 0
    # -3.5 -2.5 -1.5 -0.5 0.5 1.5 2.5 3.5 -4.5 (exact in fp16 too) -> ties to even.
    assert torch.equal(q[2, 1:10].cpu().long(), torch.tensor([-4, -2, -2, 0, 0, 2, 2, 4, -4]))


def test_quantize_rows_nan_gives_a_nan_scale():
    """A NaN in a row (in the second kernel step on a GPU) gives that row a NaN scale, as the reference's max
    does: on a GPU tl.max / tl.maximum drop NaNs (fmaxf), which made W8A8 answer a finite row (H200,
    2026-11-29). The interpreter's numpy max keeps NaNs: this guards the GPU."""
    K = t8.QUANT_BLOCK + 37 if DEV == "cuda" else 100
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(4))
    x[1, K - 2] = float("nan")
    q, s = t8.quantize_rows(x.to(DEV))
    assert torch.isnan(s[1]) and torch.isfinite(s[[0, 2]]).all()


def test_w8a8_refuses_groups_not_multiple_of_32():
    x, w, ws, _ = _int8_inputs(((3,), 5, 96, 2, False, "contiguous"), torch.float32, 1)  # G = 48
    with pytest.raises(t8.Unsupported, match="multiples of 32"):
        t8.int8_linear(x, w, ws, None, "w8a8")
    # W8A16 takes any group size.
    ref = reference.int8_linear(x.double(), w, ws, None, "w8a16")
    assert rel_err(t8.int8_linear(x, w, ws, None, "w8a16"), ref) <= 1e-5


@pytest.mark.parametrize("dtype", dtypes(DEV))
def test_gpu_tile_configs(dtype, monkeypatch):
    """The GPU tile table under the interpreter too (it picks small tiles there): BLOCK_K 64/128 holds
    several int4 groups of 32 (the broadcast scale path), split-K of the decode config, and the
    BLOCK_K reduction to a divisor of the int8 group."""
    monkeypatch.setattr(t4, "interpreting", lambda: False)
    monkeypatch.setattr(t8, "interpreting", lambda: False)
    g = torch.Generator().manual_seed(11)
    M, N, K, G = 3, 65, 512, 32
    x = torch.randn(M, K, generator=g).to(dtype).to(DEV)
    qw = torch.randint(0, 256, (N, K // 2), generator=g, dtype=torch.uint8).to(DEV)
    sc = (torch.rand(N, K // G, generator=g) / 8 + 0.01).to(DEV)
    of = (-torch.rand(N, K // G, generator=g)).to(DEV)
    assert t4.config(M, N, K, dtype)["BLOCK_K"] > G and t4.config(M, N, K, dtype)["splits"] > 1
    out = t4.int4_linear(x, qw, sc, of, None, out=_poisoned((M, N), dtype))
    assert rel_err(out, reference.int4_linear(x.double(), qw, sc, of, None)) <= tol(dtype)
    w = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8).to(DEV)
    ws = (torch.rand(N, K // 32, generator=g) / 50 + 1e-3).to(DEV)
    for mode in ("w8a16", "w8a8"):
        out = t8.int8_linear(x, w, ws, None, mode, out=_poisoned((M, N), dtype))
        assert rel_err(out, reference.int8_linear(x.double(), w, ws, None, mode)) <= tol(dtype)
