"""llmkern.ops.kv_cache_append: bit-exact float writes, the exact int8 quantize-on-write rule, fused rotary,
every backend vs the reference, opcheck, bad inputs.

Caches start NaN-poisoned (float) or filled with a sentinel (int8 values, NaN scales): a write to a wrong
slot, a missed slot, or a write for a -1 slot shows up in the bit-level comparison.
"""
import numpy as np
import pytest
import torch

import llmkern
from llmkern import reference
from llmkern.ops import rotary_cos_sin, strict

from _attention_helpers import on_device, run_on, CacheLayout, backends, randn

BACKENDS = backends("kv_cache_append")
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
            torch.int8: torch.int8}


def bits_equal(a, b):
    """Bit-for-bit equality (NaN payloads included): the float tensors compared as integers."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(INT_VIEW[a.dtype]), b.view(INT_VIEW[b.dtype]))


def _caches(shape, dtype):
    """(k_cache, v_cache, k_scale, v_scale) poisoned: NaN for float, 99 and NaN scales for int8."""
    if dtype == torch.int8:
        return (torch.full(shape, 99, dtype=torch.int8), torch.full(shape, 99, dtype=torch.int8),
                torch.full(shape[:3], float("nan")), torch.full(shape[:3], float("nan")))
    return torch.full(shape, float("nan"), dtype=dtype), torch.full(shape, float("nan"), dtype=dtype), None, None


def _clone(c):
    return tuple(None if t is None else t.clone() for t in c)


def naive_quantize(x):
    """x [Hk, D] -> (int8 [Hk, D], float32 [Hk]) with numpy float32 arithmetic, row by row."""
    x = x.float().numpy()
    q = np.zeros(x.shape, dtype=np.int8)
    s = np.zeros(x.shape[0], dtype=np.float32)
    for h in range(x.shape[0]):
        amax = np.float32(np.abs(x[h]).max())
        if amax == 0:
            continue
        s[h] = amax / np.float32(127)
        inv = np.float32(127) / amax  # IEEE float32 division
        q[h] = np.clip(np.rint(x[h] * inv), -127, 127).astype(np.int8)  # rint: round half to even
    return torch.from_numpy(q), torch.from_numpy(s)


def naive_append(k, v, caches, slot_mapping):
    """Token by token: cache.view(-1, Hk, D)[slot] = k[t] (cast or quantized); slot -1 skipped."""
    kc, vc, ks, vs = _clone(caches)
    Hk, D = kc.shape[2], kc.shape[3]
    for t, slot in enumerate(slot_mapping.reshape(-1).tolist()):
        if slot < 0:
            continue
        for src, cache, scale in ((k, kc, ks), (v, vc, vs)):
            x = src.reshape(-1, Hk, D)[t]
            if scale is None:
                cache.view(-1, Hk, D)[slot] = x.to(cache.dtype)
            else:
                cache.view(-1, Hk, D)[slot], scale.view(-1, Hk)[slot] = naive_quantize(x)
    return kc, vc, ks, vs


def _ref(k, v, caches, slot_mapping, **kw):
    kc, vc, ks, vs = _clone(caches)
    q = kw.get("q")
    reference.kv_cache_append(k, v, kc, vc, slot_mapping, ks, vs, q, kw.get("positions"), kw.get("cos_sin_cache"),
                              kw.get("rotary_interleaved", False))
    return kc, vc, ks, vs


def _run(backend, k, v, caches, slot_mapping, **kw):
    kc, vc, ks, vs = _clone(caches)
    with strict():
        run_on(backend, llmkern.ops.kv_cache_append, k, v, kc, vc, slot_mapping, k_scale=ks, v_scale=vs, backend=backend, **kw)
    assert llmkern.ops.OPS["kv_cache_append"].last_backend == backend
    return kc, vc, ks, vs


def _assert_caches_equal(got, want):
    for name, a, b in zip(("k_cache", "v_cache", "k_scale", "v_scale"), got, want):
        assert (a is None) == (b is None)
        if a is not None:
            assert bits_equal(a, b), f"{name} differs"


# Problems: contiguous [B, S] appends at each sequence's end, and packed paged appends with -1 padding.
def _contiguous_problem(dtype, cache_dtype, Hk=2, D=64, layout="contiguous"):
    """k/v [B=3, S=17, Hk, D] appended at positions start_b..start_b+16 of a [3, 40, Hk, D] cache."""
    B, S, Smax = 3, 17, 40
    starts = torch.tensor([0, 5, 23])
    pos = starts[:, None] + torch.arange(S)[None, :]  # [B, S]
    slots = torch.arange(B)[:, None] * Smax + pos
    k, v = randn(B, S, Hk, D, dtype=dtype, layout=layout), randn(B, S, Hk, D, dtype=dtype, layout=layout)
    return k, v, _caches((B, Smax, Hk, D), cache_dtype), slots, pos


def _paged_problem(dtype, cache_dtype, Hk=4, D=128, block_size=16):
    """Packed k/v [T, Hk, D] of sequences of 1, 0, 100 and 5 tokens into a shuffled paged cache, with -1 pads."""
    lens = [1, 0, 100, 5]
    layout = CacheLayout(lens, block_size=block_size, seed=3)
    slots = torch.cat(layout.slots)
    pos = torch.cat([torch.arange(n) for n in lens])
    pad = torch.tensor([2, 9, 50])  # padding rows sprinkled among the real tokens
    for i in pad.tolist():
        slots = torch.cat([slots[:i], torch.tensor([-1]), slots[i:]])
        pos = torch.cat([pos[:i], torch.tensor([0]), pos[i:]])
    T = slots.numel()
    k, v = randn(T, Hk, D, dtype=dtype), randn(T, Hk, D, dtype=dtype)
    return k, v, _caches((layout.rows, block_size, Hk, D), cache_dtype), slots, pos


# ---------------------------------------------------------------- (1) reference vs naive


@pytest.mark.parametrize("problem", ["contiguous", "paged"])
@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.float16, torch.float16), (torch.float32, torch.bfloat16)],
                         ids=str)
def test_reference_float_cache_bit_exact(problem, dtype, cache_dtype):
    torch.manual_seed(0)
    k, v, caches, slots, _ = (_contiguous_problem if problem == "contiguous" else _paged_problem)(dtype, cache_dtype)
    got = _ref(k, v, caches, slots)
    _assert_caches_equal(got, naive_append(k, v, caches, slots))
    assert torch.isnan(got[0]).any(), "unwritten slots must keep their old (NaN) contents"


@pytest.mark.parametrize("problem", ["contiguous", "paged"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_reference_int8_rule_exact(problem, dtype):
    torch.manual_seed(1)
    k, v, caches, slots, _ = (_contiguous_problem if problem == "contiguous" else _paged_problem)(dtype, torch.int8)
    _assert_caches_equal(_ref(k, v, caches, slots), naive_append(k, v, caches, slots))


def test_int8_rounds_half_to_even_and_zero_heads():
    """amax 127 makes 127/amax exactly 1, so x.5 values are exact ties; an all-zero head stores scale 0, q 0."""
    k = torch.zeros(1, 2, 32)
    k[0, 0, :6] = torch.tensor([127.0, 2.5, 3.5, -0.5, -1.5, 126.5])
    v = torch.randn(1, 2, 32)
    caches = _caches((1, 4, 2, 32), torch.int8)
    kc, _, ks, _ = _ref(k, v, caches, torch.tensor([2]))
    assert kc[0, 2, 0, :6].tolist() == [127, 2, 4, 0, -2, 126]
    assert ks[0, 2].tolist() == [1.0, 0.0] and kc[0, 2, 1].abs().sum() == 0
    assert kc[0, 0].eq(99).all() and ks[0, 0].isnan().all()  # other slots untouched


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [64, 32])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.int8], ids=str)
def test_reference_fused_rotary_equals_rotary_then_append(interleaved, rotary_dim, cache_dtype):
    torch.manual_seed(2)
    k, v, caches, slots, pos = _contiguous_problem(torch.float32, cache_dtype)
    q = randn(3, 17, 6, 64)
    cs = rotary_cos_sin(64, rotary_dim)
    q_rot, k_rot = reference.rotary_embedding(q, k, pos, cs, interleaved)
    q_in = q.clone()
    got = _ref(k, v, caches, slots, q=q_in, positions=pos, cos_sin_cache=cs, rotary_interleaved=interleaved)
    _assert_caches_equal(got, naive_append(k_rot, v, caches, slots))
    assert bits_equal(q_in, q_rot), "q must be rotated in place"
    # Without q, only k is rotated.
    _assert_caches_equal(_ref(k, v, caches, slots, positions=pos, cos_sin_cache=cs, rotary_interleaved=interleaved),
                         got)


def test_reference_non_contiguous_k_v():
    torch.manual_seed(3)
    k, v, caches, slots, _ = _contiguous_problem(torch.float32, torch.float32, layout="sliced")
    _assert_caches_equal(_ref(k, v, caches, slots), naive_append(k, v, caches, slots))


# ---------------------------------------------------------------- (2) every backend vs the reference


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("problem", ["contiguous", "paged"])
@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.float16, torch.float16), (torch.float32, torch.bfloat16),
                                               (torch.float32, torch.int8), (torch.bfloat16, torch.int8)], ids=str)
def test_backend_bit_exact(backend, problem, dtype, cache_dtype):
    """No rotary: every backend writes exactly the reference's bits (float casts and the int8 rule)."""
    torch.manual_seed(4)
    k, v, caches, slots, _ = (_contiguous_problem if problem == "contiguous" else _paged_problem)(dtype, cache_dtype)
    _assert_caches_equal(_run(backend, k, v, caches, slots), _ref(k, v, caches, slots))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["sliced", "transposed"])
