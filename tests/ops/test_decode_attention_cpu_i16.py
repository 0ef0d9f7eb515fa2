"""decode_attention on the "cpu" backend with an int8 cache and a bf16 / f16 q: on its AVX-512 VNNI and AVX2 paths
the kernel takes q . k and p . v as int16 dot products (csrc/include/llmkern/cpu/decode_attention_i16.h,
_i16_avx2.h: q quantized per row, the softmax weights per row and tile of 32 keys, both to int16; the scalar
path converts to fp32). Checked against the naive float64 definition, tightly against the output dtype's own
rounding, and against the launcher's fp32 path (i16_dot off) on the same inputs. Caches and outputs are
poisoned as in test_decode_attention_cpu.py.
"""
import pytest
import torch

import llmkern._C as C
from llmkern.ops import decode_attention

from _attention_helpers import (TOL, CacheLayout, assert_rel, make_kv, place_kv, poisoned_outputs, randn,
                                rel_err)
from _cpu_helpers import ISAS, isa, threads  # noqa: F401 - fixtures
from test_decode_attention_cpu import naive, problem, run_cpu

DTYPES = [torch.bfloat16, torch.float16]
_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
needs_vnni = pytest.mark.skipif("avx512_vnni" not in ISAS, reason="needs AVX-512 VNNI")
SIMD = [i for i in ISAS if i != "scalar"]  # the ISAs with an int16 path

# (lens, Sq, Hq, Hk, D, block_size). Rows per KV head R = Sq * Hq / Hk: 1, 3, 4 (Llama-3), 8, 12 (several
# groups of four rows), 6; D 40 / 72 / 200 leave a partial last chunk of 32 (and of 16), 256 the largest; odd
# lengths leave an odd last tile (a key pair with a zero weight) and tiles cut by a split.
CASES = [
    ([1, 17, 100], 1, 4, 4, 64, None),
    ([257, 0, 3], 1, 9, 3, 64, 16),
    ([100, 33], 1, 32, 8, 128, 7),
    ([17, 257], 1, 8, 1, 40, None),
    ([300], 1, 12, 1, 72, 16),
    ([33, 100], 3, 4, 2, 200, 1),
    ([65, 2], 1, 2, 1, 256, None),
]
OPTS = [{}, dict(window_left=20), dict(softcap=2.0, scale=0.5)]


def _id(c):
    lens, Sq, Hq, Hk, D, bs = c
    return f"L{'-'.join(map(str, lens))}_Sq{Sq}_{Hq}x{Hk}_D{D}_{'contig' if bs is None else f'bs{bs}'}"


