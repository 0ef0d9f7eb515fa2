"""Logits SQNR of the default model against fp32 W4A16, median over the positions of a 30-token prompt, for fp32 / bf16
activations with and without int8 activations (W4A8g for the int4 layers, W8A8 for the head).
Run: OMP_NUM_THREADS=2 PYTHONPATH=. python docs/notes/cpu-act-int8-release/bf16_model_sqnr.py
"""
import torch
from llmkern.models import gguf_loader
torch.set_num_threads(2)
res = {}
ids = None
cfgs = [(torch.float32, None), (torch.float32, {"int4": "w4a8g"}), (torch.bfloat16, None), (torch.bfloat16, {"int4": "w4a8g"}),
        (torch.bfloat16, {"int8": "w8a8"}), (torch.float32, {"int8": "w8a8"})]
for dt, modes in cfgs:
    m, tok = gguf_loader.load_default(progress=False, dtype=dt, prepare=True, modes=modes)
    if ids is None:
        ids = torch.tensor([tok.encode("<|im_start|>user\nWhat is the capital of France? Tell me about its history.<|im_end|>\n<|im_start|>assistant\n")])
    with torch.inference_mode():
        lg = m(ids, m.new_cache(1, 64)).float()[0]  # [S, V]
    res[(str(dt)[6:], str(modes))] = lg
ref = res[("float32", "None")]
for k, v in res.items():
    err = (v - ref).double()
    sq = 10 * torch.log10(ref.double().pow(2).sum(-1) / err.pow(2).sum(-1).clamp_min(1e-30))
    print(k, "SQNR dB median over positions %.1f" % sq.median().item())
