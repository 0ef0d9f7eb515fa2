"""Conversion speed of a Q5_1 / Q5_K token table: to float32 (the native unpacker) against the exact int5 form
(gguf_kquants.q5_to_int5, numpy), best of 3 at 2 threads. Run from the repository root:
    OMP_NUM_THREADS=2 PYTHONPATH=. python docs/notes/gguf-kquants/int5_convert_speed.py
"""
import sys, time, numpy as np, torch
sys.path.insert(0, "tests/models")
from _tiny_gguf import random_blocks
from llmkern.formats import gguf_kquants as kq
torch.set_num_threads(2)
for t, shape in (("Q5_1", (49152, 576)), ("Q5_K", (8192, 4096))):
    rng = np.random.default_rng(0)
    raw = random_blocks(t, shape, rng, lambda n: rng.standard_normal(n) * 0.01)
    f = kq.q5_1_to_float if t == "Q5_1" else kq.q5_k_to_float
    for name, fn in (("float (native)", lambda: f(raw, shape)), ("int5 (numpy)", lambda: kq.q5_to_int5(raw, shape, t))):
        ts = []
        for _ in range(3):
            a = time.perf_counter(); fn(); ts.append(time.perf_counter() - a)
        n = shape[0] * shape[1]
        print(t, shape, name, f"{min(ts)*1e3:.0f} ms, {n / min(ts) / 1e9:.2f} G weights/s")
