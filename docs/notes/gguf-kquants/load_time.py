"""load_gguf wall time of each file, native converters against numpy (gguf_kquants.NATIVE), best of 3."""
import sys
import time

import torch

from llmkern.formats import gguf_kquants as kq
from llmkern.models import load_gguf

torch.set_num_threads(2)
for f in sys.argv[1:]:
    out = []
    for native in (True, False):
        kq.NATIVE = native
        best = min((lambda t0: (load_gguf(f, progress=False), time.perf_counter() - t0)[1])(time.perf_counter())
                   for _ in range(3))
        out.append(f"{'native' if native else 'numpy'} {best:.2f} s")
    print(f.split("/")[-1], ", ".join(out))
