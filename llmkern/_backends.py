"""Which backends exist on this machine: the compiled modules and Triton, loaded lazily and once."""
from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os

log = logging.getLogger("llmkern")


@functools.lru_cache(maxsize=None)
def _import(name: str):
    try:
        if name == "llmkern.triton_kernels":
            return _load_source_triton_kernels(), None
        return importlib.import_module(name), None
    except Exception as e:  # noqa: BLE001 - any import failure means "not available", with the reason kept
        log.debug("llmkern: cannot import %s: %s", name, e)
        return None, f"{type(e).__name__}: {e}"


def cpu_module():
    """`llmkern._C` (always built by setup.py) or None."""
    return _import("llmkern._C")[0]


def cuda_module():
    """`llmkern._C_cuda` (built when nvcc was found) or None."""
    return _import("llmkern._C_cuda")[0]


def cuda_stream(device=None) -> int:
    """The raw cudaStream_t (as an int) of torch's current stream on `device` (a torch.device, an index, or None
    for the current GPU): what every CUDA launcher takes. torch's `_cuda_getCurrentRawStream` (the call
    torch.compile's generated code makes before each launch) returns it directly;
    `torch.cuda.current_stream(device).cuda_stream` first builds a Python Stream object (device-index parsing,
    a class __new__), on every launch of a decode step's few hundred. That is the fallback where torch lacks
    the private call."""
    import torch

    raw = _RAW_STREAM[0]
    if raw is None:
        raw = _RAW_STREAM[0] = getattr(torch._C, "_cuda_getCurrentRawStream", False)
    if raw:
        index = getattr(device, "index", device)
        return raw(torch.cuda.current_device() if index is None else index)
    return torch.cuda.current_stream(device).cuda_stream


_RAW_STREAM = [None]  # torch._C._cuda_getCurrentRawStream, or False where torch has none


def import_error(name: str) -> str | None:
    return _import(name)[1]


@functools.lru_cache(maxsize=None)
def _cuda_device() -> bool:
    import torch

    return torch.cuda.is_available()


@functools.lru_cache(maxsize=None)
def cuda_kernels_error() -> str | None:
    """None when llmkern._C_cuda's kernels can run on torch's current GPU, else why not (no module, no GPU,
    a compute capability below 8.0, or a GPU this build has no code for). Asked once, at the first use."""
    mod = cuda_module()
    if mod is None:
        return f"llmkern._C_cuda not importable ({import_error('llmkern._C_cuda') or 'not built'})"
    if not _cuda_device():
        return "no CUDA device"
    check = getattr(mod, "kernel_image_error", None)
    if check is None:  # a module built before this check existed
        return None
    import torch

    idx = torch.cuda.current_device()
    err = check(idx)
    if err:
        log.warning("llmkern: the cuda backend cannot run on cuda:%d (%s); other backends will", idx, err)
    return err or None


def _load_source_triton_kernels():
    """Import llmkern.triton_kernels. An installed llmkern has it (setup.py maps REPO/triton_kernels there); a
    source checkout built in place (`setup.py build_ext --inplace`, PYTHONPATH=REPO: the GPU script's way) has
    it only as REPO/triton_kernels beside the package, which is loaded under the installed name here."""
    import sys
    from pathlib import Path

    try:
        return importlib.import_module("llmkern.triton_kernels")
    except ModuleNotFoundError as e:
        if e.name != "llmkern.triton_kernels":
            raise
    import llmkern

    root = Path(llmkern.__file__).resolve().parent.parent / "triton_kernels"
    if not (root / "__init__.py").is_file():
        raise ModuleNotFoundError("llmkern.triton_kernels is not installed and no source tree is beside llmkern",
                                  name="llmkern.triton_kernels")
    spec = importlib.util.spec_from_file_location("llmkern.triton_kernels", root / "__init__.py",
                                                  submodule_search_locations=[str(root)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["llmkern.triton_kernels"] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules["llmkern.triton_kernels"]
        raise
    llmkern.triton_kernels = mod
    return mod


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    if not _cuda_device() and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    return _import("triton")[0] is not None and _import("llmkern.triton_kernels")[0] is not None


def available(name: str) -> bool:
    """Whether backend `name` can run on this machine (for some device)."""
    if name == "reference":
        return True
    if name == "cpu":
        return cpu_module() is not None
    if name == "cuda":
        return cuda_module() is not None and _cuda_device() and cuda_kernels_error() is None
    if name == "triton":
        return triton_available()
    return False


# Environment variables read on every kernel call. `os.environ.get` costs ~0.5 us (it encodes the
# key and decodes the value); its backing dict of bytes, which `os.environ[...] = ` and `putenv`
# through os.environ keep current, answers in ~0.05 us.
_ENV_DATA = getattr(os.environ, "_data", None)
if not isinstance(_ENV_DATA, dict) or not isinstance(next(iter(_ENV_DATA), b""), bytes):
    _ENV_DATA = None


def env(name: str) -> str | None:
    """os.environ.get(name) or None (an empty value counts as unset), cheap enough for every call."""
    if _ENV_DATA is not None:
        v = _ENV_DATA.get(name.encode())
        return v.decode() if v else None
    return os.environ.get(name) or None


def env_backend() -> str | None:
    """LLMKERN_BACKEND, read at call time (DESIGN.md: backend choice happens at call time)."""
    if _ENV_DATA is not None:
        v = _ENV_DATA.get(b"LLMKERN_BACKEND")
        return v.decode() if v else None
    return os.environ.get("LLMKERN_BACKEND") or None


@functools.lru_cache(maxsize=None)
def cpu_has(feature: str) -> bool:
    """Whether the CPU (and OS) support `feature`, a name of `llmkern._C.cpu_features()` ("avx512_bf16"...)."""
    mod = cpu_module()
    return bool(mod is not None and mod.cpu_features().get(feature, False))


@functools.lru_cache(maxsize=None)
def cpu_bf16_dot_fast() -> bool:
    """Whether this CPU's AVX512-BF16 dot products (vdpbf16ps, which the bf16 kernels run on) issue at about its
    512-bit FMA rate: measured once (`_C.bf16_dot_rate_ratio`, ~0.1 ms), fast at 0.5 or more. ~1 on AMD Zen 4 / 5,
    where bf16 activations halve the prefill; 0.24-0.26 on an Intel Xeon (family 6 model 207) where they issue every
    other cycle and bf16 runs slower than fp32 (docs/notes/cpu-intel-host.md). False without AVX512-BF16."""
    mod = cpu_module()
    if mod is None or not cpu_has("avx512_bf16") or not hasattr(mod, "bf16_dot_rate_ratio"):
        return False
    return mod.bf16_dot_rate_ratio() >= 0.5


def cpu_isa() -> str:
    """The ISA the CPU kernels use: `LLMKERN_CPU_ISA` if set (and supported), else the best detected."""
    if _ENV_DATA is not None:
        v = _ENV_DATA.get(b"LLMKERN_CPU_ISA")
        return _resolve_isa(v.decode() if v else "")
    return _resolve_isa(os.environ.get("LLMKERN_CPU_ISA") or "")


@functools.lru_cache(maxsize=8)
def _resolve_isa(forced: str) -> str:
    # Cached: this runs on every CPU kernel call (read at call time so tests can pin an ISA).
    mod = cpu_module()
    if mod is None:
        return "none"
    return mod.resolve_isa(forced)
