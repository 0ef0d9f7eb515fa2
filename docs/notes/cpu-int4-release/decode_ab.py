"""Decode ms/step of the default model: 5 x 100 steps after a 20-token prompt, medians; run it per tree, alternating.

    PYTHONPATH=TREE python decode_ab.py [1 | 0 | label]   (1 / 0: load_gguf(prepare=...) where the tree has it)
"""
import inspect
import statistics
import sys
import time

import torch

from llmkern.models import gguf_loader

kw = {}
if len(sys.argv) > 1 and sys.argv[1] in ("0", "1") and "prepare" in inspect.signature(gguf_loader.load_gguf).parameters:
    kw["prepare"] = sys.argv[1] == "1"
torch.set_num_threads(2)
m, tok = gguf_loader.load_default(progress=False, **kw)
res = []
with torch.inference_mode():
    for r in range(5):
        cache = m.new_cache(1, 256)
        m(torch.randint(0, 1000, (1, 20)), cache, last_only=True)
        t = time.perf_counter()
        for i in range(100):
            m(torch.tensor([[i + 5]]), cache, last_only=True)
        res.append((time.perf_counter() - t) * 10)
print(sys.argv[1:], "ms/step median %.3f" % statistics.median(res), [round(x, 2) for x in res])
