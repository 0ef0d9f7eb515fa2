"""llmkern.ops.rms_norm (optionally fused with the residual add): reference vs naive float64, every backend
vs the reference, opcheck, bad inputs."""
import math

import pytest
import torch

import llmkern
from llmkern import reference
from llmkern.ops import strict

from _attention_helpers import on_device, run_on, TOL, assert_rel, backends, poisoned_outputs, randn

BACKENDS = backends("rms_norm")

SHAPES = [(1, 64), (3, 17, 576), (257, 80), (5, 1000), (2, 3, 4096)]


def naive_rms_norm(x, weight, eps, residual=None):
    """Row by row in float64: h = round_to_x_dtype(x + residual); y = h / sqrt(mean(h^2) + eps) * weight."""
    h = x if residual is None else (x.double() + residual.double()).to(x.dtype)
    rows = h.double().reshape(-1, h.shape[-1])  # [M, N]
    w = weight.double()
    y = torch.empty_like(rows)
    for i in range(rows.shape[0]):
        r = rows[i]
        ms = math.fsum(a * a for a in r.tolist()) / r.numel()
        y[i] = r / math.sqrt(ms + eps) * w
    return y.reshape(x.shape), h


def _inputs(shape, dtype=torch.float32, wdtype=None, residual=False, layout="contiguous", seed=0):
    torch.manual_seed(seed)
    x = randn(*shape, dtype=dtype, layout=layout) * 3.0  # not unit rms, so the normalization matters
    w = (torch.rand(shape[-1]) + 0.5).to(wdtype or dtype)
    r = randn(*shape, dtype=dtype) if residual else None
    return x, w, r


# ---------------------------------------------------------------- (1) reference vs naive


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_reference_matches_naive(shape, dtype, residual):
    x, w, r = _inputs(shape, dtype, residual=residual)
    y, h = reference.rms_norm(x, w, 1e-6, r)
    ny, nh = naive_rms_norm(x, w, 1e-6, r)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
    assert_rel(y, ny, TOL[dtype])
    if residual:
        assert h.dtype == dtype and torch.equal(h, nh)  # x + residual rounded once to x's dtype
    else:
        assert h.numel() == 0


@pytest.mark.parametrize("eps", [0.0, 1e-5, 1.0])
def test_reference_eps(eps):
    x, w, _ = _inputs((4, 64))
    if eps > 0:
        x[1] = 0.0  # a zero row with eps > 0 normalizes to 0, not NaN
    y, _ = reference.rms_norm(x, w, eps, None)
    assert_rel(y, naive_rms_norm(x, w, eps)[0], TOL[torch.float32])


def test_reference_mixed_weight_dtype_and_non_contiguous_x():
    x, w, r = _inputs((3, 17, 128), torch.bfloat16, wdtype=torch.float32, residual=True, layout="transposed")
    y, h = reference.rms_norm(x, w, 1e-6, r)
    ny, nh = naive_rms_norm(x, w, 1e-6, r)
    assert y.dtype == torch.bfloat16 and y.is_contiguous() and h.is_contiguous()
    assert_rel(y, ny, TOL[torch.bfloat16])
    assert torch.equal(h, nh)


# ---------------------------------------------------------------- (2) every backend vs the reference


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_backend_matches_reference(backend, shape, dtype, residual):
    x, w, r = _inputs(shape, dtype, residual=residual, seed=1)
    with strict(), poisoned_outputs():
        res = run_on(backend, llmkern.ops.rms_norm, x, w, 1e-5, r, backend=backend)
    assert llmkern.ops.OPS["rms_norm"].last_backend == backend
    ry, rh = reference.rms_norm(x, w, 1e-5, r)
    y, h = res if residual else (res, None)
    assert y.dtype == dtype and y.shape == x.shape
    assert_rel(y, ry, TOL[dtype])
    if residual:
        # One rounding of an fp32 (or wider) sum of two values of x's dtype: the same bits everywhere.
        assert torch.equal(h, rh), "h = x + residual must be bit-exact"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["sliced", "transposed"])
def test_backend_non_contiguous_and_mixed_weight(backend, layout):
    x, w, r = _inputs((3, 17, 256), torch.bfloat16, wdtype=torch.float32, residual=True, layout=layout, seed=2)
    with strict(), poisoned_outputs():
        y, h = run_on(backend, llmkern.ops.rms_norm, x, w, 1e-6, r, backend=backend)
    ry, rh = reference.rms_norm(x.contiguous(), w, 1e-6, r)
    assert_rel(y, ry, TOL[torch.bfloat16])
    assert torch.equal(h, rh)


# ---------------------------------------------------------------- (3) properties


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_equals_add_then_norm_and_scale_invariance(backend):
    x, w, r = _inputs((9, 576), residual=True, seed=3)
    with strict():
        y_fused, h = run_on(backend, llmkern.ops.rms_norm, x, w, 0.0, r, backend=backend)
        y_plain = run_on(backend, llmkern.ops.rms_norm, x + r, w, 0.0, backend=backend)
        y_scaled = run_on(backend, llmkern.ops.rms_norm, (x + r) * 8.0, w, 0.0, backend=backend)  # exact power-of-2 scaling
    assert torch.equal(h, x + r)
    assert_rel(y_fused, y_plain, TOL[torch.float32])
    assert_rel(y_scaled, y_plain, TOL[torch.float32])


# ---------------------------------------------------------------- (4) opcheck


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("residual", [False, True])
def test_opcheck(backend, residual):
    x, w, r = _inputs((3, 5, 64), residual=residual, seed=4)
    torch.library.opcheck(torch.ops.llmkern.rms_norm.default,
                          *on_device(backend, (x, w), dict(eps=1e-6, residual=r, backend=backend)))


# ---------------------------------------------------------------- (5) bad inputs


def test_weight_shape():
    x, w, _ = _inputs((3, 64))
    with pytest.raises(ValueError, match="weight must have shape"):
        llmkern.ops.rms_norm(x, w[:63])
    with pytest.raises(ValueError, match="weight must have rank 1"):
        llmkern.ops.rms_norm(x, w[None])


def test_residual_shape():
    x, w, r = _inputs((3, 64), residual=True)
    with pytest.raises(ValueError, match="residual must have shape"):
        llmkern.ops.rms_norm(x, w, 1e-6, r[:2])


def test_bad_dtypes():
    x, w, r = _inputs((3, 64), residual=True)
    with pytest.raises(TypeError, match="x must have dtype"):
        llmkern.ops.rms_norm(x.int(), w)
    with pytest.raises(TypeError, match="weight must have dtype"):
        llmkern.ops.rms_norm(x, w.double())
    with pytest.raises(TypeError, match="residual must have dtype"):
        llmkern.ops.rms_norm(x, w, 1e-6, r.long())


def test_negative_eps():
    x, w, _ = _inputs((3, 64))
    for bad in (-1e-6, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="eps must be finite and >= 0"):
            llmkern.ops.rms_norm(x, w, bad)


def test_scalar_x():
    with pytest.raises(ValueError, match="x must have rank >= 1"):
        llmkern.ops.rms_norm(torch.tensor(1.0), torch.ones(1))


def test_different_devices():
    x, w, _ = _inputs((3, 64))
    with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
        llmkern.ops.rms_norm(x, w.to("meta"))
