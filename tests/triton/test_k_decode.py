"""Triton decode attention against the float64 reference: contiguous and paged caches, split-KV merge,
int8 caches, GQA, Sq > 1 with window and softcap, an empty sequence."""
import pytest

pytest.importorskip("triton", reason="triton not installed")

import torch  # noqa: E402

from llmkern import reference  # noqa: E402
from triton_testutil import dtypes, import_triton_kernels, rel_err, require_kernel_device, tol  # noqa: E402

DEV = require_kernel_device()
tk = import_triton_kernels()


def _run(*args, num_splits=None):
    """Through the op (backend="triton", strict) on a GPU; the launcher on CPU tensors."""
    if DEV == "cuda" and num_splits is None:
        from triton_testutil import call

        return call("decode_attention", "decode_attention.decode_attention", *args)
    from llmkern.triton_kernels.decode_attention import decode_attention

    return decode_attention(*args, num_splits=num_splits)


def _paged(cache, scale, bs, g):
    """Contiguous [B, Smax, Hk, D] -> shuffled paged [nb, bs, Hk, D] + block table [B, Smax / bs]."""
    B, Smax = cache.shape[:2]
    nblk = Smax // bs
    perm = torch.randperm(B * nblk, generator=g)
    paged = torch.empty((B * nblk, bs) + cache.shape[2:], dtype=cache.dtype)
    paged[perm] = cache.cpu().reshape(B * nblk, bs, *cache.shape[2:])  # [B, Smax] -> [B*nblk, bs]
    bt = perm.reshape(B, nblk).to(torch.int32)
    ps = None
    if scale is not None:
        ps = torch.empty((B * nblk, bs) + scale.shape[2:])
        ps[perm] = scale.cpu().reshape(B * nblk, bs, *scale.shape[2:])
        ps = ps.to(DEV)
    return paged.to(DEV), bt.to(DEV), ps


@pytest.mark.parametrize("dtype", dtypes(DEV))
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode(dtype, int8, num_splits):
    g = torch.Generator().manual_seed(4)
    B, Hq, Hk, D, Smax, bs = 3, 4, 2, 40, 48, 8  # GQA 2, D padded 40 -> 64
    q = torch.randn(B, Hq, D, generator=g).to(dtype).to(DEV)
    lens = torch.tensor([37, 0, 48], dtype=torch.int32, device=DEV)  # odd, empty, full
    if int8:
        kc = torch.randint(-127, 128, (B, Smax, Hk, D), generator=g, dtype=torch.int8)
        vc = torch.randint(-127, 128, (B, Smax, Hk, D), generator=g, dtype=torch.int8)
        ks, vs = torch.rand(B, Smax, Hk, generator=g) / 50, torch.rand(B, Smax, Hk, generator=g) / 50
        kc, vc, ks, vs = kc.to(DEV), vc.to(DEV), ks.to(DEV), vs.to(DEV)
    else:
        kc = torch.randn(B, Smax, Hk, D, generator=g).to(dtype).to(DEV)
        vc = torch.randn(B, Smax, Hk, D, generator=g).to(dtype).to(DEV)
        ks = vs = None
    kc[0, 40:] = float("nan") if not int8 else kc[0, 40:]  # past seq_len: never read
    out = _run(q, kc, vc, lens, None, ks, vs, None, 0.0, -1, num_splits=num_splits)
    ref = reference.decode_attention(q.double(), kc if int8 else kc.double(), vc if int8 else vc.double(), lens,
                                     None, ks, vs, None, 0.0, -1)
    assert out.shape == q.shape and out.dtype == dtype
    assert rel_err(out, ref) <= tol(dtype)
    assert torch.all(out[1] == 0), "a sequence with no keys gets 0"
    # The same cache paged (shuffled blocks) gives the same result.
    pk, bt, pks = _paged(kc, ks, bs, g)
    pv, _, pvs = _paged(vc, vs, bs, torch.Generator().manual_seed(4 + 100))
    # Same block permutation for k and v: rebuild v with k's table.
    pv = torch.empty_like(pk)
    pv.view(-1, bs, Hk, D)[bt.reshape(-1).long()] = vc.reshape(-1, bs, Hk, D)
    if int8:
        pvs = torch.empty_like(pks)
        pvs.view(-1, bs, Hk)[bt.reshape(-1).long()] = vs.reshape(-1, bs, Hk)
    outp = _run(q, pk, pv, lens, bt, pks, pvs, None, 0.0, -1, num_splits=num_splits)
    assert rel_err(outp, out.double()) <= tol(dtype)


