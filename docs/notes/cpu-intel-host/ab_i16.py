"""Cold A/B of an Int4Linear (G = 32, fp16-valued scales, fp32 x, M = 1) between the float rows16 tiles and the
int16-pair prototype, alternated in one process (EXP_I16 read per call by the patched tree):
    PYTHONPATH=<tree with rows16_i16_proto.patch, built in place> python ab_i16.py 2 3072x576 4096x4096
"""
import torch, time, statistics, sys, itertools, os
import llmkern
from llmkern.nn import Int4Linear
torch.manual_seed(0)
th = int(sys.argv[1]); torch.set_num_threads(th)
for shape in sys.argv[2:]:
    N, K = [int(v) for v in shape.split("x")]
    lin = torch.nn.Linear(K, N, bias=False).requires_grad_(False)
    base = Int4Linear.from_linear(lin, group_size=32)
    # fp16-valued scales, as GGUF: round them
    sc = base.scales.half().float(); of = base.offsets.half().float()
    nbytes = N * K // 2 + N * K // 32 * 4
    n = min(400, max(2, (1024 << 20) // nbytes))
    mods = [Int4Linear.from_quantized(base.qweight.clone(), sc.clone(), of.clone()) for _ in range(n)]
    x = torch.randn(1, K)
    for m in mods: m(x)
    cyc = itertools.cycle(mods).__next__
    res = {0: [], 1: []}
    outs = {}
    for rnd in range(7):
        for v in (0, 1):
            os.environ["EXP_I16"] = str(v)
            outs[v] = mods[0](x).clone()
            for _ in range(n): cyc()(x)
            ts = []
            for _ in range(max(100, n)):
                m = cyc(); t = time.perf_counter(); m(x); ts.append(time.perf_counter() - t)
            res[v].append(statistics.median(ts))
    d = ((outs[0] - outs[1]).norm() / outs[0].norm()).item()
    a, b = statistics.median(res[0]), statistics.median(res[1])
    print(f"th={th} {N}x{K} fp32 cold: float {a*1e6:.1f} us ({nbytes/a/1e9:.1f} GB/s), i16 {b*1e6:.1f} us ({nbytes/b/1e9:.1f} GB/s): {a/b:.2f}x; rel diff {d:.1e}; rounds float {[round(r*1e6) for r in res[0]]} i16 {[round(r*1e6) for r in res[1]]}", flush=True)
