"""Decode-step A/B of the default model as loaded (W4A16 + W8A16) and with --act-int8 (W4A8g + W8A8).

    PYTHONPATH=. python docs/notes/cpu-w4a8-step-ab.py THREADS BATCH

BATCH 1: contiguous cache; more: paged caches (what generate uses for several prompts). Alternating
steps of the two models, context 64, medians of 25 (the cache is refilled before each timed step).
"""
import sys, time, torch
from llmkern.models import load_gguf
from llmkern.nn import set_linear_modes
torch.set_num_threads(int(sys.argv[1]))
B = int(sys.argv[2])
ma, tok = load_gguf(progress=False)
mb, _ = load_gguf(progress=False); set_linear_modes(mb, int4="w4a8g", int8="w8a8")
ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog. " * 10)[:65]]).expand(B, -1).contiguous()
def prep(m):
    if B == 1:
        c = m.new_cache(1, 200); m(ids[:, :63], c, last_only=True); m(ids[:, 63:64], c, last_only=True)
        return lambda: m(ids[:, 64:65], c, last_only=True), c
    caches = m.new_cache(paged=True, block_size=16, num_blocks=B * 8)
    sids = [[c.add_sequence() for c in caches][0] for _ in range(B)]
    for s in sids: m(ids[:1, :63], caches, seq_ids=[s], last_only=True)
    m(ids[:, 63:64], caches, seq_ids=sids, last_only=True)
    return lambda: m(ids[:, 64:65], caches, seq_ids=sids, last_only=True), caches
ts = {"w4a16": [], "w4a8g": []}
with torch.inference_mode():
    for r in range(25):
        for name, m in (("w4a16", ma), ("w4a8g", mb)):
            f, c = prep(m)
            t0 = time.perf_counter(); f(); ts[name].append(time.perf_counter() - t0)
for k, v in ts.items(): print(k, f"B={B} median {sorted(v)[len(v)//2]*1e3:.2f} ms")
