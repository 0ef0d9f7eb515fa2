"""The sm_90a attention kernel (csrc/include/llmkern/cuda/attention_sm90.cuh: TMA, mbarriers, wgmma, a producer
warp and two consumer warpgroups) run on the CPU through the CUDA emulator: the real Python adapter
(llmkern.ops.attention._cuda_launch with LLMKERN_CUDA_ATTN_WGMMA's switch on), binding, launcher (tensor
maps) and kernel, against the float64 reference on the same 16-bit inputs. Both TMA timings of the
emulator (loads delivered lazily, so a missing wait reads NaN poison; or eagerly, so a stage refilled too
early is overwritten), and both consumer loops (one tile at a time; FlashAttention-3's intra-warpgroup
overlap, 64-key tiles at D = 128). What the emulator cannot tell (the hardware's agreement with its model of
descriptors, swizzle and fragments) is left to tests/ops/test_attention_cuda.py -k sm90 on an H100/H200."""
import shutil

import pytest
import torch

from _attention_emu import ATT, MASKS, TOL, check as _check, load_emu, rand as _rand, reference_of, runner

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the CUDA emulator is built with g++")


@pytest.fixture(scope="module")
def emu():
    return load_emu()


@pytest.fixture(params=[("lazy", False), ("eager", False), ("lazy", True), ("eager", True)],
                ids=["lazy", "eager", "lazy-overlap", "eager-overlap"])
def run(request, emu, monkeypatch):
    """The emulator's TMA timing x LLMKERN_CUDA_ATTN_OVERLAP (the intra-warpgroup-overlap variant; 64-key
    tiles at D = 128)."""
    timing, overlap = request.param
    monkeypatch.setenv("LLMKERN_EMU_TMA", timing)
    monkeypatch.setattr(ATT, "_CUDA_WGMMA", True)
    monkeypatch.setattr(ATT, "_CUDA_OVERLAP", overlap)
    return runner(emu, "sm90")


# (B, Sq, Sk, Hq, Hk, D): one row, GQA 2, MQA, Sq > Sk (rows without keys), query tiles of 128 + 2 rows,
# keys crossing several 128-key tiles (the 2-stage ring wraps: phases flip).
CASES = [(1, 1, 1, 2, 2, 64), (2, 17, 17, 4, 2, 64), (1, 100, 257, 4, 1, 128), (1, 200, 70, 2, 2, 128),
         (1, 130, 600, 2, 1, 64)]


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_batched(run, case, mask):
    B, Sq, Sk, Hq, Hk, D = case
    g = torch.Generator().manual_seed(Sq * 7 + Sk)
    dtype = torch.bfloat16 if D == 128 else torch.float16
    q, k, v = _rand(B, Sq, Hq, D, dtype=dtype, g=g), _rand(B, Sk, Hk, D, dtype=dtype, g=g), \
        _rand(B, Sk, Hk, D, dtype=dtype, g=g)
    _check(run, q, k, v, **MASKS[mask])


@pytest.mark.parametrize("mask", ["full", "causal", "window_both"])
@pytest.mark.parametrize("D", [64, 128])
def test_packed_varlen(run, D, mask):
    """Sequences of 0, 1, 5, 150 and 40 queries over 3, 1, 5, 300 and 0 keys, 2 trailing rows in no
    sequence: key tiles run past each sequence's end into the next one."""
    g = torch.Generator().manual_seed(D)
    sq, sk = [1, 0, 5, 150, 40], [3, 1, 5, 300, 0]
    cu_q = torch.tensor([0] + sq).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + sk).cumsum(0).to(torch.int32)
    q = _rand(sum(sq) + 2, 4, D, dtype=torch.float16, g=g)
    k, v = _rand(sum(sk), 2, D, dtype=torch.float16, g=g), _rand(sum(sk), 2, D, dtype=torch.float16, g=g)
    _check(run, q, k, v, cu_q=cu_q, cu_k=cu_k, **MASKS[mask])


def test_packed_neighbour_inf_and_nan_do_not_leak(run):
    """The tile that cuts sequence 0's keys reads sequence 1's rows: inf in their V (0 * inf) and NaN in
    their K must not reach sequence 0; sequence 1 itself gets NaN rows (its own NaN keys)."""
    g = torch.Generator().manual_seed(3)
    cu_q, cu_k = torch.tensor([0, 3, 53], dtype=torch.int32), torch.tensor([0, 7, 307], dtype=torch.int32)
    q = _rand(53, 2, 128, dtype=torch.bfloat16, g=g)
    k, v = _rand(307, 1, 128, dtype=torch.bfloat16, g=g), _rand(307, 1, 128, dtype=torch.bfloat16, g=g)
    v[7:20] = float("inf")
    k[7:20] = float("nan")
    out, _ = run(q, k, v, cu_q=cu_q, cu_k=cu_k)
    ref = reference_of(q[None, :3], k[None, :7], v[None, :7])[0][0]
    assert torch.isfinite(out[:3]).all()
    assert ((out[:3].double() - ref.double()).norm() / ref.double().norm()).item() <= TOL
    assert torch.isnan(out[3:]).all()


@pytest.mark.parametrize("layout", ["fused_qkv_slice", "bhsd_transposed", "single_head_and_row"])
def test_strided_views(run, layout):
    """Tensor maps take the adapter's strides: a slice of a fused qkv, a [B, H, S, D] tensor seen as
    [B, S, H, D], and size-1 dimensions (stride 0 from the adapter, replaced by a natural one)."""
    g = torch.Generator().manual_seed(4)
    if layout == "fused_qkv_slice":
        qkv = _rand(2, 140, 6, 64, dtype=torch.float16, g=g)
        q, k, v = qkv[:, :, :2], qkv[:, :, 2:4], qkv[:, :, 4:]
    elif layout == "bhsd_transposed":
        q, k, v = (_rand(1, 2, 150, 128, dtype=torch.bfloat16, g=g).transpose(1, 2) for _ in range(3))
    else:
        q, k, v = (_rand(1, 1, 1, 64, dtype=torch.float16, g=g) for _ in range(3))
    _check(run, q, k, v, causal=True)


def test_no_visible_key_rows_are_zero(run):
    """A window that ends before key 0 for every row of the first query tile: no TMA load at all in that
    block (the producer issues nothing, the consumers wait for nothing), out 0 and lse -inf."""
    g = torch.Generator().manual_seed(5)
    q = _rand(1, 300, 2, 64, dtype=torch.float16, g=g)
    k, v = _rand(1, 3, 2, 64, dtype=torch.float16, g=g), _rand(1, 3, 2, 64, dtype=torch.float16, g=g)
    out, lse = _check(run, q, k, v, causal=True, window_left=2)
    assert torch.equal(out[0, :290], torch.zeros_like(out[0, :290]))


def test_many_ring_wraps_and_turns(run):
    """2000 keys: 16 key tiles through the 2-stage ring (8 wraps: every mbarrier parity flips 8 times) and
    16 ping-pong turns per consumer, causal with 300 query rows (3 query tiles of different lengths)."""
    g = torch.Generator().manual_seed(6)
    q = _rand(1, 300, 2, 128, dtype=torch.bfloat16, g=g)
    k, v = _rand(1, 2000, 1, 128, dtype=torch.bfloat16, g=g), _rand(1, 2000, 1, 128, dtype=torch.bfloat16, g=g)
    _check(run, q, k, v, causal=True)
    _check(run, q, k, v)
