"""Build llmkern's CUDA kernels + bindings as a host module (`_C_cuda_emu`) that runs them on CPU tensors
through the fiber emulator of include/cuda_runtime.h. Kernel launches `k<<<grid, block, smem, stream>>>(args)`
are rewritten to `emu::launch(k, grid, block, args)`; nothing else changes. Cached by a hash of the inputs."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import pathlib
import re
import shutil
import subprocess
import sysconfig
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
OPS = ("kv_cache_append", "decode_attention", "rms_norm", "rotary_embedding")
_LAUNCH = re.compile(r"([\w:]+(?:<[^<>;]*>)?)<<<([^;]*?)>>>\(([^;]*)\);")

MODULE = """#include <pybind11/pybind11.h>
namespace py = pybind11;
namespace llmkern {
%s
}
PYBIND11_MODULE(_C_cuda_emu, m) {
%s
}
"""


def _rewrite(text: str) -> str:
    def rep(m):
        cfg = [c.strip() for c in m.group(2).split(",")]
        return f"emu::launch({m.group(1)}, {cfg[0]}, {cfg[1]}, {m.group(3)});"
    return _LAUNCH.sub(rep, text)


def _inputs():
    files = sorted((ROOT / "csrc" / "include" / "llmkern").rglob("*")) + [HERE / "include" / "cuda_runtime.h",
                                                                         pathlib.Path(__file__)]
    files += [ROOT / "csrc" / "cuda" / f"{op}{suf}" for op in OPS for suf in (".cu", "_bind.cpp")]
    return [f for f in files if f.is_file()]


def build() -> pathlib.Path:
    """Directory holding the built `_C_cuda_emu` module (built once per source hash)."""
    import pybind11

    h = hashlib.sha256()
    for f in _inputs():
        h.update(str(f.relative_to(ROOT)).encode() + f.read_bytes())
    out = pathlib.Path(os.environ.get("LLMKERN_EMU_CACHE", pathlib.Path(tempfile.gettempdir()) / "llmkern-cuda-emu"))
    out = out / h.hexdigest()[:16]
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    if (out / f"_C_cuda_emu{suffix}").exists():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    gen = tmp / "src"
    for f in _inputs():
        if ROOT / "csrc" in f.parents:
            dst = gen / f.relative_to(ROOT)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(_rewrite(f.read_text()) if f.suffix in (".cu", ".cuh") else f.read_text())
    (tmp / "module.cpp").write_text(MODULE % ("\n".join(f"void bind_{op}(py::module_& m);" for op in OPS),
                                              "\n".join(f"  llmkern::bind_{op}(m);" for op in OPS)))
    inc = [f"-I{HERE / 'include'}", f"-I{gen / 'csrc' / 'include'}", f"-I{pybind11.get_include()}",
           f"-I{sysconfig.get_paths()['include']}"]
    cxx = os.environ.get("CXX", "g++")
    flags = ["-O1", "-std=c++17", "-fPIC", "-w"]
    jobs, objs = [], []
    for src in [gen / "csrc" / "cuda" / f"{op}{suf}" for op in OPS for suf in (".cu", "_bind.cpp")] + [tmp / "module.cpp"]:
        obj = src.with_suffix(src.suffix + ".o")
        lang = ["-x", "c++"] if src.suffix == ".cu" else []
        jobs.append([cxx, *lang, "-c", str(src), "-o", str(obj), *flags, *inc])
        objs.append(str(obj))
    for i in range(0, len(jobs), 2):  # two compilers at a time (CI machines have 2 cores)
        procs = [subprocess.Popen(j, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for j in jobs[i:i + 2]]
        for j, p in zip(jobs[i:i + 2], procs):
            log = p.communicate()[0]
            if p.returncode:
                raise RuntimeError(f"emulator build failed: {' '.join(j)}\n{log[-4000:]}")
    subprocess.run([cxx, "-shared", "-o", str(tmp / f"_C_cuda_emu{suffix}"), *objs], check=True)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def load():
    d = build()
    spec = importlib.util.spec_from_file_location("_C_cuda_emu", next(d.glob("_C_cuda_emu*")))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
