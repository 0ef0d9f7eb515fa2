"""Triton rms_norm, rotary_embedding and kv_cache_append against the float64 reference.

Runs on a GPU, or on the CPU under TRITON_INTERPRET=1 (test_interpreter.py): tiny shapes, one odd
shape each, fp32/fp16 (bf16 only on a GPU).
"""
import pytest

pytest.importorskip("triton", reason="triton not installed")

import torch  # noqa: E402

from llmkern import reference  # noqa: E402
from llmkern.ops.rotary_embedding import rotary_cos_sin  # noqa: E402
from triton_testutil import call, dtypes, import_triton_kernels, rel_err, require_kernel_device, tol  # noqa: E402

DEV = require_kernel_device()
import_triton_kernels()


@pytest.mark.parametrize("dtype", dtypes(DEV))
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm(dtype, residual):
    g = torch.Generator().manual_seed(1)
    M, N = 5, 100  # odd width: masked tail of the row block
    x = torch.randn(M, 2 * N, generator=g)[:, ::2].to(dtype).to(DEV)  # non-contiguous rows
    w = (torch.rand(N, generator=g) + 0.5).to(dtype).to(DEV)
    r = torch.randn(M, N, generator=g).to(dtype).to(DEV) if residual else None
    y, h = call("rms_norm", "rms_norm.rms_norm", x, w, 1e-5, r)
    if residual:
        h_exact = (x.double() + r.double()).to(dtype)
        assert torch.equal(h, h_exact), "h = x + residual must be the correctly rounded sum"
        x_ref = h_exact
    else:
        assert h.numel() == 0
        x_ref = x
    y_ref, _ = reference.rms_norm(x_ref.double(), w.double(), 1e-5, None)
    assert y.dtype == dtype and y.shape == x.shape
    assert rel_err(y, y_ref) <= tol(dtype)


@pytest.mark.parametrize("dtype", dtypes(DEV))
@pytest.mark.parametrize("interleaved,rot_dim", [(False, 24), (True, 32)])
def test_rotary(dtype, interleaved, rot_dim):
    g = torch.Generator().manual_seed(2)
    T, Hq, Hk, D = 3, 5, 1, 32  # partial rotary (24 of 32 dims) in one case
    q = torch.randn(T, Hq, D, generator=g).to(dtype).to(DEV)
    k = torch.randn(T, Hk, D, generator=g).to(dtype).to(DEV)
    cs = rotary_cos_sin(64, rot_dim).to(DEV)
    pos = torch.tensor([0, 17, 63], dtype=torch.int64, device=DEV)
    qo, ko = call("rotary_embedding", "rotary_embedding.rotary_embedding", q, k, pos, cs, interleaved)
    qr, kr = reference.rotary_embedding(q.double(), k.double(), pos, cs, interleaved)
    assert qo.dtype == dtype and ko.shape == k.shape
    assert rel_err(qo, qr) <= tol(dtype) and rel_err(ko, kr) <= tol(dtype)
    # Pass-through dims are copied exactly.
    assert torch.equal(qo[..., rot_dim:], q[..., rot_dim:])


def _caches(shape, dtype, g):
    if dtype == torch.int8:
        c = torch.randint(-127, 128, shape, generator=g, dtype=torch.int8)
        s = torch.rand(shape[:3], generator=g)
        return c.to(DEV), c.clone().to(DEV), s.to(DEV), s.clone().to(DEV)
    c = torch.randn(shape, generator=g).to(dtype)
    return c.to(DEV), c.clone().to(DEV), None, None


@pytest.mark.parametrize("cache_dtype", ["float", torch.int8])
@pytest.mark.parametrize("rotary", [False, True])
def test_kv_cache_append(cache_dtype, rotary):
    g = torch.Generator().manual_seed(3)
    dtype = torch.float16
    B, S, Hk, Hq, D, bs, nb = 2, 3, 3, 6, 40, 4, 5  # paged cache [5, 4, 3, 40]; D=40 is padded to 64
    cdt = dtype if cache_dtype == "float" else torch.int8
    k = torch.randn(B, S, Hk, D, generator=g).to(dtype).to(DEV)
    v = torch.randn(B, S, Hk, D, generator=g).to(dtype).to(DEV)
    k[0, 1, 2] = 0  # an all-zero head: int8 scale 0, q 0
    slots = torch.tensor([[0, 7, -1], [19, 3, 12]], dtype=torch.int64, device=DEV)  # -1 = padding
    kc, vc, ks, vs = _caches((nb, bs, Hk, D), cdt, g)
    kc_r, vc_r = kc.clone(), vc.clone()
    ks_r, vs_r = (ks.clone(), vs.clone()) if ks is not None else (None, None)
    q = pos = cs = None
    if rotary:
        q = torch.randn(B, S, Hq, D, generator=g).to(dtype).to(DEV)
        pos = torch.tensor([[5, 6, 7], [0, 1, 30]], dtype=torch.int64, device=DEV)
        cs = rotary_cos_sin(32, 32).to(DEV)
    q_r = q.clone() if q is not None else None
    call("kv_cache_append", "kv_cache_append.kv_cache_append", k, v, kc, vc, slots, ks, vs, q, pos, cs, False)
    reference.kv_cache_append(k, v, kc_r, vc_r, slots, ks_r, vs_r, q_r, pos, cs, False)
    if not rotary:
        # Plain writes are bit-exact, and so is the int8 rule (IEEE divisions, ties to even).
        assert torch.equal(kc, kc_r) and torch.equal(vc, vc_r)
        if ks is not None:
            assert torch.equal(ks, ks_r) and torch.equal(vs, vs_r)
        return
    # Rotation in fp32 vs the reference's float64 may differ by an ulp before rounding: compare values.
    assert rel_err(q, q_r.double()) <= tol(dtype)
    deq = (lambda c, s: c.double() * s[..., None].double()) if ks is not None else (lambda c, s: c.double())
    assert rel_err(deq(kc, ks), deq(kc_r, ks_r)) <= tol(dtype)
    assert torch.equal(vc, vc_r)  # v is not rotated: still exact
    untouched = torch.ones(nb * bs, dtype=torch.bool)
    untouched[[0, 7, 19, 3, 12]] = False
    assert torch.equal(kc.view(nb * bs, Hk, D)[untouched.to(DEV)], kc_r.view(nb * bs, Hk, D)[untouched.to(DEV)])


