"""Logits of the Q5_K_M file: quant "keep" (Q5 -> int8 per 32) and "int8" per 32 against quant "none" (exact)."""
import torch
from llmkern.models import load_gguf
from llmkern.models.generate import _prompt_ids
f = "/tmp/kq/smollm2-Q5_K_M.gguf"
a, tok = load_gguf(f, progress=False)
b, _ = load_gguf(f, progress=False, quant="none")
c, _ = load_gguf(f, progress=False, quant="int8", group_size=32)
ids = _prompt_ids(tok, "What is the capital of France? Tell me about its history in detail.", True, None)
with torch.inference_mode():
    la, lb, lc = (m(torch.tensor([ids]))[0].double() for m in (a, b, c))
for name, x in (("keep (Q5 -> int8 g32)", la), ("int8 g32 everything", lc)):
    r = (x - lb).norm(dim=1) / lb.norm(dim=1)
    print(f"{name} vs exact float: logits rel median {r.median():.4f} max {r.max():.4f}; argmax agree {(x.argmax(1) == lb.argmax(1)).double().mean():.2f}")
