"""load_gguf() of the default model twice (the second under cProfile, top functions by own time): the
load times of docs/notes/cpu-startup.md.  PYTHONPATH=. python docs/notes/cpu-startup/load_time.py"""
import torch, time, cProfile, pstats
torch.set_num_threads(2)
from llmkern.models.gguf_loader import load_gguf
t=time.perf_counter(); load_gguf(progress=False); print("first load", time.perf_counter()-t)
pr=cProfile.Profile(); pr.enable()
t=time.perf_counter(); load_gguf(progress=False); print("second load", time.perf_counter()-t)
pr.disable()
pstats.Stats(pr).sort_stats("tottime").print_stats(15)
