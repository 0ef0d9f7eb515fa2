"""Per-launch times of the default model's decode step program (DecodePlan.step_timed), medians of 300 steps,
summed per op (the linears per role).

    PREP=1|0 PAD=bytes PYTHONPATH=TREE python decode_profile.py
PREP: load_gguf(prepare=...); PAD: bytes allocated before the cache and the plan's buffers (moves them in the heap).
"""
import os
import statistics
from collections import defaultdict

import torch

from llmkern.models import gguf_loader

torch.set_num_threads(2)
m, tok = gguf_loader.load_default(progress=False, prepare=os.environ.get("PREP") == "1")
pad = torch.empty(int(os.environ.get("PAD", "0")), dtype=torch.uint8)
with torch.inference_mode():
    cache = m.new_cache(1, 512)
    m(torch.randint(0, 1000, (1, 20)), cache, last_only=True)
    m(torch.tensor([[5]]), cache, last_only=True)
    plan = m.__dict__["_decode_plan"]
    acc = defaultdict(list)
    for i in range(300):
        _, t = plan.step_timed(torch.tensor([[i + 5]]))
        tot = defaultdict(float)
        for n, s in t:
            tot[n.split(":")[-1] if "linear" in n else n.split(":")[0]] += s
        for k, v in tot.items():
            acc[k].append(v)
print(os.environ.get("PREP"), os.environ.get("PAD"), {k: round(statistics.median(v) * 1e6) for k, v in acc.items()})
