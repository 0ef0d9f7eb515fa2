"""The sm_90a emulation itself (include/llmkern/cuda/sm90.cuh, sm90_tma_host.h, cuda_runtime.h): small TMA +
wgmma GEMMs (SS, both K-major; RS with B MN-major), an mbarrier producer / consumer ring and raw TMA boxes
(sm90_selftest.cu), against float64 references on the same 16-bit inputs; and mutations that show the model
is strict (a wrong descriptor or swizzle gives a wrong result, a missing wait reads the 0xFF poison, a
deadlock raises). Checks the emulator, not the hardware: the GPU tests remain the real check."""
import shutil

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the CUDA emulator is built with g++")

DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def m():
    import build_emu

    return build_emu.load(ops=(), sources=["tests/cuda_emu/sm90_selftest.cu"], binds=["sm90_selftest"],
                          name="_C_cuda_emu_sm90")


@pytest.fixture
def tma_policy(monkeypatch):
    def set_(p):
        monkeypatch.setenv("LLMKERN_EMU_TMA", p)
    return set_


def rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if not np.isfinite(got).all():
        return float("inf")
    return float(np.abs(got - want).max() / np.abs(want).max())


def ref(a, b):  # float64 a @ b on the 16-bit values
    return a.double().numpy() @ b.double().numpy()


def inputs(shape_a, shape_b, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape_a, generator=g).to(dtype), torch.randn(*shape_b, generator=g).to(dtype)


def gemm_ss(m, dtype, N, K, flags=0):
    a, b = inputs((64, K), (N, K), dtype)
    out = torch.full((64, N), float("nan"))
    m.gemm_ss(dtype == torch.bfloat16, N, K, a.data_ptr(), b.data_ptr(), out.data_ptr(), flags)
    return out, ref(a, b.T)


def gemm_rs(m, dtype, N, K, flags=0):
    a, b = inputs((64, K), (K, N), dtype, seed=1)
    out = torch.full((64, N), float("nan"))
    m.gemm_rs(dtype == torch.bfloat16, N, K, a.data_ptr(), b.data_ptr(), out.data_ptr(), flags)
    return out, ref(a, b)


# ---------------------------------------------------------------- correct kernels


