"""rms_norm on the "cpu" backend (llmkern._C) against a naive float64 definition written here.

- h = x + residual: one rounding of the exact sum to x's dtype, compared bit for bit.
- y = h / sqrt(mean(h^2) + eps) * weight in float64, rounded once by the kernel: every element within one
  ulp of x's dtype of the float64 value (and the DESIGN relative tolerances).
Outputs are NaN-poisoned (a row the kernel skips stays NaN); 1 and 2 threads (17 x 576 rows and up take
the OpenMP path, 1 row never does); every kernel variant this CPU runs (LLMKERN_CPU_ISA: the AVX-512
row, the portable row), with row lengths that are not a multiple of 16 (masked tails).
"""
import math

import pytest
import torch

import llmkern
from llmkern.ops import OPS, strict

from _attention_helpers import TOL, assert_rel, poisoned_outputs
from _cpu_helpers import ISAS, isa, threads  # noqa: F401 - fixtures

FLOATS = [torch.float32, torch.bfloat16, torch.float16]
MANT = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}


def naive(x, weight, eps, residual=None):
    """float64 y [..., N] and h in x's dtype: h = round(x + residual); y = h / sqrt(sum(h^2) / N + eps) * weight."""
    h = x if residual is None else (x.double() + residual.double()).to(x.dtype)
    h64 = h.double()
    ms = (h64 * h64).sum(-1, keepdim=True) / h.shape[-1]  # [..., 1]
    return h64 / torch.sqrt(ms + eps) * weight.double(), h


def ulp(v, dtype):
    """One ulp of dtype at |v| (float64 tensor); subnormals of fp16 have the fixed ulp 2^-24."""
    e = torch.floor(torch.log2(v.abs().clamp_min(torch.finfo(dtype).tiny)))
    return torch.exp2(e - MANT[dtype]).clamp_min(2.0 ** -24 if dtype == torch.float16 else 0.0)


def assert_close(y, want, dtype):
    """Every element within one ulp of its float64 value (one rounding is half an ulp), and the DESIGN tolerance."""
    assert y.dtype == dtype and y.shape == want.shape and y.is_contiguous()
    assert not torch.isnan(y).any()
    err = (y.double() - want).abs()
    assert (err <= ulp(want, dtype)).all(), f"max error {err.max().item()} beyond one ulp"
    assert_rel(y, want, TOL[dtype])


def run(x, w, eps=1e-6, r=None):
    with strict(), poisoned_outputs():
        res = llmkern.ops.rms_norm(x, w, eps, r, backend="cpu")
    assert OPS["rms_norm"].last_backend == "cpu"
    return res if r is not None else (res, None)


