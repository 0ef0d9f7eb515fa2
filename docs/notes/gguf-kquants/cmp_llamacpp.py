"""llmkern vs llama.cpp logits on the same GGUF file and token ids (prefill of one prompt), and greedy tokens."""
import sys, numpy as np, torch
import llama_cpp
from llmkern.models import load_gguf, generate
files = sys.argv[1:]
for f in files:
    model, tok = load_gguf(f, progress=False)
    from llmkern.models.generate import _prompt_ids
    ids = _prompt_ids(tok, "What is the capital of France?", True, None)
    with torch.inference_mode():
        ours = model(torch.tensor([ids]))[0].double()  # [T, V]
    lc = llama_cpp.Llama(model_path=f, n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    lc.eval(ids)
    theirs = torch.from_numpy(np.array(lc.scores[:len(ids)], dtype=np.float64))
    rel = ((ours - theirs).norm(dim=1) / theirs.norm(dim=1))
    agree = (ours.argmax(1) == theirs.argmax(1)).float().mean().item()
    # greedy continuation from both
    lc.reset(); 
    out_lc = []
    lc.eval(ids)
    for _ in range(16):
        t = int(np.argmax(lc.scores[lc.n_tokens - 1])); out_lc.append(t); lc.eval([t])
    res = generate(model, tok, [ids], max_new_tokens=16)
    print(f"{f.split('/')[-1]}: logits rel diff median {rel.median():.4f} max {rel.max():.4f}; argmax agree {agree:.2f}; "
          f"greedy same prefix {next((i for i,(a,b) in enumerate(zip(res.tokens[0], out_lc)) if a!=b), 16)}/16")
    print("   llmkern:", repr(tok.decode(res.tokens[0])), "\n   llama.cpp:", repr(tok.decode(out_lc)))
