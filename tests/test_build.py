"""The build contract: no torch headers in compiled code; the CUDA module builds and imports without a GPU."""
import os
import pathlib
import re
import shutil
import subprocess

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


# The targets setup.py built for (scripts/gpu_check.sh builds only the GPU's own).
ARCHS = [a for a in os.environ.get("LLMKERN_CUDA_ARCHS", "80;90a").split(";") if a]


def _cuobjdump():
    """cuobjdump from the CUDA toolkit, or the copy Triton ships; None if neither is here."""
    path = shutil.which("cuobjdump")
    if path is None:
        try:
            import triton

            cand = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
            path = str(cand) if cand.exists() else None
        except ImportError:
            pass
    return path


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH: llmkern._C_cuda is not built here")
def test_cuda_module_built_for_its_targets_and_imports_without_gpu():
    import llmkern._C_cuda as CU

    info = CU.build_info()
    assert info["cudart_static_version"] >= 11000
    assert info["device_count"] >= 0  # 0 with an error string on a machine without a driver
    report = (pathlib.Path(CU.__file__).parent / "_C_cuda.ptxas.txt").read_text()
    for arch in ARCHS:
        assert f"for 'sm_{arch}'" in report
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


def _cuobjdump():
    """cuobjdump from the CUDA toolkit, else the copy Triton's wheel carries; None when neither is here."""
    exe = shutil.which("cuobjdump")
    if exe:
        return exe
    try:
        import triton.backends.nvidia as tn
    except Exception:
        return None
    p = pathlib.Path(tn.__file__).parent / "bin" / "cuobjdump"
    return str(p) if p.exists() else None


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH: llmkern._C_cuda is not built here")
def test_sm90a_wgmma_kernels_use_hgmma_and_do_not_spill():
    """Issue 7: the sm_90a kernels run warpgroup MMA (HGMMA / IGMMA in SASS, not only HMMA) without spills:
    the int4 prefill GEMM (csrc/include/llmkern/cuda/wgmma_int4.cuh), the prefill attention
    (attention_sm90.cuh) and the W8A8 GEMM (int8_linear_sm90.cuh), the last two also loading by TMA
    (UTMALDG)."""
    import subprocess

    try:
        import llmkern._C_cuda as CU
    except ImportError:
        pytest.skip("llmkern._C_cuda is not built")
    report_path = pathlib.Path(CU.__file__).parent / "_C_cuda.ptxas.txt"
    if not report_path.exists():
        pytest.skip("no ptxas report beside llmkern._C_cuda")
    report = report_path.read_text()
    if "for 'sm_90a'" not in report:
        pytest.skip("llmkern._C_cuda was not built for sm_90a")
    # ptxas blocks: "Compiling entry function 'NAME' for 'sm_90a'" ... "N bytes spill stores, M bytes spill loads"
    blocks = re.findall(r"Compiling entry function '(\w+)' for 'sm_90a'\n(?:.*\n){0,2}?.*?"
                        r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    # kernel -> (instantiations, least warpgroup MMAs per instantiation (the k steps of one tile), SASS name)
    kernels = {"wgmma_int4_kernel": (4, 4, "HGMMA."), "attn_fwd_sm90_kernel": (8, 12, "HGMMA."),
               "w8a8_sm90_kernel": (1, 4, "IGMMA.")}
    for kernel, (count, _, _) in kernels.items():
        wg = {name: (st, ld) for name, st, ld in blocks if kernel in name}
        assert len(wg) == count, f"expected {count} sm_90a {kernel} instantiations, got {sorted(wg)}"
        assert all(v == ("0", "0") for v in wg.values()), f"spills in {kernel}: {wg}"
    # ptxas' performance warnings that silently undo a warp-specialized design: C7514 (wgmma serialized
    # because accumulators are touched inside the asynchronous window), C7508 (setmaxnreg ignored).
    for code in ("C7514", "C7508"):
        hits = [line for line in report.splitlines() if code in line]
        assert not hits, f"ptxas warning {code} in the sm_90a kernels: {hits[:2]}"
    exe = _cuobjdump()
    if exe is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton) to read the SASS")
    sass = subprocess.run([exe, "-sass", "-arch", "sm_90a", CU.__file__], capture_output=True, text=True,
                          check=True).stdout
    funcs = re.split(r"\n\s*Function : ", sass)[1:]
    for kernel, (count, least, mma) in kernels.items():
        found = {f.split("\n", 1)[0].strip(): f.count(mma) for f in funcs if kernel in f.split("\n", 1)[0]}
        assert len(found) == count, f"{kernel} in the sm_90a SASS: {sorted(found)}"
        assert all(n >= least for n in found.values()), f"{mma} instructions per {kernel}: {found}"
    tma = {f.split("\n", 1)[0].strip(): f.count("UTMALDG") for f in funcs
           if "attn_fwd_sm90_kernel" in f.split("\n", 1)[0] or "w8a8_sm90_kernel" in f.split("\n", 1)[0]}
    assert len(tma) == 9 and all(n >= 2 for n in tma.values()), f"TMA loads per sm_90a kernel: {tma}"


@pytest.mark.skipif(shutil.which("nvcc") is None or _cuobjdump() is None or "80" not in ARCHS
                    or os.environ.get("LLMKERN_CUDA_PTX") == "0", reason="needs nvcc, cuobjdump and the default targets")
def test_cuda_module_carries_sm80_ptx_for_newer_gpus():
    """GPUs newer than every target (Blackwell: sm_100, sm_120) run the sm_80 kernels from PTX the driver
    compiles; without it they have no kernel image at all."""
    import llmkern._C_cuda as CU

    listing = subprocess.run([_cuobjdump(), "--list-ptx", CU.__file__], capture_output=True, text=True).stdout
    assert ".sm_80.ptx" in listing
    assert ".sm_90a.ptx" not in listing  # (arch-specific PTX would not run elsewhere: no point carrying it)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_kernels_run_on_this_gpu():
    import llmkern._C_cuda as CU
    from llmkern import _backends

    assert CU.kernel_image_error(torch.cuda.current_device()) == ""
    assert _backends.available("cuda") and _backends.cuda_kernels_error() is None
