"""The default model's lm_head (tied Q8_0) on the hidden states of a 30-token prompt: logits SQNR of the kernel in
W8A16 / W8A8 with fp32 / bf16 x, against the float64 W8A16 reference on the fp32 x, and against the reference of the
same mode and x (the kernel's own error). Run: OMP_NUM_THREADS=2 PYTHONPATH=. python docs/notes/cpu-act-int8-release/bf16_head_sqnr.py
"""
import torch
from llmkern.models import gguf_loader
from llmkern import reference as R
torch.set_num_threads(2)
m, tok = gguf_loader.load_default(progress=False)
ids = torch.tensor([tok.encode("<|im_start|>user\nWhat is the capital of France? Tell me about its history.<|im_end|>\n<|im_start|>assistant\n")])
cap = {}
h = m.lm_head.register_forward_pre_hook(lambda mod, args: cap.setdefault("x", args[0].detach().clone()))
with torch.inference_mode():
    m(ids, m.new_cache(1, 64))
h.remove()
x = cap["x"].reshape(-1, 576)
head = m.lm_head
w, s = head.weight, head.weight_scale
def sq(a, ref):
    e = (a.double() - ref.double()); return (10 * torch.log10(ref.double().pow(2).sum(-1) / e.pow(2).sum(-1))).median().item()
ref = R.int8_linear(x.double(), w, s, None, "w8a16")
from llmkern import ops
for dt in (torch.float32, torch.bfloat16):
    xx = x.to(dt)
    for mode in ("w8a16", "w8a8"):
        y = ops.int8_linear(xx, w, s, None, mode)
        yr = R.int8_linear(xx.double(), w, s, None, mode)
        print(dt, mode, "kernel vs fp64-w8a16(fp32 x): %.1f dB" % sq(y, ref), "| kernel vs ref same mode/x: %.1f dB" % sq(y, yr),
              "| ref(same x) vs fp64-w8a16: %.1f dB" % sq(yr, ref))
print("x amax/rms per row (median):", (x.abs().amax(-1) / x.pow(2).mean(-1).sqrt()).median().item())