def _floor(ref, dtype):
    """The output dtype's own error: the float64 reference rounded to it."""
    return rel_err(ref.to(dtype), ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_matches_naive(case, dtype, isa, threads):
    """Every ISA (scalar converts to fp32) within the 16-bit contract, and the result no further from the
    float64 reference than 1.5x the output's own rounding plus 1e-4 (queries or weights quantized to 8 or 12 bits
    instead of 16 fail this: mutation runs, docs/notes/cpu-zen4-host.md)."""
    q, args, kv = problem(*case, dtype=dtype, int8=True, seed=11)
    for kw in OPTS:
        ref = naive(q, kv, **kw)
        out = run_cpu(q, *args, **kw)
        assert_rel(out, ref, TOL[dtype], f"out {kw}")
        bound = 1.5 * _floor(ref, dtype) + 1e-4
        err = rel_err(out, ref)
        assert err <= bound, f"{kw}: {err:.3g} > {bound:.3g} (rounding {_floor(ref, dtype):.3g})"


def launch(q, kc, vc, lens, bt, ks, vs, *, i16_dot, isa="avx512_vnni", threads=2, scale=None, softcap=0.0,
           window_left=-1):
    """The launch of `decode_attention` on `isa` with i16_dot on or off (the op always leaves it on); q [B, Hq, D]."""
    B, Hq, D = q.shape
    Hk = kc.shape[2]
    capacity = kc.shape[1] * (bt.shape[1] if bt is not None else 1)
    ws_bytes = C.decode_attention_workspace_size(B, 1, Hq, Hk, D, capacity, threads)
    ws = torch.empty(ws_bytes, dtype=torch.uint8)
    with poisoned_outputs():
        out = torch.empty(q.shape, dtype=q.dtype)
    qs = q.stride()
    C.decode_attention(q.data_ptr(), _CODE[q.dtype], [qs[0], 0, qs[1]], B, 1, Hq, Hk, D, kc.data_ptr(), vc.data_ptr(),
                       3, list(kc.stride()[:3]), list(vc.stride()[:3]), ks.data_ptr(), vs.data_ptr(), list(ks.stride()),
                       list(vs.stride()), lens.data_ptr(), 0 if bt is None else bt.data_ptr(),
                       0 if bt is None else bt.stride(0), 0 if bt is None else kc.shape[1], capacity,
                       D ** -0.5 if scale is None else scale, softcap, window_left, out.data_ptr(), ws.data_ptr(),
                       ws_bytes, threads, isa, i16_dot=i16_dot)
    return out


@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int16_path_against_fp32_path(dtype, simd):
    """The same inputs through the int16 and fp32 paths of one SIMD ISA: each within the bound above of the float64
    reference, and their outputs apart by no more than the two roundings (a flip is one ulp of the output dtype)."""
    q, (kc, vc, lens, bt, ks, vs), kv = problem([1000, 31], 1, 32, 8, 128, 16, dtype=dtype, int8=True, seed=12)
    ref = naive(q, kv)
    fast, slow = (launch(q, kc, vc, lens, bt, ks, vs, i16_dot=f, isa=simd) for f in (True, False))
    floor = _floor(ref, dtype)
    for out, what in ((fast, "int16"), (slow, "fp32")):
        assert rel_err(out, ref) <= 1.5 * floor + 1e-4, f"{what} path: {rel_err(out, ref):.3g} (rounding {floor:.3g})"
    assert rel_err(fast, slow) <= 2.5 * floor, f"int16 vs fp32 path: {rel_err(fast, slow):.3g} (rounding {floor:.3g})"
    assert not torch.equal(fast, slow)  # the switch reaches the kernel: the paths round differently somewhere


@pytest.mark.parametrize("where", ["v_scale", "k_scale", "q"])
def test_non_finite_values_reach_the_output(where, isa):
    """A NaN value scale of a visible token (the int16 path: its rows' weight scale becomes NaN), a NaN key scale,
    and an infinite q element (its row's scores are NaN): the rows that see it are NaN, as in the fp32 path, and
    the others are not."""
    lens, Hq, Hk, D = [80, 50], 8, 2, 64
    kv = make_kv(lens, Hk, D, int8=True, seed=13)
    layout = CacheLayout(lens, seed=13)
    kc, vc, ks, vs = place_kv(kv, layout)
    q = torch.randn(2, Hq, D, generator=torch.Generator().manual_seed(13)).to(torch.bfloat16)
    if where == "v_scale":
        vs[0, 40, 1] = float("nan")  # sequence 0, token 40, KV head 1: query heads 4..7
    elif where == "k_scale":
        ks[0, 40, 1] = float("nan")
    else:
        q[0, 5, 3] = float("inf")  # query head 5 of sequence 0
    out = run_cpu(q, kc, vc, torch.tensor(lens, dtype=torch.int32), layout.block_table, ks, vs)
    bad = out.float().isnan().any(-1)
    want = torch.zeros(2, Hq, dtype=torch.bool)
    if where == "q":
        want[0, 5] = True
    else:
        want[0, 4:] = True
    assert torch.equal(bad, want), f"NaN rows {bad.nonzero().tolist()}, expected {want.nonzero().tolist()}"


def test_zero_rows_and_weights():
    """A zero q row scores 0 everywhere: uniform weights over the visible keys (it sends its sequence to the fp32
    path, see test_outlier_rows_take_the_fp32_path); zero value scales give zero weights in the int16 path
    (scale 0): the output is 0, not NaN."""
    lens, Hq, Hk, D = [70], 4, 1, 64
    kv = make_kv(lens, Hk, D, int8=True, seed=14)
    layout = CacheLayout(lens, seed=14)
    kc, vc, ks, vs = place_kv(kv, layout)
    q = torch.randn(1, Hq, D, generator=torch.Generator().manual_seed(14)).to(torch.bfloat16)
    q[0, 1] = 0
    out = run_cpu(q, kc, vc, torch.tensor(lens, dtype=torch.int32), None, ks, vs)
    assert_rel(out, naive(q, kv), TOL[torch.bfloat16])
    q[0, 1] = torch.randn(D, generator=torch.Generator().manual_seed(15)).to(torch.bfloat16)
    vs[0, :70] = 0
    out = run_cpu(q, kc, vc, torch.tensor(lens, dtype=torch.int32), None, ks, vs)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("outlier", [300.0, 1000.0, 1e4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_outlier_rows_take_the_fp32_path(dtype, outlier, simd):
    """A q row whose one channel is far above the rest (found by fuzzing): per-row int16 would keep a few bits of
    the other channels, and keys that are zero on the outlier channel see only those (2.4% error at 2000x). Such a
    row (most of its values below 2^-7 of its largest) sends its sequence to the fp32 path: bit for bit the
    launcher's fp32 path there, while the other sequence of the batch keeps the int16 path."""
    B, L, Hq, Hk, D = 2, 200, 4, 2, 64
    g = torch.Generator().manual_seed(16)
    q = (0.5 * torch.randn(B, Hq, D, generator=g))
    q[0, 3, 5] = outlier  # sequence 0, query head 3 (KV head 1), channel 5
    q = q.to(dtype)
    kc = torch.randint(-127, 128, (B, L, Hk, D), dtype=torch.int8, generator=g)
    kc[..., 5] = 0
    vc = torch.randint(-127, 128, (B, L, Hk, D), dtype=torch.int8, generator=g)
    ks = 0.05 * (1 + torch.rand(B, L, Hk, generator=g))
    vs = 0.01 * (1 + torch.rand(B, L, Hk, generator=g))
    lens = torch.tensor([L, L - 7], dtype=torch.int32)
    kv = {"k64": [kc[b, :n].double() * ks[b, :n, :, None].double() for b, n in enumerate(lens.tolist())],
          "v64": [vc[b, :n].double() * vs[b, :n, :, None].double() for b, n in enumerate(lens.tolist())]}
    ref = naive(q, kv)
    fast, slow = (launch(q, kc, vc, lens, None, ks, vs, i16_dot=f, isa=simd) for f in (True, False))
    floor = _floor(ref, dtype)
    assert rel_err(fast, ref) <= 1.5 * floor + 1e-4, f"{rel_err(fast, ref):.3g} (rounding {floor:.3g})"
    assert torch.equal(fast[0], slow[0])  # sequence 0: the fp32 path
    assert not torch.equal(fast[1], slow[1])  # sequence 1: still int16


@needs_vnni
def test_op_matches_launcher(monkeypatch):
    """The op (which leaves i16_dot on) and the launcher agree bit for bit on the AVX-512 path."""
    monkeypatch.setenv("LLMKERN_CPU_ISA", "avx512_vnni")
    q, (kc, vc, lens, bt, ks, vs), _ = problem([200, 9], 1, 8, 2, 64, None, dtype=torch.bfloat16, int8=True, seed=15)
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = decode_attention(q, kc, vc, lens, k_scale=ks, v_scale=vs, backend="cpu")
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(out, launch(q, kc, vc, lens, bt, ks, vs, i16_dot=True))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_q_and_strided_int8_cache(dtype, isa):
    """q transposed in memory (Sq = 3); int8 caches and their scales as views with a padded head dimension (the
    spare head holds 99 / NaN: reading it fails)."""
    lens, Hq, Hk, D = [40, 100], 8, 2, 64
    kv = make_kv(lens, Hk, D, int8=True, seed=16)
    kc, vc, ks, vs = place_kv(kv, CacheLayout(lens, seed=16))

    def padded(t, fill):  # [rows, cols, Hk, ...] -> a view of [rows, cols, Hk + 1, ...] with `fill` in the spare head
        big = torch.full(t.shape[:2] + (Hk + 1,) + t.shape[3:], fill, dtype=t.dtype)
        big[:, :, :Hk] = t
        return big[:, :, :Hk]

    q = randn(2, 3, Hq, D, dtype=dtype, layout="transposed")
    args = (padded(kc, 99), padded(vc, 99), torch.tensor(lens, dtype=torch.int32), None,
            padded(ks, float("nan")), padded(vs, float("nan")))
    assert not args[0].is_contiguous() and not args[4].is_contiguous()
    ref = naive(q, kv)
    out = run_cpu(q, *args)
    err, floor = rel_err(out, ref), _floor(ref, dtype)
    assert err <= 1.5 * floor + 1e-4, f"{err:.3g} (rounding {floor:.3g})"
