"""A/B of the int4 prefill's weight panels: unpacked from the canonical tensors (transpose of 16 rows) against
unpacked from the rows16 layout (no transpose), in one process, interleaved, 2 threads; medians.

    python docs/notes/cpu-int4-release/prefill_ab.py [--rounds 7] [--m 128 512]
"""
import argparse
import statistics
import sys
import time

import torch

import llmkern._C as C

sys.path.insert(0, "tests/ops")  # (the tests' weight makers)
from test_int4_linear_factored_cpu import q4k_weights  # noqa: E402
from test_int4_linear_pack_cpu import weights  # noqa: E402

CODE = {torch.float32: 0, torch.bfloat16: 1}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--m", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"{'N x K, G, E':24} {'x':5} {'M':>4} {'canonical ms':>13} {'rows16 ms':>10} {'speedup':>8}", flush=True)
    for N, K, G, E in [(4096, 4096, 32, 2), (4096, 4096, 32, 1), (11008, 4096, 32, 2), (1536, 576, 32, 2)]:
        qw, s, o = q4k_weights(N, K, G, gen) if E == 1 else weights(N, K, G, True, gen)
        n = C.int4_linear_rows16_packed_size(N, K, G, E)
        r16 = torch.empty(n, dtype=torch.uint8)
        C.int4_linear_rows16_pack(qw.data_ptr(), s.data_ptr(), o.data_ptr(), N, K, G, E, r16.data_ptr(), n)
        for dtype in (torch.float32, torch.bfloat16):
            for M in a.m:
                x = torch.randn(M, K, generator=gen).to(dtype)
                out = torch.empty(M, N, dtype=dtype)
                need = C.int4_linear_workspace_size(M, K, N, a.threads)
                ws = torch.empty(need, dtype=torch.uint8)

                def run(rows16):
                    t = time.perf_counter()
                    C.int4_linear(x.data_ptr(), CODE[dtype], K, M, K, qw.data_ptr(), N, s.data_ptr(), o.data_ptr(), G,
                                  0, out.data_ptr(), N, ws.data_ptr(), need, a.threads, "",
                                  rows16_ptr=r16.data_ptr() if rows16 else 0, rows16_e=E if rows16 else 0)
                    return time.perf_counter() - t

                run(False), run(True)
                ta, tb = [], []
                for _ in range(a.rounds):
                    ta.append(run(False))
                    tb.append(run(True))
                ma, mb = statistics.median(ta) * 1e3, statistics.median(tb) * 1e3
                print(f"{f'{N} x {K}, {G}, {E}':24} {str(dtype)[6:]:5} {M:4} {ma:13.2f} {mb:10.2f} {ma / mb:7.2f}x",
                      flush=True)


if __name__ == "__main__":
    main()
