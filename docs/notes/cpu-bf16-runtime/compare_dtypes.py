"""Greedy answers of SmolLM2-135M (the default GGUF) to 8 chat prompts, per activation dtype, side by side.

    PYTHONPATH=. python docs/notes/cpu-bf16-runtime/compare_dtypes.py float32 bfloat16

Prints the median decode ms/step per dtype, then per prompt SAME/DIFF and the first 100 characters of each
dtype's answer (48 new tokens). The numbers in docs/notes/cpu-bf16-runtime.md ("Quality") come from it.
"""
import sys

import torch

from llmkern.models import default_model_path, load_gguf
from llmkern.models.generate import generate

torch.set_num_threads(2)
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain what a CPU cache is in two sentences.", "List three prime numbers.", "Who wrote Hamlet?",
           "Translate 'good morning' into Spanish.", "What is 12 times 7?", "Give me a tip for learning to code."]
answers = {}
for name in sys.argv[1:]:
    model, tok = load_gguf(default_model_path(), dtype=getattr(torch, name), progress=False)
    generate(model, tok, "warm up", max_new_tokens=4)  # first-call preparation out of the timings
    ms = []
    for p in PROMPTS:
        r = generate(model, tok, p, max_new_tokens=48)
        ms.append(r.stats["ms_per_step"])
        answers.setdefault(p, []).append(r.texts[0])
    print(name, "decode ms/step, median over the prompts:", f"{sorted(ms)[len(ms) // 2]:.2f}")
for p, texts in answers.items():
    print("SAME" if len(set(texts)) == 1 else "DIFF", p, "|", " || ".join(t[:100].replace("\n", " ") for t in texts))