def data(shape, dtype, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("N", [1, 7, 64, 576, 1000])
@pytest.mark.parametrize("M", [1, 3, 17, 100])
def test_matches_naive(M, N, dtype, residual, threads, isa):
    x = data((M, N), dtype, seed=M * N)
    w = (torch.rand(N, generator=torch.Generator().manual_seed(N)) + 0.5).to(dtype)
    r = data((M, N), dtype, seed=M * N + 1, scale=1.0) if residual else None
    y, h = run(x, w, 1e-5, r)
    want, want_h = naive(x, w, 1e-5, r)
    assert_close(y, want, dtype)
    if residual:
        assert h.dtype == dtype and torch.equal(h, want_h), "h must be bit-exact"


@pytest.mark.parametrize("xd,rd,wd", [(torch.bfloat16, torch.float32, torch.float32),
                                      (torch.float32, torch.bfloat16, torch.float16),
                                      (torch.float16, torch.float32, torch.bfloat16)], ids=str)
def test_mixed_dtypes(xd, rd, wd, threads, isa):
    """residual and weight in other dtypes: h still one rounding of the exact sum to x's dtype."""
    x, r = data((17, 576), xd, seed=1), data((17, 576), rd, seed=2)
    w = data((576,), wd, seed=3, scale=1.0)
    y, h = run(x, w, 1e-6, r)
    want, want_h = naive(x, w, 1e-6, r)
    assert_close(y, want, xd)
    assert h.dtype == xd and torch.equal(h, want_h)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_rows_and_leading_dims(dtype, threads, isa):
    """x rows of a wider buffer (a stride, no copy), a 3-d x whose leading dims do not flatten, a transposed
    residual (copied): y and h are contiguous [..., N] all the same."""
    big = data((40, 1200), dtype, seed=4)
    x = big[::2, 100:676]  # [20, 576], row stride 2400
    r = data((576, 20), dtype, seed=5).t()  # last dim not contiguous
    w = data((576,), torch.float32, seed=6, scale=1.0)
    y, h = run(x, w, 1e-6, r)
    want, want_h = naive(x, w, 1e-6, r)
    assert_close(y, want, dtype)
    assert h.is_contiguous() and torch.equal(h, want_h)
    x3 = data((3, 8, 2 * 64), dtype, seed=7)[:, ::2, :64]  # [3, 4, 64]: strides (1024, 256, 1)
    y3, _ = run(x3, w[:64])
    assert y3.shape == (3, 4, 64)
    assert_close(y3, naive(x3, w[:64], 1e-6)[0], dtype)


def test_decode_row_against_torch_rms_norm():
    """[1, 576] fp32 with residual, the decode-step shape: F.rms_norm of h agrees to fp32 rounding."""
    x, r = data((1, 576), torch.float32, seed=8), data((1, 576), torch.float32, seed=9)
    w = data((576,), torch.float32, seed=10, scale=1.0)
    y, h = run(x, w, 1e-5, r)
    assert torch.equal(h, x + r)
    assert_rel(y, torch.nn.functional.rms_norm(x + r, (576,), w, 1e-5), TOL[torch.float32])
    assert_close(y, naive(x, w, 1e-5, r)[0], torch.float32)


def test_eps_zero_row_and_nan_row(isa):
    """A zero row with eps > 0 normalizes to 0; a NaN in a row makes that row NaN and no other."""
    x = data((4, 64), torch.float32, seed=11)
    x[1] = 0.0
    x[2, 5] = float("nan")
    w = data((64,), torch.float32, seed=12)
    y, _ = run(x, w, 1e-3)
    assert torch.equal(y[1], torch.zeros(64))
    assert torch.isnan(y[2]).all()
    keep = torch.tensor([0, 3])
    assert_close(y[keep], naive(x[keep], w, 1e-3)[0], torch.float32)


def test_scale_invariance_with_eps_zero(isa):
    """eps = 0: scaling x by 2^k (exact) leaves y unchanged bit for bit (the float64 sum scales exactly)."""
    x, w = data((5, 1000), torch.float32, seed=13), data((1000,), torch.float32, seed=14)
    y1, _ = run(x, w, 0.0)
    y2, _ = run(x * 1024.0, w, 0.0)
    assert torch.equal(y1, y2)


def test_empty_rows_fall_back_in_strict_mode():
    x, w = torch.randn(3, 0), torch.randn(0)
    with strict(), pytest.raises(RuntimeError, match="strict mode forbids"):
        llmkern.ops.rms_norm(x, w, backend="cpu")


def test_launcher_rejects_bad_arguments():
    mod = llmkern._backends.cpu_module()
    x, w, y = torch.randn(2, 8), torch.randn(8), torch.empty(2, 8)
    args = dict(x_ptr=x.data_ptr(), x_dtype=0, x_stride=8, residual_ptr=0, r_dtype=0, r_stride=0,
                weight_ptr=w.data_ptr(), w_dtype=0, y_ptr=y.data_ptr(), h_ptr=0, M=2, N=8, eps=1e-6, num_threads=1)
    mod.rms_norm(**args)
    assert_close(y, naive(x, w, 1e-6)[0], torch.float32)
    for bad, msg in [(dict(x_dtype=3), "x_dtype"), (dict(w_dtype=-1), "w_dtype"), (dict(x_stride=7), "x_stride"),
                     (dict(N=0), "N >= 1"), (dict(eps=-1.0), "eps"), (dict(eps=math.inf), "eps"),
                     (dict(num_threads=0), "num_threads"), (dict(y_ptr=0), "y_ptr is a null pointer"),
                     (dict(x_ptr=x.data_ptr() + 2), "x_ptr is not aligned"),
                     (dict(residual_ptr=x.data_ptr(), r_stride=8), "h_ptr is a null pointer"),
                     (dict(residual_ptr=x.data_ptr(), r_stride=8, r_dtype=5, h_ptr=y.data_ptr()), "r_dtype")]:
        with pytest.raises(ValueError, match=msg):
            mod.rms_norm(**{**args, **bad})
