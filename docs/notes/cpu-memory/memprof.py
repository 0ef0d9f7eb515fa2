"""RSS (psutil) at each stage of loading and running a GGUF model, and its buffers' bytes by dtype.

    PYTHONPATH=TREE python memprof.py FILE.gguf
"""
import sys, os
import torch
import psutil
p = psutil.Process()
def rss(): return p.memory_info().rss / 1e6
print("start", rss())
import llmkern
from llmkern.models import gguf_loader, generate as gen
print("import", rss())
f = sys.argv[1] if len(sys.argv) > 1 else None
model, tok = gguf_loader.load_default() if f is None else (gguf_loader.load_gguf(f), None)
if isinstance(model, tuple): model, tok = model
print("loaded", rss())
tot = {}
for n, b in list(model.named_buffers()) + list(model.named_parameters()):
    k = str(b.dtype)
    tot[k] = tot.get(k, 0) + b.numel() * b.element_size()
print({k: v / 1e6 for k, v in tot.items()})
x = torch.tensor([[1, 2, 3, 4]])
cache = model.new_cache(1, 64)
model(x, cache, last_only=True)
print("after first call", rss())
for _ in range(3):
    model(torch.tensor([[5]]), cache, last_only=True)
print("after decode", rss())
