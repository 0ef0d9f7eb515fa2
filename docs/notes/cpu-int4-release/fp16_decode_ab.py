"""int4 decode op calls with and without the rows16 layout bound, per x dtype and M (1, 4), 4096 x 4096 and
1536 x 576, G32, fp16-valued scales; interleaved, 41 rounds, 2 threads; medians. From the repository root:

    python docs/notes/cpu-int4-release/fp16_decode_ab.py
"""
import statistics, time, sys, torch
import llmkern._C as C
sys.path.insert(0, "tests/ops")
from test_int4_linear_pack_cpu import weights
torch.set_num_threads(2)
gen = torch.Generator().manual_seed(0)
CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
for N, K in [(4096, 4096), (1536, 576)]:
    G = 32
    qw, s, o = weights(N, K, G, True, gen)
    n = C.int4_linear_rows16_packed_size(N, K, G, 2)
    r16 = torch.empty(n, dtype=torch.uint8)
    C.int4_linear_rows16_pack(qw.data_ptr(), s.data_ptr(), o.data_ptr(), N, K, G, 2, r16.data_ptr(), n)
    for dt in (torch.float32, torch.float16, torch.bfloat16):
      for M in (1, 4):
        x = torch.randn(M, K).to(dt); out = torch.empty(M, N, dtype=dt)
        need = C.int4_linear_workspace_size(M, K, N, 2); ws = torch.empty(need, dtype=torch.uint8)
        def run(r):
            t = time.perf_counter()
            C.int4_linear(x.data_ptr(), CODE[dt], K, M, K, qw.data_ptr(), N, s.data_ptr(), o.data_ptr(), G, 0, out.data_ptr(), N, ws.data_ptr(), need, 2, "", rows16_ptr=r16.data_ptr() if r else 0, rows16_e=2 if r else 0)
            return time.perf_counter() - t
        a, b = [], []
        for _ in range(41): a.append(run(False)); b.append(run(True))
        print(N, K, dt, M, "canonical %.3f ms, rows16 %.3f ms" % (statistics.median(a)*1e3, statistics.median(b)*1e3))
