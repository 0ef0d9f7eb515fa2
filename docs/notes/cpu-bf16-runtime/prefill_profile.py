"""Prefill of 512 tokens of SmolLM2-135M in a given activation dtype: medians of 5 timed calls, then
torch.profiler's table of one call (the llmkern linears are not torch ops: they are the time not listed).

    PYTHONPATH=. python docs/notes/cpu-bf16-runtime/prefill_profile.py {float32,bfloat16}
"""
import sys
import time

import torch
from torch.profiler import profile

from llmkern.models import default_model_path, load_gguf

torch.set_num_threads(2)
model, tok = load_gguf(default_model_path(), dtype=getattr(torch, sys.argv[1]), progress=False)
ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog. " * 140)[:512]])  # [1, 512]


def once() -> float:
    cache = model.new_cache(1, 600)
    t0 = time.perf_counter()
    model(ids, cache, last_only=True)
    return time.perf_counter() - t0


with torch.inference_mode():
    for _ in range(2):
        once()  # first-call preparation
    print(sys.argv[1], "prefill 512 tokens, ms:", sorted(round(once() * 1e3, 1) for _ in range(5)))
    with profile() as p:
        model(ids, model.new_cache(1, 600), last_only=True)
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))
