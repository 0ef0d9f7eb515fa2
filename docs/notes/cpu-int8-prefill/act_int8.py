"""Prefill of 256 tokens, fp32, default modes then --act-int8 (W4A8g / W8A8), then llama.cpp on the same file,
one process, best of 3 each: python act_int8.py FILE... (needs llama-cpp-python, see ../gguf-kquants/quant.py)."""
import sys, time, torch
torch.set_num_threads(2)
from llmkern.models import load_gguf, generate
from llmkern.nn import set_linear_modes
for f in sys.argv[1:]:
    model, tok = load_gguf(f, progress=False)
    ids = tok.encode("The history of the city of Paris is long and complicated. " * 200)[:256]
    res = {}
    for name in ("default", "act-int8"):
        if name == "act-int8":
            set_linear_modes(model, int4="w4a8g", int8="w8a8")
        generate(model, tok, [ids], max_new_tokens=1, stop_ids=[])
        res[name] = min(generate(model, tok, [ids], max_new_tokens=1, stop_ids=[]).stats["prefill_s"] for _ in range(3)) * 1e3
    import llama_cpp
    lc = llama_cpp.Llama(model_path=f, n_ctx=2048, n_batch=512, verbose=False, n_threads=2, n_threads_batch=2)
    lc.eval(ids); best = 1e9
    for _ in range(3):
        lc.reset(); t0 = time.perf_counter(); lc.eval(ids); best = min(best, time.perf_counter() - t0)
    print(f.split("/")[-1], {k: round(v) for k, v in res.items()}, "llama.cpp", round(best * 1e3))
