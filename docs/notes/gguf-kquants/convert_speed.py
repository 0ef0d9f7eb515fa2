"""Converter throughput on a 4096 x 4096 tensor of random blocks, native (llmkern._C.gguf_unpack) and numpy
(gguf_kquants.NATIVE = False), 2 threads; best of 3."""
import time

import numpy as np
import torch

from llmkern.formats import gguf as g
from llmkern.formats import gguf_kquants as kq

torch.set_num_threads(2)
rng = np.random.default_rng(0)
N, K = 4096, 4096
for tn, f in (("Q4_K", kq.q4_k_to_int4), ("Q6_K", kq.q6_k_to_int8), ("Q5_0", kq.q5_0_to_int8),
              ("Q5_1", kq.q5_1_to_float), ("Q5_K", kq.q5_k_to_float)):
    be, bb = g._BLOCK_OF[tn]
    raw = rng.integers(0, 256, size=(N, K // be, bb), dtype=np.uint8)
    for start in {"Q6_K": (208,), "Q5_0": (0,)}.get(tn, (0, 2)):
        raw[..., start:start + 2] = np.float16(0.01).reshape(1).view(np.uint8)
    raw = raw.reshape(N, -1)
    line = []
    for native in (True, False):
        kq.NATIVE = native
        dt = min((lambda t0: (f(raw, (N, K)), time.perf_counter() - t0)[1])(time.perf_counter()) for _ in range(3))
        line.append(f"{'native' if native else 'numpy'} {N * K / dt / 1e6:.0f} M weights/s")
    print(f"{tn}: " + ", ".join(line))
