"""512-token prefill of the default model: llmkern (Q4_1 as stored, fp32; re-quantized to int8, fp32) and
transformers eager fp32 (loaded from the same GGUF) alternated call by call in one process, 12 rounds; prints each
entry's median and the median over rounds of transformers' time over its time (the ratio this host's drift cannot
move): python docs/notes/cpu-intel-host/prefill_e2e.py (needs transformers and gguf)"""
import inspect, statistics, time, torch, transformers
from transformers import DynamicCache
from llmkern.models import default_model_path, load_gguf
torch.set_num_threads(2)
path = default_model_path()
lk, tok = load_gguf(path, quant="keep", dtype=torch.float32)
lk8, _ = load_gguf(path, quant="int8", dtype=torch.float32)
hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog. " * 100)[:512]])
# the forward's cache argument: `cache` in recent transformers, `past_key_values` before the rename (as bench_generate)
key = "cache" if "cache" in inspect.signature(type(hf).forward).parameters else "past_key_values"
runs = {
    "llmkern q4_1": lambda: lk(ids, lk.new_cache(1, 600), last_only=True),
    "llmkern int8": lambda: lk8(ids, lk8.new_cache(1, 600), last_only=True),
    "hf eager fp32": lambda: hf(ids, **{key: DynamicCache()}, use_cache=True, logits_to_keep=1).logits,
}
t = {k: [] for k in runs}
with torch.inference_mode():
    for f in runs.values(): f()
    for rep in range(12):
        names = list(runs)[rep % 3:] + list(runs)[:rep % 3]
        for n in names:
            t0 = time.perf_counter(); runs[n](); t[n].append(time.perf_counter() - t0)
hfm = t["hf eager fp32"]
for n in runs:
    r = statistics.median([h / x for h, x in zip(hfm, t[n])])
    print(f"{n}: median {statistics.median(t[n]) * 1e3:.0f} ms, per-round hf/this median {r:.3f}")