def test_backend_non_contiguous_k_v(backend, layout):
    torch.manual_seed(5)
    k, v, caches, slots, _ = _contiguous_problem(torch.float32, torch.float32, layout=layout)
    _assert_caches_equal(_run(backend, k, v, caches, slots), _ref(k, v, caches, slots))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.float32, torch.int8)], ids=str)
def test_backend_fused_rotary(backend, interleaved, dtype, cache_dtype):
    """Fused rotary may round differently from the float64 reference by an ulp: close, not bit-exact.

    Written slots must match closely, unwritten slots must stay poisoned, q is rotated in place.
    """
    torch.manual_seed(6)
    k, v, caches, slots, pos = _paged_problem(dtype, cache_dtype, Hk=2, D=64, block_size=5)
    cs = rotary_cos_sin(128, 48)  # partial rotary: dims 48..63 pass through
    q = randn(k.shape[0], 4, 64, dtype=dtype)
    q_b, q_r = q.clone(), q.clone()
    kw = dict(positions=pos, cos_sin_cache=cs, rotary_interleaved=interleaved)
    got = _run(backend, k, v, caches, slots, q=q_b, **kw)
    want = _ref(k, v, caches, slots, q=q_r, **kw)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(q_b, q_r, **tol)
    for a, b in zip(got, want):
        if a is None:
            continue
        if a.is_floating_point():  # the same slots written, the others still NaN
            assert torch.equal(a.isnan(), b.isnan())
        if a.dtype == torch.int8:
            assert (a.int() - b.int()).abs().max() <= 1  # an ulp of the rotated input may move a rounding
        else:
            torch.testing.assert_close(a, b, equal_nan=True, **tol)


