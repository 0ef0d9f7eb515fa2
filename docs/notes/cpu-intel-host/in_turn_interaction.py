"""Does llmkern's W4A8g module (N = K, G32, bf16 x, M = 1) run slower right after torch's int4 kernel than after
itself, after a plain read or alone? And torch's kernel after ours? The patterns alternate in rounds (12 rounds of
40 calls each) so drift hits them alike; every side reads cold copies (4x the last-level cache each).

  OMP_NUM_THREADS=2 python docs/notes/cpu-intel-host/in_turn_interaction.py [N=4096] [mode=w4a8g]

(Session 28: why conftest.py's Bench.in_turn times the second of two calls of each side per round.)"""
import itertools
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "benchmarks"))
import _machine
from llmkern.nn import Int4Linear
from llmkern import _backends
torch.set_num_threads(2)
N = K = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
mode = sys.argv[2] if len(sys.argv) > 2 else "w4a8g"
G = 32
g = torch.Generator().manual_seed(0)
q = torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=g)
qw = q[:, 0::2] | (q[:, 1::2] << 4)
sc = (torch.rand(N, K // G, generator=g) * 0.02 + 0.002).half().float()
off = (-sc * 8).half().float()
x = torch.randn(1, K).bfloat16()
copies = max(8, int(4 * _machine.llc_bytes("cpu") // (N * K // 2)))
print("copies", copies, flush=True)
mods = [Int4Linear.from_quantized(qw.clone(), sc.clone(), off.clone(), mode=mode) for _ in range(copies)]
for m in mods: m(x)
mods2 = [Int4Linear.from_quantized(qw.clone(), sc.clone(), off.clone(), mode=mode) for _ in range(copies)]
for m in mods2: m(x)
zeros = off + 8 * sc
sz = torch.stack([sc.t(), zeros.t()], -1).bfloat16().contiguous()
tw = [(torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2), sz.clone()) for _ in range(copies)]
C = _backends.cpu_module()
n = N * K // 2 // 4
bufs = [_machine.hugepage_ones(n) for _ in range(copies)]
c1, c2, ct, cb = (itertools.cycle(v).__next__ for v in (mods, mods2, tw, bufs))
ours = lambda: c1()(x)
ours2 = lambda: c2()(x)
def peer():
    p, s = ct(); torch._weight_int4pack_mm_for_cpu(x, p, G, s)
read = lambda: C.read_sum(cb().data_ptr(), n, 2)
others = {"alone": None, "after torch": peer, "after read": read, "after ours": ours2}
res = {k: [] for k in others}
other_t = {k: [] for k in others}
for _ in range(10):
    ours(); peer(); read(); ours2()
for r in range(12):
    for k, o in others.items():
        ts = []
        for i in range(40):
            if o is not None:
                t = time.perf_counter(); o(); other_t[k].append(time.perf_counter() - t)
            t = time.perf_counter(); ours(); ts.append(time.perf_counter() - t)
        res[k].append(statistics.median(ts))
tres = {"alone": [], "after ours": []}
for r in range(12):
    for k, o in (("alone", None), ("after ours", ours)):
        ts = []
        for i in range(40):
            if o is not None: o()
            t = time.perf_counter(); peer(); ts.append(time.perf_counter() - t)
        tres[k].append(statistics.median(ts))
for k in tres:
    print(f"torch {k:12s} median of round medians {1e6*statistics.median(tres[k]):7.1f} us (rounds {1e6*min(tres[k]):.0f}-{1e6*max(tres[k]):.0f})")
for k in others:
    print(f"{k:12s} ours median of round medians {1e6*statistics.median(res[k]):7.1f} us  (rounds {1e6*min(res[k]):.0f}-{1e6*max(res[k]):.0f})"
          + (f"  other {1e6*statistics.median(other_t[k]):.1f} us" if other_t[k] else ""))
