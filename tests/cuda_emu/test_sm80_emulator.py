"""The sm_80 emulation itself (include/llmkern/cuda/sm80.cuh, cuda_runtime.h's shared memory): cp.async group
semantics (wait_group N completes all but the N newest committed groups of the thread; uncommitted copies stay
pending; partial src-size zero-fills; data lands only at the wait, so early reads see the 0xFF poison, per
block), ldmatrix / ldmatrix.trans distributions and mma.sync m16n8k16 / m16n8k32 fragments against the PTX
ISA's formulas (sm80_selftest.cu loads the fragments per lane by plain indexing), and the errors a broken
kernel gets (misaligned addresses, unordered copies, exits with copies in flight, lanes at different
collectives, an exited lane, a misaligned vector __ldg, dynamic shared memory above 48 KiB without the
per-kernel opt-in). Checks the emulator, not the hardware."""
import shutil

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the CUDA emulator is built with g++")


@pytest.fixture(scope="module")
def m():
    import build_emu

    return build_emu.load(ops=(), sources=["tests/cuda_emu/sm80_selftest.cu"], binds=["sm80_selftest"],
                          name="_C_cuda_emu_sm80")


def _src():
    return torch.arange(512, dtype=torch.int32).remainder(251).to(torch.uint8) + 1  # no 0x00 / 0xFF bytes


def _cp(m, mode):
    src = _src()
    out = torch.full((512,), 0x55, dtype=torch.uint8)
    m.cp_async(src.data_ptr(), out.data_ptr(), mode)
    return src.view(32, 16), out.view(32, 16)



def test_cp_async_correct_use(m):
    src, out = _cp(m, 0)
    assert torch.equal(out, src.roll(-1, 0))


def test_cp_async_read_before_wait_sees_poison(m):
    _, out = _cp(m, 1)
    assert (out == 0xFF).all()


def test_cp_async_wait_group_completes_older_groups_only(m):
    src, out = _cp(m, 2)
    assert torch.equal(out[0::2], src[0::2]) and (out[1::2] == 0xFF).all()


def test_cp_async_src_size_zero_fills(m):
    src, out = _cp(m, 3)
    for t in range(32):
        n = t % 17
        assert torch.equal(out[t, :n], src[t, :n]) and (out[t, n:] == 0).all(), t


def test_cp_async_needs_a_barrier_for_other_threads_data(m):
    """Thread t waits for its own copy and reads thread t + 1's chunk: not landed yet (poison); thread 31 reads
    thread 0's, which thread 0 waited for. Block 1 sees the poison again: static shared memory is per block."""
    src, out = _cp(m, 8)
    assert (out[:31] == 0xFF).all() and torch.equal(out[31], src[0])


def test_cp_async_uncommitted_copies_stay_pending(m):
    _, out = _cp(m, 10)
    assert (out == 0xFF).all()


@pytest.mark.parametrize("mode,msg", [(4, "shared destination .* not 16-byte aligned"),
                                      (5, "global source .* not 16-byte aligned"),
                                      (6, "two copies in flight"),
                                      (7, "exited with 32 cp.async copies never completed"),
                                      (9, "ldmatrix: reads shared address .* while a cp.async to it is in flight"),
                                      (11, "not a pointer into shared memory")])
def test_cp_async_errors(m, mode, msg):
    with pytest.raises(RuntimeError, match=msg):
        _cp(m, mode)


