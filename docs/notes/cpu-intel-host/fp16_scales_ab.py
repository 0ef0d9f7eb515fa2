"""Int4Linear.from_linear with fp16_scales (default) against False (session 28): M = 1 module calls alternated two and two
(the second of each timed), cold copies (4x the last-level cache each), W4A16 and W4A8g, fp32 and bf16 x.

  OMP_NUM_THREADS=2 python docs/notes/cpu-intel-host/fp16_scales_ab.py N K
"""
import itertools, statistics, sys, time, os
import torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "benchmarks"))
import _machine
from llmkern.nn import Int4Linear
torch.set_num_threads(int(os.environ.get("THREADS", "2")))
N, K = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
lin = torch.nn.Linear(K, N, bias=False)
with torch.no_grad():
    lin.weight.normal_(0, 0.02)
base = {f: Int4Linear.from_linear(lin, fp16_scales=f) for f in (True, False)}
canon = {f: (m.qweight, m.scales, m.offsets) for f, m in base.items()}
copies = max(8, int(4 * _machine.llc_bytes("cpu") // (N * K // 2 + 8 * N * K // 32)))
print(f"{N}x{K}, {copies} copies each", flush=True)
for mode in ("w4a16", "w4a8g"):
    for dt in (torch.float32, torch.bfloat16):
        x = torch.randn(1, K).to(dt)
        cyc = {}
        for f, (q, s, o) in canon.items():
            mods = [Int4Linear.from_quantized(q.clone(), s.clone(), o.clone(), mode=mode) for _ in range(copies)]
            for m in mods:
                m(x)
            cyc[f] = itertools.cycle(mods).__next__
        ts = {True: [], False: []}
        for r in range(400):
            for f in (True, False):
                cyc[f]()(x)
                t = time.perf_counter(); cyc[f]()(x); ts[f].append(time.perf_counter() - t)
        ratio = statistics.median(b / a for a, b in zip(ts[True], ts[False]))
        print(f"{mode} {str(dt)[6:]:9s} fp16 scales {1e6*statistics.median(ts[True]):7.1f} us  fp32 scales "
              f"{1e6*statistics.median(ts[False]):7.1f} us  per-round fp32/fp16 {ratio:.3f}x", flush=True)