# ---------------------------------------------------------------- (3) properties


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.int8], ids=str)
def test_chunked_appends_equal_one_append(backend, cache_dtype):
    """A prompt of 17 tokens then 3 single decode tokens == the 20 tokens appended at once."""
    torch.manual_seed(7)
    B, Hk, D, Smax = 2, 2, 32, 24
    k, v = randn(B, 20, Hk, D), randn(B, 20, Hk, D)
    slots = torch.arange(B)[:, None] * Smax + torch.arange(20)[None, :]  # [B, 20]
    caches = _caches((B, Smax, Hk, D), cache_dtype)
    whole = _run(backend, k, v, caches, slots)
    steps = _run(backend, k[:, :17], v[:, :17], caches, slots[:, :17])
    for t in range(17, 20):
        steps = _run(backend, k[:, t], v[:, t], steps, slots[:, t])  # packed [B, Hk, D] one token each
    _assert_caches_equal(steps, whole)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_padding_writes_nothing(backend):
    k, v, caches, slots, _ = _paged_problem(torch.float32, torch.float32)
    _assert_caches_equal(_run(backend, k, v, caches, torch.full_like(slots, -1)), caches)


# ---------------------------------------------------------------- (4) opcheck


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["float", "int8", "rotary"])
def test_opcheck(backend, kind):
    torch.manual_seed(8)
    k, v, caches, slots, pos = _paged_problem(torch.float32, torch.int8 if kind == "int8" else torch.float32,
                                              Hk=2, D=32, block_size=8)
    kc, vc, ks, vs = caches
    kw = dict(k_scale=ks, v_scale=vs, backend=backend)
    if kind == "rotary":
        kw.update(q=randn(k.shape[0], 4, 32), positions=pos, cos_sin_cache=rotary_cos_sin(128, 32))
    # opcheck reruns the op on copies; fresh tensors keep the mutations from leaking between its tests.
    torch.library.opcheck(torch.ops.llmkern.kv_cache_append.default, *on_device(backend, (k, v, kc, vc, slots), kw))


