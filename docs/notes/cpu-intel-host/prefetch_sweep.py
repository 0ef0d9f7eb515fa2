"""Cold sweep of software-prefetch distance / hint in the int8 packed decode (i8) or the int4 rows16 decode
(NxK), alternated in one process: needs a tree with int8pack_prefetch_env.patch / rows16_i16_proto.patch built
in place (they read EXP_PFD / EXP_PFH, EXP_R16D / EXP_R16H per call).
    PYTHONPATH=<tree> ROUNDS=9 python prefetch_sweep.py 1 i8;  PYTHONPATH=<tree> python prefetch_sweep.py 2 4096x4096
"""
import torch, time, statistics, sys, itertools, os
import llmkern
from llmkern.nn import Int8Linear, Int4Linear
torch.manual_seed(0)
th = int(sys.argv[1]); which = sys.argv[2]; torch.set_num_threads(th)
if which == "i8":
    N, K = 49152, 576
    lin = torch.nn.Linear(K, N, bias=False).requires_grad_(False)
    mk = lambda: Int8Linear.from_linear(lin, mode="w8a16", group_size=32)
    nbytes = N * K + N * K // 32 * 2; env = ("EXP_PFD", "EXP_PFH")
    variants = [(8192, 3), (8192, 2), (8192, 1), (16384, 1), (4096, 1), (16384, 2), (0, 3)]
else:
    N, K = [int(v) for v in which.split("x")]
    lin = torch.nn.Linear(K, N, bias=False).requires_grad_(False)
    base = Int4Linear.from_linear(lin, group_size=32)
    mk = lambda: Int4Linear.from_quantized(base.qweight.clone(), base.scales.clone(), base.offsets.clone())
    nbytes = N * K // 2 + N * K // 32 * 4; env = ("EXP_R16D", "EXP_R16H")
    variants = [(1, 3), (0, 3), (2, 3), (1, 2), (2, 2), (1, 1), (2, 1), (4, 2), (1, 0)]
dt = torch.bfloat16 if os.environ.get("BF16") else torch.float32
x = torch.randn(1, K, dtype=dt)
n = min(400, max(2, (1024 << 20) // nbytes))
mods = [mk() for _ in range(n)]
for m in mods: m(x)
cyc = itertools.cycle(mods).__next__
res = {v: [] for v in variants}
for rnd in range(int(os.environ.get("ROUNDS", 5))):
    for v in variants:
        os.environ[env[0]] = str(v[0]); os.environ[env[1]] = str(v[1])
        for _ in range(n): cyc()(x)  # warm the variant path and rotate
        ts = []
        for _ in range(max(100, n)):
            m = cyc(); t = time.perf_counter(); m(x); ts.append(time.perf_counter() - t)
        res[v].append(statistics.median(ts))
for v in variants:
    r = sorted(res[v]); med = statistics.median(r)
    print(f"{which} th={th} {str(dt)[6:]} dist={v[0]:6d} hint={v[1]}: {med*1e6:8.1f} us ({r[0]*1e6:.0f}-{r[-1]*1e6:.0f})  {nbytes/med/1e9:5.1f} GB/s")
