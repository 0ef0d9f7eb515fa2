"""Int8Linear / Int4Linear prefill calls, interleaved A/B between two trees (PYTHONPATHs), fp32 x, 2 threads.

python module_ab.py TREE_A TREE_B   (LLMKERN_CPU_ISA=avx2 in the environment pins the AVX2 kernels in both)
Each measurement is a fresh process: the module from a random nn.Linear, 5 warm calls, the median of 30;
4 processes per tree, alternating; prints medians, GFLOP/s and B/A."""
import os, statistics, subprocess, sys, tempfile

CHILD = r'''
import sys, time, torch
torch.set_num_threads(2)
from llmkern.nn import Int4Linear, Int8Linear
op, M, N, K, G = sys.argv[1], *map(int, sys.argv[2:6])
torch.manual_seed(0)
lin = torch.nn.Linear(K, N, bias=False)
m = Int8Linear.from_linear(lin, group_size=0 if G == K else G) if op == "int8" else Int4Linear.from_linear(lin, group_size=G)
x = torch.randn(M, K)  # [M, K]
for _ in range(5): m(x)
ts = []
for _ in range(30):
    t0 = time.perf_counter(); m(x); ts.append(time.perf_counter() - t0)
print(sorted(ts)[15] * 1e3)
'''
CASES = [  # op, M, N, K, G (G = K: per channel)
    ("int8", 256, 3072, 576, 32), ("int8", 256, 576, 1536, 16), ("int8", 128, 4096, 4096, 4096),
    ("int8", 128, 4096, 4096, 32), ("int4", 256, 1536, 576, 32), ("int4", 256, 576, 1536, 32),
    ("int4", 128, 4096, 4096, 128), ("int4", 512, 4096, 4096, 32)]


def run(tree, args):
    env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS="2")
    # cwd: `python -c` puts the working directory first on sys.path, ahead of PYTHONPATH
    out = subprocess.run([sys.executable, "-c", CHILD, *map(str, args)], env=env, cwd=tempfile.gettempdir(),
                         capture_output=True, text=True, check=True).stdout
    return float(out.split()[-1])


for args in CASES:
    a, b = [], []
    for _ in range(4):
        a.append(run(sys.argv[1], args))
        b.append(run(sys.argv[2], args))
    ma, mb = statistics.median(a), statistics.median(b)
    flop = 2 * args[1] * args[2] * args[3]
    print(args, f"A {ma:.2f} ms ({flop / ma / 1e6:.0f} GFLOP/s)  B {mb:.2f} ms ({flop / mb / 1e6:.0f})  B/A {mb / ma:.3f}",
          flush=True)
