"""Cases both prefill attention kernels must pass, run on the CUDA emulator through the real adapter: the
sm_80 kernel (cp.async delivered at the wait or at issue) and the sm_90a kernel (TMA delivered lazily or
eagerly; one-tile and intra-warpgroup-overlap loops). Packed varlen sequences whose key tiles run past a
sequence's end, another sequence's inf / NaN, strided views, blocks that see no key."""
import shutil

import pytest
import torch

from _attention_emu import ATT, MASKS, TOL, check as _check, load_emu, rand as _rand, reference_of, runner

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the CUDA emulator is built with g++")

CONFIGS = {  # id: (kernel, emulator timing variable, timing, overlap)
    "sm80-lazy": ("sm80", "LLMKERN_EMU_CP_ASYNC", "lazy", False),
    "sm80-eager": ("sm80", "LLMKERN_EMU_CP_ASYNC", "eager", False),
    "sm90-lazy": ("sm90", "LLMKERN_EMU_TMA", "lazy", False),
    "sm90-eager": ("sm90", "LLMKERN_EMU_TMA", "eager", False),
    "sm90-lazy-overlap": ("sm90", "LLMKERN_EMU_TMA", "lazy", True),
    "sm90-eager-overlap": ("sm90", "LLMKERN_EMU_TMA", "eager", True),
}


@pytest.fixture(scope="module")
def emu():
    return load_emu()


@pytest.fixture(params=list(CONFIGS))
def run(request, emu, monkeypatch):
    kernel, var, timing, overlap = CONFIGS[request.param]
    monkeypatch.setenv(var, timing)
    monkeypatch.setattr(ATT, "_CUDA_WGMMA", kernel == "sm90")
    monkeypatch.setattr(ATT, "_CUDA_OVERLAP", overlap)
    monkeypatch.setattr(ATT, "_CUDA_WIDE", False)
    return runner(emu, kernel)


@pytest.mark.parametrize("mask", ["full", "causal", "window_both"])
@pytest.mark.parametrize("D", [64, 128])
def test_packed_varlen(run, D, mask):
    """Sequences of 1, 0, 5, 150 and 40 queries over 3, 1, 5, 300 and 0 keys, 2 trailing rows in no
    sequence: key tiles run past each sequence's end into the next one (sm_80: zero-filled, not read;
    sm_90a: read by the TMA, masked, and V zeroed)."""
    g = torch.Generator().manual_seed(D)
    sq, sk = [1, 0, 5, 150, 40], [3, 1, 5, 300, 0]
    cu_q = torch.tensor([0] + sq).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + sk).cumsum(0).to(torch.int32)
    q = _rand(sum(sq) + 2, 4, D, dtype=torch.float16, g=g)
    k, v = _rand(sum(sk), 2, D, dtype=torch.float16, g=g), _rand(sum(sk), 2, D, dtype=torch.float16, g=g)
    _check(run, q, k, v, cu_q=cu_q, cu_k=cu_k, **MASKS[mask])


def test_packed_neighbour_inf_and_nan_do_not_leak(run):
    """The tile that cuts sequence 0's keys: inf in sequence 1's V (0 * inf) and NaN in its K must not reach
    sequence 0; sequence 1 itself gets NaN rows (its own NaN keys)."""
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
    """The adapter's strides reach the kernel: a slice of a fused qkv, a [B, H, S, D] tensor seen as
    [B, S, H, D], and size-1 dimensions (stride 0 from the adapter; the sm_90a tensor maps replace it)."""
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
    """A window that ends before key 0 for every row of the first query tiles: those blocks load nothing and
    multiply nothing; out 0 and lse -inf."""
    g = torch.Generator().manual_seed(5)
    q = _rand(1, 300, 2, 64, dtype=torch.float16, g=g)
    k, v = _rand(1, 3, 2, 64, dtype=torch.float16, g=g), _rand(1, 3, 2, 64, dtype=torch.float16, g=g)
    out, lse = _check(run, q, k, v, causal=True, window_left=2)
    assert torch.equal(out[0, :290], torch.zeros_like(out[0, :290]))
