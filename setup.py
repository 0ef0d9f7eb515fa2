"""Build llmkern's compiled modules without torch: pybind11 + a C++ compiler (+ nvcc when found).

- llmkern._C       csrc/cpu/*.cpp, C++17, -O3, OpenMP. ISA-specific code is compiled per function
                   with target attributes and chosen at run time, so no -march flag here.
- llmkern._C_cuda  csrc/cuda/*.cu (nvcc, sm_80 + sm_90a) + csrc/cuda/*.cpp (bindings), linked with
                   the static cudart so it imports on machines without a GPU or CUDA runtime.
                   Skipped when nvcc is not found or LLMKERN_NO_CUDA=1; LLMKERN_CUDA_ARCHS="80;90a"
                   overrides the targets; the oldest plain target's PTX is included (newer GPUs JIT it;
                   LLMKERN_CUDA_PTX=0: not).
Source files compile LLMKERN_BUILD_JOBS at a time (default: the CPU count), .cpp and .cu alike.
Neither module includes torch headers, so one binary works with every torch version.
"""
from __future__ import annotations

import concurrent.futures
import glob
import os
import shutil
import subprocess
import time

import pybind11
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
INCLUDE = [os.path.join("csrc", "include"), pybind11.get_include()]
CXX_FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-fvisibility=hidden", "-Wall", "-Wno-unknown-pragmas"]


def find_nvcc() -> str | None:
    if os.environ.get("LLMKERN_NO_CUDA") == "1":
        return None
    for cand in (os.environ.get("NVCC"), os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "nvcc"),
                 shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def cuda_lib_dir(nvcc: str) -> str | None:
    """Directory holding libcudart_static.a, found from nvcc's real install (it may be a wrapper)."""
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", "/dev/null", "-o", "/dev/null"],
                             capture_output=True, text=True).stderr
        top = next(line.split("=", 1)[1].strip() for line in out.splitlines() if "TOP=" in line)
        cands = [os.path.join(top, "lib64"), os.path.join(top, "lib")]
    except (OSError, StopIteration):
        cands = []
    cands += [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), d) for d in ("lib64", "lib")]
    cands += glob.glob("/usr/local/cuda*/lib64")
    for d in cands:
        if os.path.isfile(os.path.join(d, "libcudart_static.a")):
            return d
    return None


def _jobs() -> int:
    return int(os.environ.get("LLMKERN_BUILD_JOBS", "0")) or os.cpu_count() or 1


def _parallel_compile(compiler, jobs: int) -> None:
    """Make `compiler.compile` build its sources `jobs` at a time (setuptools compiles one after another:
    llmkern._C's dozen C++ files took minutes serially). The same steps as distutils' CCompiler.compile,
    with the per-object `_compile` calls spread over threads (each one runs the compiler as a process).
    Left serial if this setuptools lacks those (long-standing, private) methods."""
    if jobs <= 1 or not all(hasattr(compiler, a) for a in ("_setup_compile", "_get_cc_args", "_compile")):
        return

    def compile(sources, output_dir=None, macros=None, include_dirs=None, debug=0, extra_preargs=None,
                extra_postargs=None, depends=None):
        macros, objects, extra_postargs, pp_opts, build = compiler._setup_compile(
            output_dir, macros, include_dirs, sources, depends, extra_postargs)
        cc_args = compiler._get_cc_args(pp_opts, debug, extra_preargs)

        def one(obj):
            src, ext = build[obj]
            compiler._compile(obj, src, ext, cc_args, extra_postargs, pp_opts)

        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            list(pool.map(one, [o for o in objects if o in build]))  # the first failure raises
        return objects

    compiler.compile = compile


