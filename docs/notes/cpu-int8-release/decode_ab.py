"""Decode ms/step of the default model re-quantized to int8 (every linear W8A16, per 32), prepared at load:
5 x 100 steps after a 20-token prompt, medians. Run it in alternating processes with LLMKERN_INT8_KEEP_CANONICAL=1
(weights kept) and unset (released):

    for i in 1 2 3; do for k in 1 0; do LLMKERN_INT8_KEEP_CANONICAL=$k OMP_NUM_THREADS=2 PYTHONPATH=. \
        python docs/notes/cpu-int8-release/decode_ab.py; done; done
"""
import os
import statistics
import time

import torch

from llmkern.models import gguf_loader

torch.set_num_threads(2)
m, tok = gguf_loader.load_default(progress=False, prepare=True, quant="int8")
with torch.inference_mode():
    cache = m.new_cache(1, 1024)
    m(torch.randint(0, 1000, (1, 20)), cache, last_only=True)
    meds = []
    for r in range(5):
        ts = []
        for i in range(100):
            t = time.perf_counter()
            m(torch.tensor([[i + 5]]), cache, last_only=True)
            ts.append(time.perf_counter() - t)
        meds.append(statistics.median(ts) * 1e3)
keep = os.environ.get("LLMKERN_INT8_KEEP_CANONICAL", "")
print(f"keep={keep or 0} ms/step {statistics.median(meds):.3f}", [round(v, 2) for v in meds])
