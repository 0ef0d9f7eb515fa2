"""llmkern.triton_kernels from a source checkout built in place (PYTHONPATH=REPO, no install): the GPU script's
way. setup.py maps REPO/triton_kernels to llmkern.triton_kernels only when installing; without the mapping the
triton backend was silently unavailable on the first GPU run (2026-11-29), so its tests and benchmarks skipped."""
import importlib
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton not installed")

import torch  # noqa: E402

import llmkern  # noqa: E402
from llmkern import _backends  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def test_triton_kernels_load_from_the_source_tree_when_not_installed(monkeypatch):
    real = importlib.import_module

    def not_installed(name, *args, **kwargs):
        if name == "llmkern.triton_kernels":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", not_installed)
    for name in [n for n in sys.modules if n == "llmkern.triton_kernels" or n.startswith("llmkern.triton_kernels.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(llmkern, "triton_kernels", None, raising=False)
    mod = _backends._load_source_triton_kernels()
    assert Path(mod.__file__).resolve() == REPO / "triton_kernels" / "__init__.py"
    assert sys.modules["llmkern.triton_kernels"] is mod and llmkern.triton_kernels is mod
    # the ops import the kernels as submodules of the installed name
    from llmkern.triton_kernels import rms_norm

    assert Path(rms_norm.__file__).resolve() == REPO / "triton_kernels" / "rms_norm.py"


def test_other_import_errors_are_not_masked(monkeypatch):
    real = importlib.import_module

    def broken(name, *args, **kwargs):
        if name == "llmkern.triton_kernels":
            raise ModuleNotFoundError("No module named 'triton.language'", name="triton.language")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.raises(ModuleNotFoundError, match="triton.language"):
        _backends._load_source_triton_kernels()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_backend_is_available_on_a_gpu():
    assert _backends.available("triton"), _backends.import_error("llmkern.triton_kernels")