class BuildExt(build_ext):
    """Compiles .cu sources of an extension with nvcc, everything else with the C++ compiler (both several
    files at a time: LLMKERN_BUILD_JOBS, default the CPU count)."""

    def build_extensions(self):
        _parallel_compile(self.compiler, _jobs())
        super().build_extensions()

    def build_extension(self, ext):
        cu = [s for s in ext.sources if s.endswith(".cu")]
        if cu:
            ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
            objs = self._nvcc(ext, cu)
            ext.extra_objects = list(ext.extra_objects or []) + objs
        super().build_extension(ext)
        if cu:
            # ptxas' resource report (registers, spills, shared memory) goes beside the module, where
            # tests can read it: into the built package and into the source tree (editable installs
            # copy only the module itself back from their temporary build directory).
            text = ""
            for obj in objs:
                with open(obj + ".ptxas.txt") as r:
                    text += f"### {os.path.relpath(obj, self.build_temp)}\n" + r.read()
            for d in {os.path.dirname(self.get_ext_fullpath(ext.name)), os.path.join(ROOT, "llmkern")}:
                os.makedirs(d, exist_ok=True)
                with open(os.path.join(d, "_C_cuda.ptxas.txt"), "w") as f:
                    f.write(text)

    def _nvcc(self, ext, sources):
        """Compile the .cu sources, several at once (LLMKERN_BUILD_JOBS, default: the CPU count): each
        nvcc call compiles one file for every target architecture, and most of its time is one core."""
        nvcc = ext.nvcc
        archs = [a for a in os.environ.get("LLMKERN_CUDA_ARCHS", "80;90a").split(";") if a]
        # Machine code for each target, and the PTX of the oldest portable one (not an "a" target) with it:
        # the driver compiles that PTX for GPUs newer than every target (Blackwell and later), which the
        # sm_80 kernels then serve. Without it such a GPU has no kernel image (the cuda backend then reports
        # itself unavailable and the triton one runs). LLMKERN_CUDA_PTX=0 leaves the PTX out.
        portable = sorted((a for a in archs if a.isdigit()), key=int)
        ptx = portable[0] if portable and os.environ.get("LLMKERN_CUDA_PTX", "1") != "0" else None
        gencode = [f"-gencode=arch=compute_{a},code=[sm_{a},compute_{a}]" if a == ptx else
                   f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]

        def compile_one(src):
            obj = os.path.join(self.build_temp, src + ".o")
            os.makedirs(os.path.dirname(obj), exist_ok=True)
            if not (os.path.exists(obj) and os.path.getmtime(obj) >= newest_input(src)):
                cmd = [nvcc, "-c", src, "-o", obj, "-O3", "-std=c++17", "--compiler-options", "-fPIC",
                       "-Xptxas", "-v", "--expt-relaxed-constexpr", *[f"-I{i}" for i in ext.include_dirs],
                       *gencode]
                print(" ".join(cmd), flush=True)
                t0 = time.time()
                res = subprocess.run(cmd, capture_output=True, text=True)
                # Keep ptxas' resource report (registers, spills) next to the object for the tests.
                with open(obj + ".ptxas.txt", "w") as f:
                    f.write(res.stdout + res.stderr)
                if res.returncode != 0:
                    raise RuntimeError(f"nvcc failed on {src}:\n{res.stderr[-4000:]}")
                print(f"llmkern: {src} compiled in {time.time() - t0:.0f} s", flush=True)
            return obj

        jobs = _jobs()
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(jobs, len(sources)))) as pool:
            return list(pool.map(compile_one, sources))  # in source order; the first failure raises


def newest_input(src: str) -> float:
    """mtime of a .cu file and every header it could include (conservative: all of csrc/include and the
    launchers' own headers in csrc/cuda)."""
    headers = glob.glob(os.path.join("csrc", "include", "**", "*"), recursive=True)
    headers += glob.glob(os.path.join("csrc", "cuda", "*.h"))
    return max(os.path.getmtime(p) for p in [src, *headers] if os.path.isfile(p))


def extensions():
    exts = [
        Extension(
            "llmkern._C",
            sources=sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp"))),
            include_dirs=INCLUDE,
            # Header edits must rebuild the module (setuptools only tracks listed dependencies).
            depends=sorted(glob.glob(os.path.join("csrc", "include", "**", "*.h"), recursive=True)
                           + glob.glob(os.path.join("csrc", "cpu", "*.h"))),
            extra_compile_args=CXX_FLAGS,
            extra_link_args=["-fopenmp"],
            language="c++",
        )
    ]
    nvcc = find_nvcc()
    libdir = cuda_lib_dir(nvcc) if nvcc else None
    if nvcc and libdir:
        ext = Extension(
            "llmkern._C_cuda",
            sources=sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp"))),
            include_dirs=INCLUDE + [os.path.join(os.path.dirname(libdir), "include")],
            extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden"],
            # Static cudart: the module imports (and reports "no GPU") where libcudart.so is absent.
            extra_link_args=[f"-L{libdir}", "-l:libcudart_static.a", "-ldl", "-lrt", "-lpthread"],
            language="c++",
        )
        ext.nvcc = nvcc
        exts.append(ext)
    elif nvcc:
        print("llmkern: nvcc found but not libcudart_static.a; building without llmkern._C_cuda")
    else:
        print("llmkern: nvcc not found; building without llmkern._C_cuda")
    return exts


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExt},
    package_dir={"llmkern": "llmkern", "llmkern.triton_kernels": "triton_kernels"},
    package_data={"llmkern": ["_C_cuda.ptxas.txt"]},
    packages=[
        "llmkern", "llmkern.ops", "llmkern.reference", "llmkern.nn", "llmkern.models", "llmkern.formats",
        "llmkern.triton_kernels",
    ],
)
