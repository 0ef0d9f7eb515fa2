"""The build contract: no torch headers in compiled code; the CUDA module builds and imports without a GPU."""
import pathlib
import re
import shutil

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_compiled_sources_never_include_torch():
    pattern = re.compile(r'#\s*include\s*[<"](torch|ATen|c10)/')
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*")
                 if p.suffix in {".h", ".hpp", ".cuh", ".cpp", ".cu", ".cc"} and pattern.search(p.read_text())]
    assert not offenders, f"torch headers included in {offenders}"


def test_cpu_module_imports():
    import llmkern._C as C

    assert C.resolve_isa("") in ("avx512_vnni", "avx2", "scalar")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH: llmkern._C_cuda is not built here")
def test_cuda_module_built_for_sm80_and_sm90a_and_imports_without_gpu():
    import llmkern._C_cuda as CU

    info = CU.build_info()
    assert info["cudart_static_version"] >= 11000
    assert info["device_count"] >= 0  # 0 with an error string on a machine without a driver
    report = (pathlib.Path(CU.__file__).parent / "_C_cuda.ptxas.txt").read_text()
    assert "for 'sm_80'" in report and "for 'sm_90a'" in report
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert spills and all(s == ("0", "0") for s in spills), "register spills in CUDA kernels"


@pytest.mark.parametrize("n", [0, 1, 17, 63, 64, 1000003])
@pytest.mark.parametrize("threads", [1, 2])
def test_read_sum_probe_sums_every_element(n, threads):
    """_C.read_sum (the benchmarks' bandwidth probe) reads all n floats on every ISA: its sum of
    small integers is exact, so a skipped or doubly read element would show."""
    import llmkern._C as C

    x = torch.randint(-3, 4, (n,), dtype=torch.float32)
    want = float(x.double().sum())
    for isa in ("avx512_vnni", "avx2", "scalar"):
        try:
            C.resolve_isa(isa)
        except ValueError:
            continue
        assert C.read_sum(x.data_ptr() if n else 0, n, threads, isa) == want, isa
    with pytest.raises(ValueError, match="n must be >= 0"):
        C.read_sum(x.data_ptr(), -1, 1)
