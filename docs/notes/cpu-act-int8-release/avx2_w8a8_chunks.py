import time, statistics, torch, importlib, sys
sys.path.insert(0, "tests/ops")
import llmkern._C as C
I8 = importlib.import_module("llmkern.ops.int8_linear")
from test_int8_linear_release_cpu import launch
from test_int8_linear_pack_cpu import weights
torch.set_num_threads(2)
gen = torch.Generator().manual_seed(0)
for N, K, G in [(1536, 576, 32), (576, 1536, 0), (4096, 4096, 32)]:
    w, s = weights(N, K, G, True, gen)
    run = I8._cpu_runner(w, s, None, "w8a8", pack=True)
    for M in (16, 64, 256):
        x = torch.randn(M, K, generator=gen)
        res = {True: [], False: []}
        for r in range(7):
            for rel in (False, True):
                t = time.perf_counter()
                for _ in range(3):
                    launch(x, w, s, run.packed, run.packed_e, 2, "avx2", None, "w8a8", released=rel)
                res[rel].append((time.perf_counter() - t) / 3 * 1e3)
        a, b = statistics.median(res[False]), statistics.median(res[True])
        print(f"{N}x{K} G{G} M{M}: tiles {a:.2f} ms, packed chunks {b:.2f} ms, chunks/tiles {b/a:.2f}")
