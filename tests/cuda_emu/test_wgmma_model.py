"""The sm_90a wgmma int4 GEMM (csrc/include/llmkern/cuda/wgmma_int4.cuh) on its CPU model
(scripts/emulate_wgmma.py): shared-memory descriptors, the 128B swizzle, the wgmma D fragment, the 3-stage
ring (a write-after-read race would read NaN), cp.async zero fill, K / M / N tails and the grouped raster,
end to end against numpy. Checks index math only; the GPU tests (tests/ops/test_int4_linear_cuda.py,
CUDA_INT4_WGMMA) remain the real check."""
import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def emu():
    spec = importlib.util.spec_from_file_location("emulate_wgmma", ROOT / "scripts" / "emulate_wgmma.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_static_layouts(emu):
    emu.check_static()


@pytest.mark.parametrize("case", range(6))
def test_gemm_end_to_end(emu, case):
    M, N, K, G, BM, dtype, bias, base = emu.CASES[case]
    assert emu.run_case(M, N, K, G, BM, dtype, bias=bias, smem_base_raw=base) < 1e-12


def test_model_catches_a_wrong_swizzle(emu, monkeypatch):
    """The model is not vacuous: a kernel-side swizzle that disagrees with the hardware's fails."""
    monkeypatch.setattr(emu, "swz128", lambda r, c: r * emu.kRowBytes + ((c ^ ((r >> 1) & 7)) << 4))
    with pytest.raises(AssertionError):
        emu.run_case(17, 33, 128, 32, 64, emu.torch.bfloat16)


def test_launcher_reads_the_wgmma_flag_without_a_gpu():
    """Dispatch wiring on a machine without a GPU: with wgmma=True (what CUDA_INT4_WGMMA asks on sm_90) the M > 16
    route goes to the wgmma launcher, which refuses a non-sm_90 device (ValueError) before launching; without
    it the mma.sync route is launched (and fails for lack of a driver)."""
    import importlib

    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: tests/ops/test_int4_linear_cuda.py covers the route")
    try:
        import llmkern._C_cuda as CU
    except ImportError:
        pytest.skip("llmkern._C_cuda is not built")
    m4 = importlib.import_module("llmkern.ops.int4_linear")
    assert m4.CUDA_INT4_WGMMA is False  # never run on a GPU yet: opt-in only
    M, N, K, G = 32, 40, 64, 32
    x = torch.zeros(M, K, dtype=torch.bfloat16)
    qw = torch.zeros(N, K // 2, dtype=torch.uint8)
    s, o = torch.ones(N, K // G), torch.zeros(N, K // G)
    out = torch.empty(M, N, dtype=torch.bfloat16)

    def call(wgmma):
        return CU.int4_linear(x.data_ptr(), 1, K, M, K, qw.data_ptr(), N, s.data_ptr(), o.data_ptr(), G, 0,
                              out.data_ptr(), N, 0, 1, 132, True, 0, wgmma)

    with pytest.raises(ValueError, match="compute capability 9.0"):
        call(True)
    with pytest.raises(RuntimeError, match="CUDA"):
        call(False)
