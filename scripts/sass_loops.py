"""The instruction mix of each CUDA kernel's main loop, from its SASS, without a GPU.

A kernel whose loop issues many instructions per byte or per MMA is issue-bound whatever its loads do (session
15 found the decode split kernel at ~440 SASS instructions per KB of cache and the int4 GEMMs at ~15 per HMMA
this way: docs/notes/cuda-decode.md, cuda-int4-prefill-splitk.md). This compiles one .cu file for one
architecture (or reads a cubin / SASS listing), finds each kernel's largest loop (the longest backward branch)
and prints its static instruction count and the most frequent opcodes. Static counts: a loop's skipped branches
(a rare rescale, a paged-only path) are counted too, and an unrolled loop covers several iterations.

Usage: python scripts/sass_loops.py csrc/cuda/decode_attention.cu [--arch 90a] [--kernel REGEX] [--top 14]
       python scripts/sass_loops.py some.cubin | listing.sass
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_INS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRA = re.compile(r"BRA(?:\.\w+)*\s+(?:`\(.*?\)\s*)?0x([0-9a-f]+)")


def cuobjdump() -> str | None:
    """cuobjdump from the CUDA toolkit, or the copy Triton ships."""
    path = shutil.which("cuobjdump")
    if path:
        return path
    try:
        import triton
    except ImportError:
        return None
    cand = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return cand if os.path.exists(cand) else None


def sass_of(path: str, arch: str) -> str:
    """SASS text of a .cu (compiled here like setup.py compiles it, one architecture), a cubin, or a listing."""
    if path.endswith((".sass", ".txt")):
        return open(path).read()
    with tempfile.TemporaryDirectory() as tmp:
        cubin = path
        if path.endswith(".cu"):
            cubin = os.path.join(tmp, "k.cubin")
            macro = ["-DLLMKERN_SM90A"] if arch == "90a" else []
            subprocess.run(["nvcc", "-cubin", "-O3", "-std=c++17", "--expt-relaxed-constexpr",
                            f"-gencode=arch=compute_{arch},code=sm_{arch}", f"-I{ROOT}/csrc/include",
                            f"-I{ROOT}/csrc/cuda", *macro, path, "-o", cubin], check=True, capture_output=True)
        tool = cuobjdump()
        if tool is None:
            sys.exit("no cuobjdump here (CUDA toolkit or triton)")
        return subprocess.run([tool, "-sass", cubin], check=True, capture_output=True, text=True).stdout


def loops(sass: str) -> list[dict]:
    """Per kernel: name, instruction count, and its largest loop's length and opcode counts."""
    out = []
    for part in re.split(r"\n\s*Function : ", sass)[1:]:
        name = part.split("\n", 1)[0].strip()
        ins = [(int(m.group(1), 16), m.group(2)) for m in _INS.finditer(part)]
        best = None
        for addr, text in ins:
            m = _BRA.search(text)
            if m and int(m.group(1), 16) < addr:
                lo = int(m.group(1), 16)
                body = [t for a, t in ins if lo <= a <= addr]
                if best is None or len(body) > len(best):
                    best = body
        ops = collections.Counter()
        for text in best or []:
            op = re.sub(r"^@!?U?P[T\d]+\s+", "", text).split()[0]
            ops[op.split(".")[0]] += 1
        out.append({"name": name, "total": len(ins), "loop": len(best or []), "ops": ops})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("path", help=".cu file (compiled here), cubin, or SASS listing (.sass / .txt)")
    ap.add_argument("--arch", default="90a")
    ap.add_argument("--kernel", default=".", help="regex over the (mangled) kernel names")
    ap.add_argument("--top", type=int, default=14)
    args = ap.parse_args(argv)
    for k in loops(sass_of(args.path, args.arch)):
        if not re.search(args.kernel, k["name"]):
            continue
        mix = ", ".join(f"{op} {n}" for op, n in k["ops"].most_common(args.top))
        print(f"{k['name']}\n  {k['total']} instructions; largest loop {k['loop']}: {mix}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
