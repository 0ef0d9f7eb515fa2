"""Build llmkern's CUDA kernels + bindings as a host module (`_C_cuda_emu`) that runs them on CPU tensors
through the fiber emulator of include/cuda_runtime.h. Kernel launches `k<<<grid, block, smem, stream>>>(args)`
are rewritten to `emu::launch_smem(smem, k, grid, block, args)`, `extern __shared__ __align__(A) T x[];` to a
pointer to the launch's dynamic shared memory (emu::extern_smem(A)) and `__shared__ __align__(A) T x[..];` to a
reference into the launch's static shared arena (emu::static_smem: per block, 0xFF-poisoned, in the shared
window); nothing else changes. Cached by a hash of the inputs.

Other modules: `load(ops=(...), sources=[...], binds=[...], name="_C_cuda_emu_x")` builds the launchers and
bindings of `ops` (csrc/cuda/<op>.cu + <op>_bind.cpp, `llmkern::bind_<op>`) plus extra `sources` (paths
relative to the repository root, e.g. csrc/cuda/attention_sm90.cu or tests/cuda_emu/sm90_selftest.cu; .cu
files get the launch rewrite) and calls `llmkern::bind_<b>(m)` for each of `binds`, into a module `name`
(a distinct name per set, so that several load into one process). The sm_90a emulation
(include/llmkern/cuda/sm90.cuh, sm90_tma_host.h) shadows the real headers for every source."""
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
_EXTERN_SMEM = re.compile(r"extern\s+__shared__\s+(?:__align__\((\d+)\)\s+)?([A-Za-z_][\w:]*(?:\s+[A-Za-z_][\w:]*)*?)"
                          r"\s+(\w+)\s*\[\s*\]\s*;")
_STATIC_SMEM = re.compile(r"__shared__\s+(?:__align__\((\d+)\)\s+)?([A-Za-z_][\w:]*(?:\s+[A-Za-z_][\w:]*)*?)"
                          r"\s+(\w+)\s*((?:\[[^\]\[;]+\])*)\s*;")

MODULE = """#include <pybind11/pybind11.h>
namespace py = pybind11;
namespace llmkern {
%s
}
PYBIND11_MODULE(%s, m) {
%s
}
"""


def _split_top(s: str) -> list[str]:
    """Splits a launch configuration at the commas outside parentheses / brackets / braces."""
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return out


def _rewrite(text: str) -> str:
    def rep(m):
        cfg = _split_top(m.group(2))
        smem = cfg[2] if len(cfg) > 2 else "0"
        return f"emu::launch_smem(static_cast<size_t>({smem}), {m.group(1)}, {cfg[0]}, {cfg[1]}, {m.group(3)});"
    def ext(m):
        align, ty, name = m.group(1) or "16", m.group(2), m.group(3)
        return f"{ty}* const {name} = reinterpret_cast<{ty}*>(emu::extern_smem({align}));"
    def static(m):
        align, ty, name, dims = m.group(1) or "1", m.group(2), m.group(3), m.group(4).strip()
        return (f"static char {name}_emu_key_; "
                f"auto& {name} = emu::static_smem<{ty}{dims}>(&{name}_emu_key_, {align});")
    text = _EXTERN_SMEM.sub(ext, _LAUNCH.sub(rep, text))
    text = _STATIC_SMEM.sub(static, text)
    if re.search(r"__shared__", re.sub(r"//[^\n]*", "", text)):
        raise ValueError("build_emu: a `__shared__` declaration the rewrite does not handle")
    return text


def _sources(ops, sources):
    srcs = [ROOT / "csrc" / "cuda" / f"{op}{suf}" for op in ops for suf in (".cu", "_bind.cpp")]
    return srcs + [(ROOT / s).resolve() for s in sources]


def _inputs(ops=OPS, sources=()):
    files = sorted((ROOT / "csrc" / "include" / "llmkern").rglob("*")) + sorted((HERE / "include").rglob("*"))
    files += sorted((ROOT / "csrc" / "cuda").glob("*.h"))  # launcher-side headers (sm90_launch.h)
    files += [pathlib.Path(__file__)] + _sources(ops, sources)
    return [f for f in files if f.is_file()]


def build(ops=OPS, sources=(), binds=(), name="_C_cuda_emu") -> pathlib.Path:
    """Directory holding the built module `name` (built once per source hash)."""
    import pybind11

    ops, sources, binds = tuple(ops), tuple(str(s) for s in sources), tuple(binds)
    for f in _sources(ops, sources):
        if not f.is_file():
            raise FileNotFoundError(f)
    h = hashlib.sha256(repr((ops, sources, binds, name)).encode())
    for f in _inputs(ops, sources):
        h.update(str(f.relative_to(ROOT)).encode() + f.read_bytes())
    out = pathlib.Path(os.environ.get("LLMKERN_EMU_CACHE", pathlib.Path(tempfile.gettempdir()) / "llmkern-cuda-emu"))
    out = out / f"{name}-{h.hexdigest()[:16]}"
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    if (out / f"{name}{suffix}").exists():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    gen = tmp / "src"
    for f in _inputs(ops, sources):
        if ROOT / "csrc" in f.parents or f in _sources(ops, sources):
            dst = gen / f.relative_to(ROOT)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(_rewrite(f.read_text()) if f.suffix in (".cu", ".cuh") else f.read_text())
    names = [*ops, *binds]
    (tmp / "module.cpp").write_text(MODULE % ("\n".join(f"void bind_{b}(py::module_& m);" for b in names), name,
                                              "\n".join(f"  llmkern::bind_{b}(m);" for b in names)))
    inc = [f"-I{HERE / 'include'}", f"-I{gen / 'csrc' / 'include'}", f"-I{pybind11.get_include()}",
           f"-I{sysconfig.get_paths()['include']}"]
    cxx = os.environ.get("CXX", "g++")
    # hidden / no unique symbols: each module keeps its own emulator state when several load in one process
    flags = ["-O1", "-std=c++17", "-fPIC", "-w", "-fvisibility=hidden", "-fno-gnu-unique", "-DLLMKERN_CUDA_EMULATOR=1"]
    jobs, objs = [], []
    for src in [gen / f.relative_to(ROOT) for f in _sources(ops, sources)] + [tmp / "module.cpp"]:
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
    subprocess.run([cxx, "-shared", "-o", str(tmp / f"{name}{suffix}"), *objs], check=True)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def load(ops=OPS, sources=(), binds=(), name="_C_cuda_emu"):
    d = build(ops, sources, binds, name)
    spec = importlib.util.spec_from_file_location(name, next(d.glob(f"{name}*")))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
