"""The machine's limits, measured in the same run as the benchmarks (with the same thread count).

Every benchmark reports the fraction of these it reaches:
- read_gbs: memory read bandwidth, GB/s (1e9 bytes/s), from summing a float32 tensor several times the
  size of the last-level cache (`x.sum()`, the pattern of a decode step streaming its weights);
- copy_gbs: read + write bandwidth of `y.copy_(x)` on the same size, bytes counted once each way;
- mm_gflops: rate of a large square `torch.mm` per dtype (fp32, bf16, fp16 on CUDA) and of
  `torch._int_mm` for int8 (GOP/s), in 1e9 multiply-adds x 2 per second.
Each number is the median of several timed runs after warm-up runs. Sizes: LLMKERN_BENCH_BW_MIB
(default 256 on CPU, or twice the last-level cache where that is bigger; 1024 on CUDA) and LLMKERN_BENCH_MM_N
(default 2048 on CPU, 8192 on CUDA).
"""
from __future__ import annotations

import functools
import os
import statistics
import time

import torch


def cpu_caches() -> list[tuple[int, str, str]]:
    """CPU 0's caches as sysfs lists them: (level, type "Data" / "Instruction" / "Unified", size text "32K");
    [] where unreadable."""
    out = []
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for d in sorted(os.listdir(base)):
            if not d.startswith("index"):
                continue
            fields = []
            for name in ("level", "type", "size"):
                with open(os.path.join(base, d, name)) as f:
                    fields.append(f.read().strip())
            out.append((int(fields[0]), fields[1], fields[2]))
    except (OSError, ValueError):
        return []
    return out


@functools.lru_cache(maxsize=None)
def llc_bytes(device: str = "cpu") -> int:
    """Size of the last-level cache (CPU: the highest level sysfs lists; CUDA: L2), 32 MiB if unknown."""
    if device == "cuda":
        return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0)) or (32 << 20)
    best = (0, 0)
    for level, _, txt in cpu_caches():
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(txt[-1:], 1)
        try:
            best = max(best, (level, int(txt.rstrip("KMG")) * mult))
        except ValueError:
            pass
    return best[1] or (32 << 20)


def cpu_host() -> str:
    """The CPU this runs on, as /proc/cpuinfo and sysfs name it: model name, family / model, L1d size (e.g. "AMD
    EPYC, family 25 model 17, L1d 32K"). The 2-vCPU VMs here have landed on Zen 4 (family 25) and Zen 5 (family 26)
    hosts, whose 512-bit rates differ 2x: a saved run says which it had. "" where unknown."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model") and key not in fields:
                    fields[key] = val.strip()
                if not line.strip() and fields:  # (the first CPU's block)
                    break
    except OSError:
        return ""
    parts = [fields.get("model name", "")]
    if "cpu family" in fields:
        parts.append(f"family {fields['cpu family']} model {fields.get('model', '?')}")
    parts += [f"L1d {size}" for level, kind, size in cpu_caches() if level == 1 and kind == "Data"][:1]
    return ", ".join(p for p in parts if p)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device: str = "cpu", *, repeats: int = 7, warmup: int = 2) -> float:
    """Median wall time of `fn()` in seconds over `repeats` runs, after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def hugepage_ones(n: int) -> torch.Tensor:
    """float32 [n] of ones on the CPU in llmkern's packed-weight memory (`ops._cpu_linear.packed_buffer`: from
    2 MiB up, transparent huge pages where the kernel grants them), or torch memory without llmkern."""
    try:
        from llmkern.ops._cpu_linear import packed_buffer
    except ImportError:
        return torch.ones(n, dtype=torch.float32)
    return packed_buffer(4 * n).view(torch.float32).fill_(1.0)


