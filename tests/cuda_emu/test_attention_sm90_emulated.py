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

from _attention_emu import ATT, MASKS, check as _check, load_emu, rand as _rand, runner

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


def test_many_ring_wraps_and_turns(run):
    """2000 keys: 16 key tiles through the 2-stage ring (8 wraps: every mbarrier parity flips 8 times) and
    16 ping-pong turns per consumer, causal with 300 query rows (3 query tiles of different lengths)."""
    g = torch.Generator().manual_seed(6)
    q = _rand(1, 300, 2, 128, dtype=torch.bfloat16, g=g)
    k, v = _rand(1, 2000, 1, 128, dtype=torch.bfloat16, g=g), _rand(1, 2000, 1, 128, dtype=torch.bfloat16, g=g)
    _check(run, q, k, v, causal=True)
    _check(run, q, k, v)


@pytest.mark.parametrize("view", ["kv_batch", "kv_heads", "q_batch"])
def test_broadcast_views_take_the_sm80_kernel(emu, monkeypatch, view):
    """Broadcast (expanded) q / k / v have stride 0 on a dimension longer than 1, which no TMA map describes:
    with the sm_90a kernel on, such a call runs the sm_80 kernel (found by fuzzing: the tensor maps read batch /
    head 1.. past the storage, NaN or garbage out)."""
    monkeypatch.setattr(ATT, "_CUDA_WGMMA", True)
    monkeypatch.setattr(ATT, "_CUDA_OVERLAP", False)
    g = torch.Generator().manual_seed(9)
    B, Sq, Sk, H, D = 2, 8, 64, 2, 64
    r = lambda *s: _rand(*s, dtype=torch.float16, g=g)  # noqa: E731
    if view == "kv_batch":
        q, k, v = r(B, Sq, H, D), r(1, Sk, H, D).expand(B, Sk, H, D), r(1, Sk, H, D).expand(B, Sk, H, D)
    elif view == "kv_heads":
        q, k, v = r(B, Sq, H, D), r(B, Sk, 1, D).expand(B, Sk, H, D), r(B, Sk, 1, D).expand(B, Sk, H, D)
    else:
        q, k, v = r(1, Sq, H, D).expand(B, Sq, H, D), r(B, Sk, H, D), r(B, Sk, H, D)
    _check(runner(emu, "sm80"), q, k, v)
