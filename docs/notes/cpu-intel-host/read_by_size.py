"""Read bandwidth of llmkern._C.read_sum by buffer size (8 MiB .. 1 GiB) and thread count: where the last-level
cache ends on this host. python read_by_size.py"""
import torch, time, statistics, llmkern
from llmkern import _backends
C = _backends.cpu_module()
for mb in (8, 32, 96, 256, 1024):
    x = torch.ones((mb << 20) // 4)
    x.sum()
    for th in (1, 2):
        torch.set_num_threads(th)
        ts=[]
        for _ in range(7):
            t=time.perf_counter(); C.read_sum(x.data_ptr(), x.numel(), th); ts.append(time.perf_counter()-t)
        print(f"{mb:5d} MB th={th}: {(mb<<20)/statistics.median(ts)/1e9:6.1f} GB/s (best {(mb<<20)/min(ts)/1e9:.1f})")
