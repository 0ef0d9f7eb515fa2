"""llmkern's default load (CPU kernels) against the float-weights reference (quant="none", backend="reference")
on the same file: relative logits difference per position. usage: cmp_exact.py FILE..."""
import sys, torch
from llmkern.models import load_gguf
for f in sys.argv[1:]:
    m, tok = load_gguf(f, progress=False)
    r, _ = load_gguf(f, progress=False, quant="none", backend="reference")
    ids = tok.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    with torch.inference_mode():
        a = m(torch.tensor([ids]))[0].double()
        b = r(torch.tensor([ids]))[0].double()
    rel = (a - b).norm(dim=1) / b.norm(dim=1)
    print(f.split("/")[-1], f"llmkern vs float-weights reference: rel median {rel.median():.2e} max {rel.max():.2e}")
