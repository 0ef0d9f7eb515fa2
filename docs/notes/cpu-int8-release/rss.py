"""Resident memory of the default model (the tied Q8_0 head released or kept) after a load with prepare=True and
after generating 16 tokens (/proc/self/status VmRSS / VmHWM, MB). Alternate processes:

    for k in 1 0; do LLMKERN_INT8_KEEP_CANONICAL=$k OMP_NUM_THREADS=2 PYTHONPATH=. \
        python docs/notes/cpu-int8-release/rss.py; done
"""
import torch

from llmkern.models import generate, gguf_loader


def rss():
    d = dict(line.split(":") for line in open("/proc/self/status") if line.startswith(("VmRSS", "VmHWM")))
    return {k: int(v.split()[0]) // 1024 for k, v in d.items()}


torch.set_num_threads(2)
m, tok = gguf_loader.load_default(progress=False, prepare=True)
print("after load", rss(), "head released:", m.lm_head._released is not None)
generate(m, tok, "What is the capital of France?", max_new_tokens=16)
print("after generate", rss(), "embedding holds the table:", "weight" in m.embed_tokens._buffers)
