"""The CUDA-graph step's per-replay identity checks (GraphedDecodeStep._watched) on SmolLM2-135M: how many slots,
and what checking them costs on this CPU (median of 5 x 2000 checks). No GPU needed: the slots are the same.

    OMP_NUM_THREADS=1 PYTHONPATH=. python docs/notes/cuda-graph/watch_cost.py
"""
import statistics
import time

from llmkern.models import load_gguf
from llmkern.models.cuda_graph import GraphedDecodeStep

model, _ = load_gguf(progress=False)
step = GraphedDecodeStep(model, model.new_cache(1, 64), 1, "cpu")
slots = step._watched()
times = []
for _ in range(5):
    t = time.perf_counter()
    for _ in range(2000):
        any(d.get(k) is not v for d, k, v in slots)
    times.append((time.perf_counter() - t) / 2000 * 1e6)
print(f"{len(slots)} slots, {statistics.median(times):.1f} us a check")
