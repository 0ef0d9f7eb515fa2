"""silu_mul / rms_norm time per call against the output buffer's offset from the input's, mod 4096 (a probe for
4K aliasing between the step's small buffers): prints the median and any offset over 1.3x it.

    OMP_NUM_THREADS=2 python alias_probe.py silu | rms
"""
import torch, statistics, sys, llmkern
from llmkern import _backends
from llmkern.ops.rms_norm import _cpu_call as rms_call
torch.set_num_threads(2)
mod = _backends.cpu_module(); isa = _backends.cpu_isa()
I2, H = 3072, 576
big = torch.empty(1 << 20, dtype=torch.float32)
base = (big.data_ptr() + 4095) // 4096 * 4096
off0 = (base - big.data_ptr()) // 4
def at(byte_off, n):
    s = off0 + byte_off // 4
    return big[s:s + n]
gu = at(0, I2).view(1, I2); gu.normal_()
REP = 200
def time_prog(calls):
    p = mod.StepProgram()
    for _ in range(REP):
        for c in calls: p.append(c)
    ts = []
    for _ in range(15):
        t = p.run_timed()
        ts.append(sum(t) / REP)
    return statistics.median(ts) * 1e6
which = sys.argv[1] if len(sys.argv) > 1 else "silu"
res = []
for d in range(0, 4096, 64):
    if which == "silu":
        act = at(16 * 4096 + d, I2 // 2).view(1, I2 // 2)
        us = time_prog([mod.silu_mul_call(gu.data_ptr(), 0, I2, 1, I2 // 2, act.data_ptr(), I2 // 2, isa)])
    else:
        x = at(0, H).view(1, H); x.normal_(); r = at(8192, H).view(1, H); r.normal_()
        w = torch.ones(H)
        y = at(16 * 4096 + d, H).view(1, H); h = at(24 * 4096 + 2 * d, H).view(1, H)
        us = time_prog([rms_call(x, w, 1e-6, r, y, h, 2)])
    res.append((d, us))
med = statistics.median(u for _, u in res)
print(which, "median", round(med, 3), "us")
print(" ".join(f"{d}:{u:.2f}" for d, u in res if u > 1.3 * med) or "no offset > 1.3x the median")
