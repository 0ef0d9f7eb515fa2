"""The first and second prefill of the README prompt (37 tokens) in a dtype, optionally with int8
activations (`generate --act-int8`), the first one under cProfile: where its one-time preparation goes
(the W4A8 packing: docs/notes/cpu-bf16-runtime.md, "Also in this session").

    PYTHONPATH=. python docs/notes/cpu-bf16-runtime/first_prefill_profile.py {float32,bfloat16} {a8,no}
"""
import cProfile, pstats, time, torch, sys
torch.set_num_threads(2)
from llmkern.models import default_model_path, load_gguf
from llmkern.models.generate import _prompt_ids
from llmkern.nn import set_linear_modes
model, tok = load_gguf(default_model_path(), progress=False, dtype=getattr(torch, sys.argv[1]))
if sys.argv[2] == "a8":
    set_linear_modes(model, int4="w4a8g", int8="w8a8")
ids = torch.tensor([_prompt_ids(tok, "What is the capital of France?", True, None)])
pr = cProfile.Profile()
with torch.inference_mode():
    t0 = time.perf_counter(); pr.enable(); model(ids, model.new_cache(1, 64), last_only=True); pr.disable()
    t1 = time.perf_counter(); model(ids, model.new_cache(1, 64), last_only=True); t2 = time.perf_counter()
print(f"first {1e3*(t1-t0):.0f} ms, second {1e3*(t2-t1):.0f} ms")
pstats.Stats(pr).sort_stats("tottime").print_stats(12)
