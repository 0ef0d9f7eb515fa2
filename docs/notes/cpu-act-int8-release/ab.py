"""The default model (Q4_1 layers, tied Q8_0 head) loaded as `llmkern generate --act-int8` loads it (W4A8g / W8A8,
prepared at load): decode ms/step (5 x 100 steps after a 20-token prompt, medians), a 256-token prefill (median of
5) and the process's peak RSS. Run it in alternating processes with the weights kept and released:

    for i in 1 2 3; do for k in 1 0; do LLMKERN_INT4_KEEP_CANONICAL=$k LLMKERN_INT8_KEEP_CANONICAL=$k \
        OMP_NUM_THREADS=2 PYTHONPATH=. python docs/notes/cpu-act-int8-release/ab.py; done; done

An argument "w8a8" runs the lm_head in W8A8 too (as --act-int8 did before session 25's last change; default: the
head W8A16, as the CLI loads it now).
"""
import os
import resource
import sys
import statistics
import time

import torch

from llmkern.models import gguf_loader

torch.set_num_threads(2)
head = sys.argv[1] if len(sys.argv) > 1 else "w8a16"
m, tok = gguf_loader.load_default(progress=False, prepare=True,
                                  modes={"int4": "w4a8g", "int8": "w8a8", "lm_head": {"int8": head}})
with torch.inference_mode():
    pre = []
    for r in range(5):
        cache = m.new_cache(1, 1024)
        t = time.perf_counter()
        m(torch.randint(0, 1000, (1, 256)), cache, last_only=True)
        pre.append((time.perf_counter() - t) * 1e3)
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
keep = os.environ.get("LLMKERN_INT4_KEEP_CANONICAL", "") or "0"
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"head={head} keep={keep} decode ms/step {statistics.median(meds):.3f} {[round(v, 2) for v in meds]} "
      f"prefill-256 ms {statistics.median(pre):.1f} peak RSS {rss:.0f} MB")
