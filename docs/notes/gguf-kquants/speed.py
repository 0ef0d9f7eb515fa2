"""Decode ms/step: llmkern generate (64 new tokens, greedy) vs llama.cpp (same file, 2 threads), same prompt ids."""
import sys, time, numpy as np, torch
import llama_cpp
from llmkern.models import load_gguf, generate
torch.set_num_threads(2)
for f in sys.argv[1:]:
    model, tok = load_gguf(f, progress=False)
    ids = tok.encode("<|im_start|>user\nWrite a long story about a cat.<|im_end|>\n<|im_start|>assistant\n")
    generate(model, tok, [ids], max_new_tokens=8)  # warm (first-call packing)
    best = min(generate(model, tok, [ids], max_new_tokens=64, stop_ids=[]).stats["ms_per_step"] for _ in range(3))
    lc = llama_cpp.Llama(model_path=f, n_ctx=256, verbose=False, n_threads=2, n_threads_batch=2)
    ts = []
    for _ in range(3):
        lc.reset(); lc.eval(ids)
        t0 = time.perf_counter(); n = 0
        for _ in range(64):
            t = int(np.argmax(lc.scores[lc.n_tokens - 1])); lc.eval([t]); n += 1
        ts.append((time.perf_counter() - t0) / n * 1e3)
    print(f"{f.split('/')[-1]}: llmkern {best:.2f} ms/step, llama.cpp {min(ts):.2f} ms/step, "
          f"ratio {min(ts)/best:.2f}x; {model.weight_bytes_per_token()/1e6:.1f} MB/token")
