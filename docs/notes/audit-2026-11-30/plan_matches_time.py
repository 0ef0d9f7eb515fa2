"""Time DecodePlan.matches() on SmolLM2 (2000 calls, 3 repeats): session 19's pointer check cost 29 -> 35 us.
    PYTHONPATH=. python THIS"""
import torch, time
from llmkern.models import load_gguf
m, _ = load_gguf(progress=False)
cache = m.new_cache(1, 64)
with torch.inference_mode():
    m(torch.tensor([[5, 9, 14]]), cache, last_only=True)
    m(torch.tensor([[7]]), cache, last_only=True); m(torch.tensor([[7]]), cache, last_only=True)
    plan = m.__dict__["_decode_plan"]; tok = torch.tensor([[7]])
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(2000): plan.matches(m, cache, tok)
        print("matches us", (time.perf_counter() - t) / 2000 * 1e6, len(plan._checks))
