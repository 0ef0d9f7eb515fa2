"""One M = 1 int4 module's kernel called several ways in turn, weights hot (one copy): the module, its prepared
run(x), the bound kernel into a fresh output / a reused one / rotating preallocated ones, and as a step-program
KernelCall; then what the fresh output costs (allocation before or after the call, a plain Python object, the
allocation alone) and minor page faults per call (session 28, docs/notes/cpu-intel-host.md "The module path between
big kernels").

  OMP_NUM_THREADS=2 python docs/notes/cpu-intel-host/module_vs_step.py N K w4a8g|w4a16 bfloat16|float32
"""
import itertools
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "benchmarks"))
import _shapes as S  # noqa: E402
from llmkern._backends import cpu_isa  # noqa: E402
from llmkern.nn import Int4Linear  # noqa: E402
from llmkern.ops._cpu_linear import DTYPE_CODE, WS  # noqa: E402

torch.set_num_threads(2)
N, K, mode, dt = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], getattr(torch, sys.argv[4])
G = 32
g = torch.Generator().manual_seed(0)
q = torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=g)
qw = q[:, 0::2] | (q[:, 1::2] << 4)  # [N, K / 2]
sc = (torch.rand(N, K // G, generator=g) * 0.02 + 0.002).half().float()
off = (-sc * 8).half().float()
x = torch.randn(1, K).to(dt)
m = Int4Linear.from_quantized(qw, sc, off, mode=mode)
m(x)
step = S.step_calls([m], x, N, "int4_linear")
run = m.__dict__["_fast"]
b, isa, ws = run.bound, cpu_isa(), WS.buf
args = (x.data_ptr(), DTYPE_CODE[x.dtype], x.stride(0), 1)
out = x.new_empty(1, N)


def kernel(o):  # the bound kernel into output o
    b.run(*args, o.data_ptr(), ws.data_ptr(), ws.numel(), 2, isa)


def interleaved(fns: dict, rounds: int = 3000) -> dict:
    """Median us per call of each fn, called in turn, the order rotated each round."""
    names, res = list(fns), {k: [] for k in fns}
    for i in range(rounds):
        r = i % len(names)
        for k in names[r:] + names[:r]:
            t = time.perf_counter()
            fns[k]()
            res[k].append(time.perf_counter() - t)
    return {k: 1e6 * statistics.median(v) for k, v in res.items()}


def show(d: dict, extra: str = "") -> None:
    print("  ".join(f"{k} {v:.1f}" for k, v in d.items()), extra)


pool = itertools.cycle([x.new_empty(1, N) for _ in range(64)]).__next__
addrs, keep = set(), []


def new_out():
    o = x.new_empty(1, N)
    addrs.add(o.data_ptr())
    kernel(o)
    return o


def new_kept():  # a fresh output each call, the last two kept (malloc cannot hand back the same block)
    keep.append(new_out())
    del keep[:-2]


show(interleaved({"module": lambda: m(x), "run(x)": lambda: run(x), "same out": lambda: kernel(out),
                  "new out": new_out, "step": step}))
show(interleaved({"same out": lambda: kernel(out), "new out": new_out, "rotating out": lambda: kernel(pool()),
                  "new, kept": new_kept, "step": step}), f"distinct new-out addresses: {len(addrs)}")
show(interleaved({"same out": lambda: kernel(out), "alloc only": lambda: (x.new_empty(1, N), kernel(out)),
                  "alloc after": lambda: (kernel(out), x.new_empty(1, N)), "py list": lambda: ([0.0] * 8, kernel(out)),
                  "alloc alone": lambda: x.new_empty(1, N)}))
for name, f in (("same out", lambda: kernel(out)), ("new out", new_out), ("step", step), ("module", lambda: m(x))):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(1000):
        f()
    print(name, "minor faults per call", (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 1000)