@pytest.mark.parametrize("policy", ["lazy", "eager"])
@pytest.mark.parametrize("N,K", [(64, 64), (128, 128), (64, 128), (128, 64)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gemm_ss(m, tma_policy, dtype, N, K, policy):
    tma_policy(policy)
    out, want = gemm_ss(m, dtype, N, K)
    assert rel(out, want) < 1e-6


@pytest.mark.parametrize("base", ["0x10", "0x7f0", "0x400"])
def test_shared_window_base(m, monkeypatch, base):
    """Wherever the dynamic shared memory starts in the shared window, kernels that align it work."""
    monkeypatch.setenv("LLMKERN_EMU_SMEM_BASE", base)
    out, want = gemm_ss(m, torch.float16, 128, 128)
    assert rel(out, want) < 1e-6


@pytest.mark.parametrize("N,K", [(64, 64), (128, 128), (128, 64)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gemm_rs_mn_major(m, dtype, N, K):
    out, want = gemm_rs(m, dtype, N, K)
    assert rel(out, want) < 1e-6


def test_manual_store_with_tile_offset_matches_tma(m):
    """A stored by the threads through sm90_layout.cuh's tile_offset reads the same as A stored by TMA."""
    out, want = gemm_ss(m, torch.bfloat16, 64, 128, m.flags["manual_a"])
    assert rel(out, want) < 1e-6


@pytest.mark.parametrize("policy", ["lazy", "eager"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ring(m, tma_policy, dtype, policy):
    """2 stages, 7 iterations: the full / empty barriers go through several phases."""
    tma_policy(policy)
    iters = 7
    a, b = inputs((64, 64 * iters), (64, 64 * iters), dtype, seed=2)
    out = torch.full((64, 64), float("nan"))
    m.ring(dtype == torch.bfloat16, iters, a.data_ptr(), b.data_ptr(), out.data_ptr(), 0)
    assert rel(out, ref(a, b.T)) < 1e-6


@pytest.mark.parametrize("N,K,init", [(128, 128, 0), (256, 256, 5), (256, 128, 2**31 - 1000)])
def test_gemm_s8(m, N, K, init):
    """int8 wgmma (m64nNk32) on 2-D uint8 TMA boxes of 128 columns: exact int32, wrapping."""
    g = torch.Generator().manual_seed(4)
    a = torch.randint(-128, 128, (64, K), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
    if init:
        a[:, :8], b[:, :8] = 127, 127  # pushes every sum past 2^31
    out = torch.zeros(64, N, dtype=torch.int32)
    m.gemm_s8(N, K, a.data_ptr(), b.data_ptr(), out.data_ptr(), init)
    want = (a.long() @ b.long().T + init) % 2**32
    want = torch.where(want >= 2**31, want - 2**32, want).to(torch.int32)
    assert torch.equal(out, want)


def swizzled_box(t, c, box):
    """The TMA box of 4-D tensor t (dims innermost first: t[d3, d2, d1, d0]) at coordinates c, zero outside,
    as SWIZZLE_128B lays it out: box row r (the rows (i1, i2, i3) in order), 16-byte chunk j at chunk j ^ (r % 8)."""
    b0, b1, b2, b3 = box
    rows = np.zeros((b3, b2, b1, b0), np.uint16)
    src = t.view(torch.int16).numpy().view(np.uint16)
    for i3 in range(b3):
        for i2 in range(b2):
            for i1 in range(b1):
                for i0 in range(b0):
                    x = (c[0] + i0, c[1] + i1, c[2] + i2, c[3] + i3)
                    if all(0 <= x[d] < src.shape[3 - d] for d in range(4)):
                        rows[i3, i2, i1, i0] = src[x[3], x[2], x[1], x[0]]
    rows = rows.reshape(-1, 8, 8)  # [row][chunk][value]
    out = np.empty_like(rows)
    for r in range(rows.shape[0]):
        for j in range(8):
            out[r, j ^ (r % 8)] = rows[r, j]
    return out.reshape(-1)


@pytest.mark.parametrize("coords", [(0, 0, 0, 0), (-16, 3, 0, 0), (40, -2, 1, 0), (8, 5, -1, 1), (-64, 0, 0, 0),
                                    (0, 0, 0, 2)])
def test_tma_box_swizzle_and_zero_fill(m, coords):
    """A 4-D box (64, 3, 2, 2) with coordinates past every edge: out-of-bounds elements are zeros; the raw
    shared memory is the 128-byte swizzle of the box rows."""
    dims = (104, 7, 3, 2)  # d0 (contiguous) .. d3: byte strides 208, 1456, 4368 (multiples of 16)
    t = torch.randn(dims[3], dims[2], dims[1], dims[0]).to(torch.bfloat16)
    strides = (dims[0] * 2, dims[0] * dims[1] * 2, dims[0] * dims[1] * dims[2] * 2)
    box = (64, 3, 2, 2)
    out = torch.full((64 * 3 * 2 * 2 * 2,), 0xAB, dtype=torch.uint8)
    m.tma_box(t.data_ptr(), dims, strides, box, coords, out.data_ptr())
    got = out.numpy().view(np.uint16)
    assert np.array_equal(got, swizzled_box(t, coords, box))


def test_tma_box_strided_rows(m):
    """A 2-D view with a padded row pitch (strides are bytes, not dims)."""
    full = torch.randn(20, 136).to(torch.bfloat16)
    view = full[:, :72]
    out = torch.zeros(64 * 16 * 2, dtype=torch.uint8)
    m.tma_box(view.data_ptr(), (72, 20, 1, 1), (136 * 2, 20 * 136 * 2, 20 * 136 * 2), (64, 16, 1, 1), (16, 10, 0, 0),
              out.data_ptr())
    t = view.contiguous().reshape(1, 1, 20, 72)
    assert np.array_equal(out.numpy().view(np.uint16), swizzled_box(t, (16, 10, 0, 0), (64, 16, 1, 1)))


def test_encode_checks(m):
    x = torch.zeros(4096, dtype=torch.bfloat16)
    p = x.data_ptr()
    ok = ((64, 8, 1, 1), (128, 1024, 1024), (64, 8, 1, 1))
    assert m.encode(p, *ok)
    assert not m.encode(p + 2, *ok)  # base not 16-byte aligned
    assert not m.encode(p, (64, 8, 1, 1), (136, 1024, 1024), (64, 8, 1, 1))  # stride not a multiple of 16
    assert not m.encode(p, (64, 8, 1, 1), (1 << 40, 1024, 1024), (64, 8, 1, 1))  # stride >= 2^40
    assert not m.encode(p, (64, 8, 1, 1), (128, 1024, 1024), (128, 8, 1, 1))  # box row of 256 bytes > swizzle
    assert not m.encode(p, (64, 8, 1, 1), (128, 1024, 1024), (64, 257, 1, 1))  # box dim > 256
    assert not m.encode(p, (64, 8, 1, 0), (128, 1024, 1024), (64, 8, 1, 1))  # dim 0
    assert not m.encode(p, (64, 8, 1, 1), (128, 1024, 1024), (4, 8, 1, 1))  # box row of 8 bytes
    assert m.encode(p, (64, 8, 1, 1), (128, 1024, 1024), (32, 8, 1, 1))  # 64-byte rows: legal (not loadable here)


# ---------------------------------------------------------------- mutations: the emulator notices


def test_wrong_sbo_gives_a_wrong_result(m):
    out, want = gemm_ss(m, torch.bfloat16, 64, 64, m.flags["bad_sbo"])
    assert rel(out, want) > 0.1


def test_wrong_lbo_gives_a_wrong_result(m):
    out, want = gemm_rs(m, torch.bfloat16, 128, 64, m.flags["bad_sbo"])
    assert rel(out, want) > 0.1


@pytest.mark.parametrize("K", [64, 128])
def test_wrong_major_gives_a_wrong_result(m, K):
    """B stored MN-major, read K-major: wrong values, or reads past the tile (outside the shared memory)."""
    try:
        out, want = gemm_rs(m, torch.float16, 64, K, m.flags["wrong_major"])
    except RuntimeError as e:
        assert "outside the block's dynamic shared memory" in str(e)
    else:
        assert rel(out, want) > 0.1


def test_wrong_swizzle_gives_a_wrong_result(m):
    out, want = gemm_ss(m, torch.bfloat16, 64, 128, m.flags["manual_a"] | m.flags["manual_no_swizzle"])
    assert rel(out, want) > 0.1


def test_missing_wait_reads_poison(m, tma_policy):
    tma_policy("lazy")
    out, _ = gemm_ss(m, torch.float16, 64, 64, m.flags["skip_wait"])
    assert torch.isnan(out).all()


def test_operand_overwritten_before_wgmma_wait(m):
    """The math happens at the wgmma_wait, on the shared memory of that moment."""
    out, want = gemm_ss(m, torch.bfloat16, 64, 64, m.flags["overwrite_a"])
    assert torch.equal(out, torch.zeros_like(out)) and rel(out, want) > 0.1


def test_early_release_is_overwritten(m, tma_policy):
    """Eager TMA: a stage released (empty barrier) before the wgmma that reads it retired gets the next tile."""
    tma_policy("eager")
    iters = 5
    a, b = inputs((64, 64 * iters), (64, 64 * iters), torch.bfloat16, seed=3)
    out = torch.full((64, 64), float("nan"))
    m.ring(True, iters, a.data_ptr(), b.data_ptr(), out.data_ptr(), m.flags["early_release"])
    assert rel(out, ref(a, b.T)) > 0.1


@pytest.mark.parametrize("flag,match", [
    ("deadlock", r"deadlock.*mbar_wait\(0x[0-9a-f]+, parity 0\) \[phase 0, pending arrivals 1/2, tx 0\]"),
    ("no_align", "not 1024-byte aligned"),
    ("clobber_acc", "wrote its accumulators"),
    ("no_fence", "without a wgmma_fence"),
])
def test_errors(m, flag, match):
    with pytest.raises(RuntimeError, match=match):
        gemm_ss(m, torch.bfloat16, 64, 64, m.flags[flag])


def test_rs_a_registers_written_before_the_wait_raise(m):
    """An RS wgmma reads its A registers asynchronously: rewriting one before the retiring wait is an error."""
    with pytest.raises(RuntimeError, match="wrote the A fragment registers"):
        gemm_rs(m, torch.bfloat16, 64, 64, m.flags["clobber_a"])


def test_syncthreads_counts_live_threads_and_named_barrier_deadlock(m):
    out = torch.zeros(128, dtype=torch.int32)
    m.barriers(0, out.data_ptr())
    assert out[:64].eq(1).all() and out[64:].eq(0).all()
    with pytest.raises(RuntimeError, match=r"deadlock.*threads 0-63: a named barrier \(bar.sync\) \(1, 128\); "
                                           r"threads 64-127: exited"):
        m.barriers(1, out.data_ptr())


def test_emulator_still_usable_after_an_error(m):
    with pytest.raises(RuntimeError):
        gemm_ss(m, torch.bfloat16, 64, 64, m.flags["deadlock"])
    out, want = gemm_ss(m, torch.bfloat16, 64, 64)
    assert rel(out, want) < 1e-6
