"""Load, then the first and second prefill of 37 tokens (the first prepares every linear: packing), then the
first prefill again under cProfile (llmkern functions by cumulative time): docs/notes/cpu-startup.md.
    PYTHONPATH=. python docs/notes/cpu-startup/first_prefill.py"""
import torch, time
from llmkern.models.gguf_loader import load_gguf
torch.set_num_threads(2)
t0=time.perf_counter(); model,tok=load_gguf(progress=False); t1=time.perf_counter()
ids=torch.randint(100,40000,(1,37))
def run():
    cache=model.new_cache(1, 64)
    with torch.inference_mode():
        return model(ids, cache, last_only=True)
t2=time.perf_counter(); run(); t3=time.perf_counter(); run(); t4=time.perf_counter()
print(f"load {1e3*(t1-t0):.0f} ms, first prefill {1e3*(t3-t2):.0f} ms, second {1e3*(t4-t3):.0f} ms")
import cProfile, pstats
model,tok=load_gguf(progress=False)
pr=cProfile.Profile(); pr.enable(); run(); pr.disable()
pstats.Stats(pr).sort_stats("cumtime").print_stats("llmkern", 25)
