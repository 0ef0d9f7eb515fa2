"""A/B decode_attention cpu adapter: base _C ($BASE) vs worktree _C, same process, interleaved, cold caches.
usage: ab_small.py CASES THREADS   CASES: comma list of names below, or 'all'"""
import sys, os, time, itertools, statistics, importlib.util, glob, torch, torch.nn.functional as F
th = int(sys.argv[2]) if len(sys.argv) > 2 else 1
torch.set_num_threads(th)
import llmkern._backends as BK
from llmkern.ops.decode_attention import _cpu
spec = importlib.util.spec_from_file_location("dsbase._C", glob.glob(os.environ.get('BASE', '/tmp/ds/base') + '/llmkern/_C*.so')[0])
base = importlib.util.module_from_spec(spec); spec.loader.exec_module(base)
new = BK.cpu_module(); orig = BK.cpu_module
def with_mod(mod, fn):
    BK.cpu_module = lambda: mod
    try: return fn()
    finally: BK.cpu_module = orig
S = (9, 3, 64); LL = (32, 8, 128)
CASES = {  # name: (B, L, heads, dtype, layout)
  's64': (1, 64, S, 'fp32', 'c'), 's256': (1, 256, S, 'fp32', 'c'), 's1024': (1, 1024, S, 'fp32', 'c'), 's512': (1, 512, S, 'fp32', 'c'), 's128': (1, 128, S, 'fp32', 'c'), 's4096': (1, 4096, S, 'fp32', 'c'),
  's64b': (1, 64, S, 'bf16', 'c'), 's256b': (1, 256, S, 'bf16', 'c'), 's1024b': (1, 1024, S, 'bf16', 'c'), 's4096b': (1, 4096, S, 'bf16', 'c'),
  's1024p': (1, 1024, S, 'fp32', 'p'), 's1024i': (1, 1024, S, 'fp32', 'i'),
  'b8': (8, 1024, S, 'fp32', 'c'), 'b8b': (8, 1024, S, 'bf16', 'c'), 'b8p': (8, 1024, S, 'fp32', 'p'), 'b8i': (8, 1024, S, 'fp32', 'i'),
  'l4096': (1, 4096, LL, 'fp32', 'c'), 'l4096p': (1, 4096, LL, 'fp32', 'p'), 'l4096i': (1, 4096, LL, 'fp32', 'i'), 'l4096b': (1, 4096, LL, 'bf16', 'c'),
  'lb8': (8, 512, LL, 'fp32', 'c'),
}
names = list(CASES) if len(sys.argv) < 2 or sys.argv[1] == 'all' else sys.argv[1].split(',')
N = int(os.environ.get('N', 200)); NOSDPA = os.environ.get('NOSDPA')
DT = {'fp32': torch.float32, 'bf16': torch.bfloat16}
for name in names:
    B, L, (Hq, Hk, D), dts, lay = CASES[name]
    dt = DT[dts]
    q = torch.randn(B, Hq, D).to(dt)
    es = 1 if lay == 'i' else dt.itemsize
    nb = B * L * Hk * D * es * 2
    ncop = max(1, min(256, -(-2 * 32 * 2**20 // nb)))
    lens = torch.full((B,), L, dtype=torch.int32)
    if lay == 'c':
        kv = [(torch.randn(B, L, Hk, D).to(dt), torch.randn(B, L, Hk, D).to(dt)) for _ in range(ncop)]
        fn = (lambda c: lambda: _cpu(q, *next(c), lens, None, None, None, None, 0.0, -1))(itertools.cycle(kv))
    elif lay == 'p':
        nbk = L // 16; tbl = torch.randperm(B * nbk).to(torch.int32).view(B, nbk)
        kv = [(torch.randn(B * nbk, 16, Hk, D).to(dt), torch.randn(B * nbk, 16, Hk, D).to(dt)) for _ in range(ncop)]
        fn = (lambda c: lambda: _cpu(q, *next(c), lens, tbl, None, None, None, 0.0, -1))(itertools.cycle(kv))
    else:
        kv = [(torch.randint(-127, 127, (B, L, Hk, D), dtype=torch.int8), torch.randint(-127, 127, (B, L, Hk, D), dtype=torch.int8), torch.rand(B, L, Hk), torch.rand(B, L, Hk)) for _ in range(ncop)]
        fn = (lambda c: lambda: (lambda a: _cpu(q, a[0], a[1], lens, None, a[2], a[3], None, 0.0, -1))(next(c)))(itertools.cycle(kv))
    kvs = None
    if lay == 'c' and not NOSDPA:
        kvs = itertools.cycle([(k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()) for k, v in kv[:ncop]])
        q4 = q[:, :, None]
        sd = lambda: F.scaled_dot_product_attention(q4, *next(kvs), enable_gqa=True)
    to, tn, ts = [], [], []
    for i in range(N + 10):
        if i % 2:
            t = time.perf_counter(); with_mod(base, fn); a = time.perf_counter() - t
            t = time.perf_counter(); fn(); b_ = time.perf_counter() - t
        else:
            t = time.perf_counter(); fn(); b_ = time.perf_counter() - t
            t = time.perf_counter(); with_mod(base, fn); a = time.perf_counter() - t
        if kvs is not None:
            t = time.perf_counter(); sd(); c = time.perf_counter() - t
            if i >= 10: ts.append(c)
        if i >= 10: to.append(a); tn.append(b_)
    md = lambda x: statistics.median(x) * 1e6
    line = f"{name:7s} B{B} L{L} {Hq}/{Hk} D{D} {dts} {lay} th{th}: base {md(to):8.1f} new {md(tn):8.1f} (min {min(to)*1e6:.1f}/{min(tn)*1e6:.1f}) new/base {md(tn)/md(to):.3f}"
    if ts: line += f" | SDPA {md(ts):8.1f}  SDPA/new {md(ts)/md(tn):.2f}x"
    print(line, flush=True)
