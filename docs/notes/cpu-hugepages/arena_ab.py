"""Prototype (not landed): every packed copy below 2 MiB carved from shared 64 MB huge-page arenas, against the
landed packed_buffer alone; decode ms/step of the default model, 5 x 100 steps, medians. Run alternately:

    ARENA=1 python docs/notes/cpu-hugepages/arena_ab.py; ARENA=0 python docs/notes/cpu-hugepages/arena_ab.py
"""
import os, sys, time, statistics, mmap, torch
import llmkern.ops._cpu_linear as CL
import llmkern.ops._int4_cpu as I4C
import llmkern.ops.int8_linear  # noqa
I8 = sys.modules["llmkern.ops.int8_linear"]
if os.environ.get("ARENA") == "1":
    state = {"buf": None, "off": 0}
    CHUNK = 64 << 20
    orig = CL.packed_buffer
    def packed_buffer(nbytes):
        if nbytes >= (2 << 20):
            return orig(nbytes)
        need = (nbytes + 63) // 64 * 64
        if state["buf"] is None or state["off"] + need > CHUNK:
            mm = mmap.mmap(-1, CHUNK + (2 << 20), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            t = torch.frombuffer(mm, dtype=torch.uint8)
            st = -t.data_ptr() % (2 << 20)
            mm.madvise(mmap.MADV_HUGEPAGE, st, CHUNK)
            state["buf"], state["off"] = t[st:st + CHUNK], 0
        v = state["buf"][state["off"]:state["off"] + nbytes]
        state["off"] += need
        return v
    CL.packed_buffer = packed_buffer
    I4C.packed_buffer = packed_buffer
    I8.packed_buffer = packed_buffer
from llmkern.models import gguf_loader
torch.set_num_threads(2)
m, tok = gguf_loader.load_default(progress=False)
res = []
with torch.inference_mode():
    for r in range(5):
        cache = m.new_cache(1, 256)
        m(torch.randint(0, 1000, (1, 20)), cache, last_only=True)
        t = time.perf_counter()
        for i in range(100):
            m(torch.tensor([[i + 5]]), cache, last_only=True)
        res.append((time.perf_counter() - t) * 10)
huge = [l for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages")]
print("arena" if os.environ.get("ARENA") == "1" else "plain", "ms/step median %.3f" % statistics.median(res), huge[0].strip() if huge else "")
