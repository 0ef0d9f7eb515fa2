"""SQNR of re-quantizing each Q5_1 / Q5_K tensor of the Q5_K_M file to int8 with a scale per 32, against the
tensor's exact values."""
import torch, numpy as np
from llmkern import ops
from llmkern.formats.gguf_file import GGUFFile
from llmkern.formats.gguf import load_gguf_tensor
f = GGUFFile("/tmp/kq/smollm2-Q5_K_M.gguf")
sq = []
for t in f.tensors:
    r = load_gguf_tensor(t)
    if r["type"] not in ("Q5_1", "Q5_K"):
        continue
    w = r["weight"].reshape(-1, r["weight"].shape[-1])
    q, s = ops.quantize_int8(w, 32)
    back = ops.dequantize_int8(q, s)
    sq.append(10 * torch.log10(w.pow(2).sum() / (w - back).pow(2).sum()).item())
print(f"{len(sq)} tensors; int8 g32 re-quantization SQNR vs the Q5 values: min {min(sq):.1f} dB median {np.median(sq):.1f} dB")