def test_kv_cache_append_int8_nan_head_gets_a_nan_scale():
    """A NaN in one head's k gives that head's int8 scale NaN (dequantized: NaN, as the reference), never a finite
    row: tl.max drops NaNs on a GPU."""
    g = torch.Generator().manual_seed(5)
    k = torch.randn(1, 2, 2, 64, generator=g).to(torch.float16)
    v = torch.randn(1, 2, 2, 64, generator=g).to(torch.float16)
    k[0, 1, 0, 7] = float("nan")
    kc, vc, ks, vs = _caches((2, 4, 2, 64), torch.int8, g)
    slots = torch.tensor([[1, 2]], dtype=torch.int64, device=DEV)
    call("kv_cache_append", "kv_cache_append.kv_cache_append", k.to(DEV), v.to(DEV), kc, vc, slots, ks, vs, None,
         None, None, False)
    flat = ks.view(8, 2)
    assert torch.isnan(flat[2, 0]) and torch.isfinite(flat[2, 1]) and torch.isfinite(flat[1]).all()


def test_kv_cache_append_int8_rows_the_reference_zeroes():
    """Rows whose products x * (127 / amax) are NaN quantize to 0 as in the reference (nan_to_num): a NaN row, an
    inf row, and an fp32 row whose largest value is subnormal (127 / amax is inf, so its zeros give 0 * inf).
    On a GPU tl.maximum drops the NaN and would store -127 (fmaxf); the interpreter cannot show that, the GPU
    run of this test does."""
    from llmkern import reference

    g = torch.Generator().manual_seed(6)
    k = torch.randn(1, 4, 2, 64, generator=g)
    k[0, 0, 0, :] = 0.0
    k[0, 0, 0, 5] = 1e-39  # subnormal amax
    k[0, 1, 1, 3] = float("nan")
    k[0, 2, 0, 9] = float("inf")
    v = torch.randn(1, 4, 2, 64, generator=g)
    kc, vc, ks, vs = _caches((1, 4, 2, 64), torch.int8, g)
    want = [t.clone().cpu() for t in (kc, vc, ks, vs)]
    slots = torch.tensor([[0, 1, 2, 3]], dtype=torch.int64)
    reference.kv_cache_append(k, v, want[0], want[1], slots, want[2], want[3], None, None, None, False)
    call("kv_cache_append", "kv_cache_append.kv_cache_append", k.to(DEV), v.to(DEV), kc, vc, slots.to(DEV), ks, vs,
         None, None, None, False)
    assert torch.equal(kc.cpu(), want[0]) and torch.equal(vc.cpu(), want[1])
    assert torch.equal(ks.cpu().nan_to_num(-1.0), want[2].nan_to_num(-1.0))


def test_strided_positions_and_slots():
    """positions and slot_mapping given as strided views (every other element; the elements between are
    other valid values) are read as their values: rotary and kv_cache_append with fused rotary."""
    g = torch.Generator().manual_seed(10)
    dtype = torch.float16
    T, Hq, Hk, D, nb, bs = 3, 2, 1, 32, 2, 8
    q = torch.randn(T, Hq, D, generator=g).to(dtype).to(DEV)
    k = torch.randn(T, Hk, D, generator=g).to(dtype).to(DEV)
    cs = rotary_cos_sin(64, D).to(DEV)
    pos = torch.tensor([[4, 9], [17, 1], [63, 2]], dtype=torch.int64, device=DEV)[:, 0]  # [4, 17, 63]
    slots = torch.tensor([[2, 5], [9, 0], [14, 1]], dtype=torch.int64, device=DEV)[:, 0]  # [2, 9, 14]
    assert pos.stride(0) == 2 and slots.stride(0) == 2
    qo, ko = call("rotary_embedding", "rotary_embedding.rotary_embedding", q, k, pos, cs, False)
    qr, kr = reference.rotary_embedding(q.double(), k.double(), pos.contiguous(), cs, False)
    assert rel_err(qo, qr) <= tol(dtype) and rel_err(ko, kr) <= tol(dtype)
    kc, vc = torch.zeros(nb, bs, Hk, D, dtype=dtype, device=DEV), torch.zeros(nb, bs, Hk, D, dtype=dtype, device=DEV)
    kc_r, vc_r = kc.clone(), vc.clone()
    v = torch.randn(T, Hk, D, generator=g).to(dtype).to(DEV)
    q1, q_r = q.clone(), q.clone()
    call("kv_cache_append", "kv_cache_append.kv_cache_append", k, v, kc, vc, slots, None, None, q1, pos, cs, False)
    reference.kv_cache_append(k, v, kc_r, vc_r, slots.contiguous(), None, None, q_r, pos.contiguous(), cs, False)
    assert torch.equal(vc, vc_r)  # (plain writes: exact, at the right slots only)
    assert rel_err(kc, kc_r.double()) <= tol(dtype) and rel_err(q1, q_r.double()) <= tol(dtype)