def measure(device: str = "cpu", *, bw_mib: int | None = None, mm_n: int | None = None,
            repeats: int = 7) -> dict:
    """Measure the limits on `device` with torch's current thread count; see the module doc."""
    cuda = device == "cuda"
    # CPU: 256 MiB, or twice the last-level cache where that is bigger (an Intel host here reports a 260 MB
    # L3: a 256 MiB probe there would read partly from it)
    default_mib = 1024 if cuda else max(256, -(-2 * llc_bytes(device) // (1 << 20)))
    bw_mib = bw_mib or int(os.environ.get("LLMKERN_BENCH_BW_MIB", default_mib))
    mm_n = mm_n or int(os.environ.get("LLMKERN_BENCH_MM_N", 8192 if cuda else 2048))
    out = {"device": device, "threads": torch.get_num_threads(), "bw_bytes": bw_mib << 20, "mm_n": mm_n,
           "llc_bytes": llc_bytes(device)}

    # [n] float32, filled (not empty) so that every page is really mapped before timing.
    n = (bw_mib << 20) // 4
    x = torch.ones(n, dtype=torch.float32, device=device)
    y = torch.empty_like(x).fill_(0.0)
    # The read limit is the faster of torch's sum and llmkern's own streaming probe (_C.read_sum: the
    # widest loads, one contiguous slice per thread, as the GEMV kernels read): a kernel is compared
    # with the best plain read of this machine, not with one reduction's speed.
    read_s = median_time(lambda: x.sum(), device, repeats=repeats)
    if not cuda:
        from llmkern import _backends

        C = _backends.cpu_module()
        if C is not None and hasattr(C, "read_sum"):
            threads = torch.get_num_threads()
            read_s = min(read_s, median_time(lambda: C.read_sum(x.data_ptr(), n, threads), device, repeats=repeats))
            # and from transparent huge pages, as llmkern's packed weights of 2 MiB and more are held (fewer TLB
            # misses: docs/notes/cpu-hugepages.md): the limit is the best plain read of this machine
            xh = hugepage_ones(n)
            read_s = min(read_s, median_time(lambda: C.read_sum(xh.data_ptr(), n, threads), device, repeats=repeats))
            del xh
    out["read_gbs"] = 4 * n / read_s / 1e9
    out["copy_gbs"] = 2 * 4 * n / median_time(lambda: y.copy_(x), device, repeats=repeats) / 1e9
    del x, y

    flops = 2.0 * mm_n ** 3
    rates = {}
    a32 = torch.randn(mm_n, mm_n, device=device)
    b32 = torch.randn(mm_n, mm_n, device=device)
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)) + ((("fp16", torch.float16),) if cuda else ()):
        a, b = a32.to(dt), b32.to(dt)
        rates[name] = flops / median_time(lambda: torch.mm(a, b), device, repeats=max(3, repeats // 2)) / 1e9
    # int8 x int8 -> int32; not every build/device has it for every size, so it is optional.
    a8 = torch.randint(-127, 128, (mm_n, mm_n), dtype=torch.int8, device=device)
    # b as the transposed view of a row-major [N, K] (cuBLASLt's int8 GEMM is "TN"; a row-major [K, N] b took a
    # slower path on the H200: 127 TOP/s, under W8A8 entries that ran the same GEMM shape; 2026-11-29).
    b8 = torch.randint(-127, 128, (mm_n, mm_n), dtype=torch.int8, device=device).t()
    try:
        rates["int8"] = flops / median_time(lambda: torch._int_mm(a8, b8), device, repeats=max(3, repeats // 2)) / 1e9
    except (RuntimeError, NotImplementedError):
        pass
    out["mm_gflops"] = rates
    return out


def fractions(limits: dict | None, nbytes: float, flops: float, seconds: float, compute: str) -> dict:
    """Achieved rates of one measurement and their fractions of `limits` (empty limits: rates only).

    compute: the mm_gflops key the work runs at ("fp32", "bf16", "fp16", "int8"). `bound` says which
    roof is lower at this arithmetic intensity (flops per byte): "memory" or "compute".
    """
    d = {"gbs": nbytes / seconds / 1e9 if nbytes else None,
         "gflops": flops / seconds / 1e9 if flops else None}
    if not limits:
        return d
    bw = limits.get("read_gbs")
    peak = limits.get("mm_gflops", {}).get(compute)
    d["frac_bw"] = d["gbs"] / bw if d["gbs"] is not None and bw else None
    d["frac_mm"] = d["gflops"] / peak if d["gflops"] is not None and peak else None
    if flops and nbytes and bw and peak:
        d["bound"] = "memory" if flops / nbytes * bw < peak else "compute"
    else:
        d["bound"] = "memory" if not flops else None
    return d


if __name__ == "__main__":  # python benchmarks/_machine.py: print this machine's limits
    import json

    torch.set_num_threads(int(os.environ.get("LLMKERN_BENCH_THREADS", "2")))
    print(json.dumps(measure(os.environ.get("LLMKERN_BENCH_DEVICE", "cpu")), indent=2))