@pytest.mark.parametrize("trans", [False, True])
def test_ldmatrix_distribution(m, trans):
    """Lane l gets, from matrix i, row l / 4 columns 2 (l % 4) and + 1 (lower column in the lower half); .trans:
    rows 2 (l % 4) and + 1 of column l / 4. Rows come from the lanes' addresses (permuted in memory)."""
    buf = torch.zeros(128, dtype=torch.int32)
    m.ldmatrix(trans, buf.data_ptr(), 0)
    got = buf.numpy().view(np.uint32).reshape(32, 4)
    mat = np.array([[[256 * i + 16 * r + c for c in range(8)] for r in range(8)] for i in range(4)])
    for lane in range(32):
        for i in range(4):
            if trans:
                lo, hi = mat[i][2 * (lane % 4)][lane // 4], mat[i][2 * (lane % 4) + 1][lane // 4]
            else:
                lo, hi = mat[i][lane // 4][2 * (lane % 4)], mat[i][lane // 4][2 * (lane % 4) + 1]
            assert got[lane, i] == lo | (hi << 16), (lane, i)


@pytest.mark.parametrize("mode,msg", [(1, "row address .* not 16-byte aligned"),
                                      (2, "lanes at different warp-collective instructions"),
                                      (3, "deadlock.*ldmatrix.x4 \\(warp-collective; 31 of the warp's 32 lanes")])
def test_ldmatrix_errors(m, mode, msg):
    buf = torch.zeros(128, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=msg):
        m.ldmatrix(False, buf.data_ptr(), mode)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_mma_16bit(m, dtype):
    g = torch.Generator().manual_seed(0)
    a, bt = torch.randn(16, 16, generator=g).to(dtype), torch.randn(8, 16, generator=g).to(dtype)
    c = torch.randn(16, 8, generator=g)
    d = torch.full((16, 8), float("nan"))
    m.mma(0 if dtype == torch.float16 else 1, a.data_ptr(), bt.data_ptr(), c.data_ptr(), d.data_ptr())
    want = (a.double() @ bt.double().T + c.double()).float()
    assert torch.allclose(d, want, rtol=1e-6, atol=1e-6)


def test_mma_s8_exact_and_wrapping(m):
    g = torch.Generator().manual_seed(1)
    a = torch.randint(-128, 128, (16, 32), generator=g, dtype=torch.int8)
    bt = torch.randint(-128, 128, (8, 32), generator=g, dtype=torch.int8)
    a[:, :4], bt[:, :4] = -128, -128  # + 65536 per output
    c = torch.randint(-2**31, 2**31, (16, 8), generator=g, dtype=torch.int64)
    c[:4] = 2**31 - 10
    c = c.to(torch.int32)
    d = torch.zeros(16, 8, dtype=torch.int32)
    m.mma(2, a.data_ptr(), bt.data_ptr(), c.data_ptr(), d.data_ptr())
    want = (a.long() @ bt.long().T + c.long()) % 2**32
    want = torch.where(want >= 2**31, want - 2**32, want).to(torch.int32)
    assert torch.equal(d, want)


def test_fast_exp2_flushes_subnormals(m):
    x = torch.tensor([0.0, 1.5, -10.25, -126.0, -126.5, -140.0, float("-inf"), 128.0])
    y = torch.full_like(x, float("nan"))
    m.exp2(x.data_ptr(), y.data_ptr(), x.numel())
    want = torch.exp2(x.double()).float()
    want[4:6] = 0.0  # 2^-126.5, 2^-140: subnormal in fp32 -> 0
    assert torch.equal(y, want)


def test_lop3_and_or(m):
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randint(-2**31, 2**31 - 1, (100,), generator=g, dtype=torch.int32) for _ in range(3))
    d = torch.zeros(100, dtype=torch.int32)
    m.lop3_and_or(a.data_ptr(), b.data_ptr(), c.data_ptr(), d.data_ptr(), 100)
    assert torch.equal(d, (a & b) | c)


def test_vector_ldg_alignment_and_dynamic_smem_opt_in(m):
    src = torch.arange(64, dtype=torch.uint8)
    out = torch.zeros(32, dtype=torch.int32)
    m.misc(src.data_ptr(), 16, out.data_ptr(), 1024, False)
    assert (out == int.from_bytes(bytes(range(16, 20)), "little") + 1).all()
    with pytest.raises(RuntimeError, match="misaligned 16-byte vector access"):
        m.misc(src.data_ptr(), 8, out.data_ptr(), 1024, False)
    with pytest.raises(RuntimeError, match="without cudaFuncSetAttribute"):
        m.misc(src.data_ptr(), 16, out.data_ptr(), 64 << 10, False)
    m.misc(src.data_ptr(), 16, out.data_ptr(), 64 << 10, True)  # opted in: the whole 64 KiB is usable
    m.misc(src.data_ptr(), 16, out.data_ptr(), 60 << 10, False)  # the attribute stays set for the kernel