# ---------------------------------------------------------------- (5) bad inputs


def _good(cache_dtype=torch.float32):
    k, v, caches, slots, pos = _contiguous_problem(torch.float32, cache_dtype, D=64)
    return dict(k=k, v=v, k_cache=caches[0], v_cache=caches[1], slot_mapping=slots, k_scale=caches[2],
                v_scale=caches[3]), pos


def _call(a, **kw):
    a = {**a, **kw}
    llmkern.ops.kv_cache_append(a.pop("k"), a.pop("v"), a.pop("k_cache"), a.pop("v_cache"), a.pop("slot_mapping"),
                                **a)


def test_bad_k_rank():
    a, _ = _good()
    with pytest.raises(ValueError, match="k must have rank"):
        _call(a, k=a["k"][0, 0])


def test_v_shape_differs():
    a, _ = _good()
    with pytest.raises(ValueError, match="v must have shape"):
        _call(a, v=a["v"][:, :3])


def test_k_heads_differ_from_cache():
    a, _ = _good()
    with pytest.raises(ValueError, match=r"k must have shape \[\*, \*, 2, 64\]"):
        _call(a, k=a["k"][:, :, :1], v=a["v"][:, :, :1])


def test_cache_rank_and_dtype():
    a, _ = _good()
    with pytest.raises(ValueError, match="k_cache must have rank 4"):
        _call(a, k_cache=a["k_cache"][0])
    with pytest.raises(TypeError, match="v_cache must have dtype"):
        _call(a, v_cache=a["v_cache"].half())


def test_non_contiguous_cache():
    a, _ = _good()
    with pytest.raises(ValueError, match="k_cache and v_cache must be contiguous"):
        _call(a, k_cache=a["k_cache"].transpose(0, 1).contiguous().transpose(0, 1))


