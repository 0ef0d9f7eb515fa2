"""A/B of whole SmolLM2-135M decode steps: two copies of the model, prepared under two settings of one
environment variable (read when a layer prepares its weights), stepped alternately in blocks; medians.

    PYTHONPATH=. python docs/notes/cpu-int4-decode-mb/step_ab.py [VAR A B] [--batch N]

Default: LLMKERN_INT4_ROWS16 "0" (the packed one-row layout) against "" (rows16 from one row).
"""
import os
import statistics
import sys
import time

import torch

from llmkern.models import default_model_path, load_gguf

args = [a for a in sys.argv[1:] if not a.startswith("--")]
var, va, vb = args if args else ("LLMKERN_INT4_ROWS16", "0", "")
B = int(sys.argv[sys.argv.index("--batch") + 1]) if "--batch" in sys.argv else 1
torch.set_num_threads(2)
runs = {}
with torch.inference_mode():
    for val in (va, vb):
        os.environ[var] = val
        model, tok = load_gguf(default_model_path())
        ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog. " * 8)[:64]])
        nxt = torch.tensor([[tok.encode(" the")[0]]] * B)
        if B == 1:
            cache, kw = model.new_cache(1, 2048), {}
            model(ids, cache, last_only=True)
        else:
            cache = model.new_cache(B, 2048, paged=True)
            sids = [[c.add_sequence() for c in cache][0] for _ in range(B)]
            for sid in sids:
                model(ids, cache, seq_ids=[sid], last_only=True)
            kw = {"seq_ids": sids}
        for _ in range(5):  # prepares (and packs) every layer under this setting
            model(nxt, cache, last_only=True, **kw)
        runs[val] = (model, cache, nxt, kw)
    os.environ.pop(var)
    res = {va: [], vb: []}
    for r in range(40):
        for val in (va, vb):
            model, cache, nxt, kw = runs[val]
            t = time.perf_counter()
            for _ in range(10):
                model(nxt, cache, last_only=True, **kw)
            res[val].append((time.perf_counter() - t) / 10 * 1e3)
ma, mb = statistics.median(res[va]), statistics.median(res[vb])
print(f"{var}={va!r}: {ma:.3f} ms/step   {var}={vb!r}: {mb:.3f} ms/step   ({ma / mb:.3f}x), batch {B}")
