"""The sm_80 prefill attention kernel (csrc/include/llmkern/cuda/attention.cuh: cp.async double buffering,
ldmatrix / ldmatrix.trans, mma.sync m16n8k16, online softmax in registers) run on the CPU through the CUDA
emulator (include/llmkern/cuda/sm80.cuh models those instructions from the PTX ISA): the real Python adapter
(llmkern.ops.attention._cuda_launch with LLMKERN_CUDA_ATTN_WGMMA's switch off, LLMKERN_CUDA_ATTN_WIDE's on and
off), binding, launcher and kernel, against the float64 reference on the same 16-bit inputs. Both cp.async
timings of the emulator (data delivered at the wait, so a read before the wait / without the barrier reads
NaN poison; or at issue, so a buffer refilled while other warps still read it is overwritten). The GPU test
(tests/ops/test_attention_cuda.py) remains the check of the hardware itself."""
import shutil

import pytest
import torch

from _attention_emu import ATT, MASKS, check as _check, load_emu, rand as _rand, runner

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the CUDA emulator is built with g++")


@pytest.fixture(scope="module")
def emu():
    return load_emu()


def _runner(emu, monkeypatch, timing, wide):
    monkeypatch.setenv("LLMKERN_EMU_CP_ASYNC", timing)
    monkeypatch.setattr(ATT, "_CUDA_WGMMA", False)
    monkeypatch.setattr(ATT, "_CUDA_WIDE", wide)
    return runner(emu, "sm80")


@pytest.fixture(params=["lazy", "eager"])
def run(request, emu, monkeypatch):
    return _runner(emu, monkeypatch, request.param, False)


@pytest.fixture
def run_lazy(emu, monkeypatch):
    def make(wide=False):
        return _runner(emu, monkeypatch, "lazy", wide)
    return make


# (B, Sq, Sk, Hq, Hk, D): one row, GQA 2 with 2 sequences, MQA with Sq < Sk (keys crossing five 64-key tiles:
# both K/V buffers reused), Sq > Sk (rows without keys), D = 64 with two 128-row query tiles.
CASES = [(1, 1, 1, 2, 2, 64), (2, 17, 17, 4, 2, 64), (1, 100, 257, 2, 1, 128), (1, 150, 70, 2, 2, 128),
         (1, 130, 200, 2, 1, 64)]


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_batched(run_lazy, case, mask):
    B, Sq, Sk, Hq, Hk, D = case
    g = torch.Generator().manual_seed(Sq * 7 + Sk)
    dtype = torch.bfloat16 if (Sq + len(mask)) % 2 else torch.float16
    q, k, v = _rand(B, Sq, Hq, D, dtype=dtype, g=g), _rand(B, Sk, Hk, D, dtype=dtype, g=g), \
        _rand(B, Sk, Hk, D, dtype=dtype, g=g)
    _check(run_lazy(), q, k, v, **MASKS[mask])


@pytest.mark.parametrize("mask,dtype", [("full", torch.float16), ("causal", torch.bfloat16),
                                        ("window_both", torch.bfloat16), ("softcap_causal", torch.float16)], ids=str)
def test_d128_wide_and_narrow_tiles(run_lazy, dtype, mask):
    """D = 128 runs 64-row query tiles (4 warps) or, with LLMKERN_CUDA_ATTN_WIDE, 128-row tiles (8 warps): the
    same answers (query rows 128 + 2: a partial tile either way)."""
    g = torch.Generator().manual_seed(11)
    q = _rand(1, 130, 2, 128, dtype=dtype, g=g)
    k, v = _rand(1, 140, 1, 128, dtype=dtype, g=g), _rand(1, 140, 1, 128, dtype=dtype, g=g)
    narrow, _ = _check(run_lazy(False), q, k, v, **MASKS[mask])
    wide, _ = _check(run_lazy(True), q, k, v, **MASKS[mask])
    assert ((narrow.double() - wide.double()).norm() / narrow.double().norm()).item() <= 5e-3


@pytest.mark.parametrize("case", [(2, 40, 140, 4, 2, 64), (1, 70, 200, 2, 1, 128)], ids=lambda c: "x".join(map(str, c)))
def test_cp_async_timings(run, case):
    """Lazy (at the wait) and eager (at issue) cp.async delivery: several key tiles, so both K/V buffers are
    refilled while the other is read."""
    B, Sq, Sk, Hq, Hk, D = case
    g = torch.Generator().manual_seed(Sk)
    q, k, v = (_rand(B, S, H, D, dtype=torch.bfloat16, g=g) for S, H in ((Sq, Hq), (Sk, Hk), (Sk, Hk)))
    _check(run, q, k, v, causal=True)
    _check(run, q, k, v, window_left=30, window_right=50)