def test_slot_mapping_dtype_and_shape():
    a, _ = _good()
    with pytest.raises(TypeError, match="slot_mapping must have dtype int64"):
        _call(a, slot_mapping=a["slot_mapping"].int())
    with pytest.raises(ValueError, match="slot_mapping must have shape"):
        _call(a, slot_mapping=a["slot_mapping"][:, :3])


@pytest.mark.parametrize("bad", [-2, 3 * 40])
def test_slot_mapping_out_of_range(bad):
    a, _ = _good()
    slots = a["slot_mapping"].clone()
    slots[1, 4] = bad
    with pytest.raises(ValueError, match=r"slot_mapping must be in -1\.\.119"):
        _call(a, slot_mapping=slots)


@pytest.mark.parametrize("missing", ["k_scale", "v_scale"])
def test_int8_cache_without_scale(missing):
    a, _ = _good(torch.int8)
    with pytest.raises(ValueError, match=f"int8 cache needs {missing}"):
        _call(a, **{missing: None})


def test_int8_scale_shape_and_layout():
    a, _ = _good(torch.int8)
    with pytest.raises(ValueError, match="k_scale must have shape"):
        _call(a, k_scale=a["k_scale"][:, :5])
    with pytest.raises(ValueError, match="k_scale must be contiguous"):
        _call(a, k_scale=a["k_scale"].transpose(0, 1).contiguous().transpose(0, 1))


def test_scales_with_float_cache():
    a, _ = _good()
    with pytest.raises(ValueError, match="k_scale/v_scale are only for int8 caches"):
        _call(a, k_scale=torch.zeros(a["k_cache"].shape[:3]))


def test_rotary_positions_out_of_range():
    a, pos = _good()
    with pytest.raises(ValueError, match=r"positions must be in 0\.\.9"):
        _call(a, positions=pos, cos_sin_cache=rotary_cos_sin(10, 64))
    neg = pos.clone()
    neg[0, 3] = -1  # the CPU fast check reads the range without torch reductions: below 0 too
    with pytest.raises(ValueError, match=r"positions must be in 0\.\.63 \(rows of cos_sin_cache\), got -1\.\."):
        _call(a, positions=neg, cos_sin_cache=rotary_cos_sin(64, 64))


def test_rotary_without_positions():
    a, _ = _good()
    with pytest.raises(ValueError, match="needs positions"):
        _call(a, cos_sin_cache=rotary_cos_sin(64, 64))


def test_rotary_positions_wrong_shape_or_dtype():
    a, pos = _good()
    cs = rotary_cos_sin(64, 64)
    with pytest.raises(ValueError, match="positions must have shape"):
        _call(a, positions=pos[:, :4], cos_sin_cache=cs)
    with pytest.raises(TypeError, match="positions must have dtype"):
        _call(a, positions=pos.float(), cos_sin_cache=cs)


def test_rotary_q_shape():
    a, pos = _good()
    with pytest.raises(ValueError, match="q must have shape"):
        _call(a, q=torch.randn(3, 16, 4, 64), positions=pos, cos_sin_cache=rotary_cos_sin(64, 64))
    with pytest.raises(ValueError, match="q must have shape"):
        _call(a, q=torch.randn(3, 17, 4, 32), positions=pos, cos_sin_cache=rotary_cos_sin(64, 32))
    with pytest.raises(TypeError, match="q must have dtype"):
        _call(a, q=torch.zeros(3, 17, 4, 64, dtype=torch.int32), positions=pos, cos_sin_cache=rotary_cos_sin(64, 64))


def test_rotary_dim_too_wide_or_odd():
    a, pos = _good()
    for width in (66, 31):
        with pytest.raises(ValueError, match="cos_sin_cache width"):
            _call(a, positions=pos, cos_sin_cache=torch.zeros(64, width))


def test_q_without_rotary():
    a, pos = _good()
    with pytest.raises(ValueError, match="q and positions are only used with fused rotary"):
        _call(a, q=torch.randn(3, 17, 4, 64))