@pytest.mark.parametrize("dtype", [torch.float16])
def test_decode_multi_token_window_softcap(dtype):
    g = torch.Generator().manual_seed(5)
    B, Sq, Hq, Hk, D, Smax = 2, 3, 3, 1, 32, 33  # MQA, 3 new tokens each
    q = torch.randn(B, Sq, Hq, D, generator=g).to(dtype).to(DEV)
    kc = torch.randn(B, Smax, Hk, D, generator=g).to(dtype).to(DEV)
    vc = torch.randn(B, Smax, Hk, D, generator=g).to(dtype).to(DEV)
    lens = torch.tensor([33, 5], dtype=torch.int32, device=DEV)
    out = _run(q, kc, vc, lens, None, None, None, 0.3, 2.0, 7, num_splits=2)
    ref = reference.decode_attention(q.double(), kc.double(), vc.double(), lens, None, None, None, 0.3, 2.0, 7)
    assert out.shape == q.shape
    assert rel_err(out, ref) <= tol(dtype)


def test_decode_row_blocks():
    """GROUP x Sq = 80 rows at D = 136 (padded 256): more accumulator than one program holds, so the rows
    run as 2 row blocks of 64 (decode_attention.config); padding rows of the last block are never stored."""
    from llmkern.triton_kernels.decode_attention import config

    assert config(80, 136, 64, 2, torch.float16, num_splits=2)["ROW_BLOCKS"] == 2
    g = torch.Generator().manual_seed(6)
    B, Sq, Hq, Hk, D, Smax = 1, 5, 16, 1, 136, 40
    q = torch.randn(B, Sq, Hq, D, generator=g).to(torch.float16).to(DEV)
    kc = torch.randn(B, Smax, Hk, D, generator=g).to(torch.float16).to(DEV)
    vc = torch.randn(B, Smax, Hk, D, generator=g).to(torch.float16).to(DEV)
    lens = torch.tensor([37], dtype=torch.int32, device=DEV)
    out = _run(q, kc, vc, lens, None, None, None, None, 0.0, -1, num_splits=2)
    ref = reference.decode_attention(q.double(), kc.double(), vc.double(), lens, None, None, None, None, 0.0, -1)
    assert out.shape == q.shape
    assert rel_err(out, ref) <= tol(torch.float16)


def test_decode_strided_lens_and_block_table():
    """seq_lens as a strided view and a block table whose rows are not unit-stride (a transposed copy) give
    the contiguous inputs' result."""
    g = torch.Generator().manual_seed(9)
    B, Hq, Hk, D, Smax, bs = 3, 4, 2, 32, 32, 8
    q = torch.randn(B, Hq, D, generator=g).to(torch.float16).to(DEV)
    kc = torch.randn(B, Smax, Hk, D, generator=g).to(torch.float16).to(DEV)
    vc = torch.randn(B, Smax, Hk, D, generator=g).to(torch.float16).to(DEV)
    lens = torch.tensor([[29, 2], [5, 2], [32, 2]], dtype=torch.int32, device=DEV)[:, 0]  # stride 2
    assert lens.stride(0) == 2
    ref = reference.decode_attention(q.double(), kc.double(), vc.double(), lens.contiguous(), None, None, None,
                                     None, 0.0, -1)
    out = _run(q, kc, vc, lens, None, None, None, None, 0.0, -1, num_splits=2)
    assert rel_err(out, ref) <= tol(torch.float16)
    pk, bt, _ = _paged(kc, None, bs, g)
    pv = torch.empty_like(pk)
    pv.view(-1, bs, Hk, D)[bt.reshape(-1).long()] = vc.reshape(-1, bs, Hk, D)
    bt_t = bt.t().contiguous().t()  # same values, stride (1, B)
    assert bt_t.stride(1) != 1
    outp = _run(q, pk, pv, lens, bt_t, None, None, None, 0.0, -1, num_splits=2)
    assert rel_err(outp, out.double()) <= tol(torch.float16)
