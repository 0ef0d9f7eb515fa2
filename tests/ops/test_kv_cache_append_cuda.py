"""GPU-only tests of the CUDA kv_cache_append: bit-exact float writes, the exact int8 rule, fused rotary
(NeoX and GPT-J) on q and k, paged and contiguous caches, -1 padding, odd sizes, non-contiguous inputs,
full model shapes and CUDA-graph capture. Each run is compared bit for bit with the reference on the
same (GPU) inputs; caches start poisoned (NaN floats, 99 int8 values, NaN scales)."""
import pytest
import torch

import llmkern
from llmkern import reference
from llmkern.ops import OPS, rotary_cos_sin, strict

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA kernels need a GPU")

DEV = "cuda"
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
            torch.int8: torch.int8}


def bits_equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(INT_VIEW[a.dtype]), b.view(INT_VIEW[b.dtype]))


def caches(shape, dtype):
    if dtype == torch.int8:
        return [torch.full(shape, 99, dtype=torch.int8, device=DEV), torch.full(shape, 99, dtype=torch.int8, device=DEV),
                torch.full(shape[:3], float("nan"), device=DEV), torch.full(shape[:3], float("nan"), device=DEV)]
    return [torch.full(shape, float("nan"), dtype=dtype, device=DEV),
            torch.full(shape, float("nan"), dtype=dtype, device=DEV), None, None]


def clone(c):
    return [None if t is None else t.clone() for t in c]


def run_both(k, v, cache, slots, q=None, **kw):
    """(cuda result, reference result): caches, scales and rotated q of each."""
    got, want = clone(cache), clone(cache)
    qg = None if q is None else q.clone()
    qw = None if q is None else q.clone()
    with strict():
        llmkern.ops.kv_cache_append(k, v, got[0], got[1], slots, k_scale=got[2], v_scale=got[3], q=qg,
                                    backend="cuda", **kw)
    assert OPS["kv_cache_append"].last_backend == "cuda"
    reference.kv_cache_append(k, v, want[0], want[1], slots, want[2], want[3], qw, kw.get("positions"),
                              kw.get("cos_sin_cache"), kw.get("rotary_interleaved", False))
    return (got, qg), (want, qw)


def assert_same(res):
    (got, qg), (want, qw) = res
    for name, a, b in zip(("k_cache", "v_cache", "k_scale", "v_scale"), got, want):
        if a is not None:
            assert bits_equal(a, b), f"{name} differs from the reference"
    if qg is not None:
        assert bits_equal(qg, qw), "rotated q differs from the reference"


def contiguous_problem(dtype, cache_dtype, B=3, S=17, Smax=40, Hk=2, D=64, layout="contiguous"):
    starts = torch.tensor([0, 5, 23][:B] + [0] * max(0, B - 3))
    pos = starts[:, None] + torch.arange(S)[None, :]
    slots = (torch.arange(B)[:, None] * Smax + pos).to(DEV)
    if layout == "contiguous":
        k = torch.randn(B, S, Hk, D, device=DEV).to(dtype)
        v = torch.randn(B, S, Hk, D, device=DEV).to(dtype)
    else:  # sliced: every other head of a wider tensor (strides not multiples of anything nice)
        k = torch.randn(B, S, 2 * Hk + 1, D, device=DEV).to(dtype)[:, :, 1::2]
        v = torch.randn(B, S, 2 * Hk + 1, D, device=DEV).to(dtype)[:, :, 1::2]
    return k, v, caches((B, Smax, Hk, D), cache_dtype), slots, pos.to(DEV)


def paged_problem(dtype, cache_dtype, lens=(1, 0, 100, 5, 257), Hk=4, D=128, block_size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    nblocks = sum((n + block_size - 1) // block_size for n in lens) + 2
    perm = torch.randperm(nblocks, generator=g)
    slots, pos, used = [], [], 0
    for n in lens:
        nb = (n + block_size - 1) // block_size
        blocks = perm[used:used + nb]
        used += nb
        j = torch.arange(n)
        slots.append(blocks[j // block_size] * block_size + j % block_size)
        pos.append(j)
    slots, pos = torch.cat(slots), torch.cat(pos)
    for i in (2, 9, 50):  # -1 padding rows among real tokens
        slots = torch.cat([slots[:i], torch.tensor([-1]), slots[i:]])
        pos = torch.cat([pos[:i], torch.tensor([3]), pos[i:]])
    T = slots.numel()
    k = torch.randn(T, Hk, D, device=DEV).to(dtype)
    v = torch.randn(T, Hk, D, device=DEV).to(dtype)
    return k, v, caches((nblocks, block_size, Hk, D), cache_dtype), slots.to(DEV), pos.to(DEV)


PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
         (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16), (torch.float16, torch.float32),
         (torch.float32, torch.int8), (torch.bfloat16, torch.int8), (torch.float16, torch.int8)]


@pytest.mark.parametrize("problem", ["contiguous", "paged"])
@pytest.mark.parametrize("dtype,cache_dtype", PAIRS, ids=str)
def test_bit_exact(problem, dtype, cache_dtype):
    torch.manual_seed(0)
    k, v, c, slots, _ = (contiguous_problem if problem == "contiguous" else paged_problem)(dtype, cache_dtype)
    res = run_both(k, v, c, slots)
    assert_same(res)
    if cache_dtype != torch.int8:
        assert torch.isnan(res[0][0][0].float()).any(), "unwritten slots keep their NaN"


@pytest.mark.parametrize("D", [8, 40, 64, 80, 96, 128, 256, 3, 17])
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float32, torch.int8], ids=str)
def test_odd_head_dims(D, cache_dtype):
    torch.manual_seed(1)
    k, v, c, slots, pos = contiguous_problem(torch.bfloat16, cache_dtype, Hk=3, D=D)
    assert_same(run_both(k, v, c, slots))
    if D % 2 == 0:
        cs = rotary_cos_sin(64, D if D <= 64 else D // 2).to(DEV)
        q = torch.randn(3, 17, 5, D, device=DEV).to(torch.bfloat16)
        for inter in (False, True):
            assert_same(run_both(k, v, c, slots, q=q, positions=pos, cos_sin_cache=cs, rotary_interleaved=inter))


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [128, 64, 2])
@pytest.mark.parametrize("dtype,cache_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                               (torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                               (torch.bfloat16, torch.int8), (torch.float32, torch.int8)], ids=str)
def test_fused_rotary(interleaved, rotary_dim, dtype, cache_dtype):
    torch.manual_seed(2)
    k, v, c, slots, pos = paged_problem(dtype, cache_dtype)
    cs = rotary_cos_sin(512, rotary_dim).to(DEV)
    q = torch.randn(k.shape[0], 12, 128, device=DEV).to(dtype)
    assert_same(run_both(k, v, c, slots, q=q, positions=pos, cos_sin_cache=cs, rotary_interleaved=interleaved))
    # Without q, only k is rotated; int32 positions.
    assert_same(run_both(k, v, c, slots, positions=pos.to(torch.int32), cos_sin_cache=cs,
                         rotary_interleaved=interleaved))


def test_non_contiguous_inputs_and_q():
    torch.manual_seed(3)
    k, v, c, slots, pos = contiguous_problem(torch.bfloat16, torch.bfloat16, layout="sliced")
    assert_same(run_both(k, v, c, slots))
    q = torch.randn(3, 17, 13, 64, device=DEV).to(torch.bfloat16)[:, :, ::2]  # non-contiguous heads
    cs = rotary_cos_sin(64, 64).to(DEV)
    assert_same(run_both(k, v, c, slots, q=q, positions=pos, cos_sin_cache=cs))
    # Misaligned storage (offset of one element): the kernel must take its scalar path.
    kb = torch.randn(3 * 17 * 2 * 64 + 1, device=DEV).to(torch.bfloat16)[1:].view(3, 17, 2, 64)
    assert_same(run_both(kb, v, c, slots))


def test_int8_ties_zero_rows_and_tiny_rows():
    k = torch.zeros(1, 3, 32, device=DEV)
    k[0, 0, :6] = torch.tensor([127.0, 2.5, 3.5, -0.5, -1.5, 126.5])
    k[0, 2] = torch.randn(32) * 1e-38  # subnormal range: 127 / amax overflows to inf
    v = torch.randn(1, 3, 32, device=DEV)
    c = caches((1, 4, 3, 32), torch.int8)
    res = run_both(k, v, c, torch.tensor([2], device=DEV))
    assert_same(res)
    kc, _, ks, _ = res[0][0]
    assert kc[0, 2, 0, :6].tolist() == [127, 2, 4, 0, -2, 126]
    assert ks[0, 2, 1].item() == 0.0 and kc[0, 2, 1].abs().sum() == 0
    assert kc[0, 0].eq(99).all() and ks[0, 0].isnan().all()


@pytest.mark.parametrize("model", ["llama3-8b", "smollm2"])
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.int8], ids=str)
def test_full_decode_step_shapes(model, cache_dtype):
    """Batch 64 decode step into a 4096-token paged cache (block 16), with fused rotary on q and k."""
    Hq, Hk, D = (32, 8, 128) if model == "llama3-8b" else (9, 3, 64)
    torch.manual_seed(4)
    B, bs = 64, 16
    nblocks = B * 4096 // bs
    c = caches((nblocks, bs, Hk, D), cache_dtype)
    lens = torch.randint(1, 4096, (B,))
    table = torch.randperm(nblocks).view(B, -1)
    pos = lens - 1
    slots = (table[torch.arange(B), pos // bs] * bs + pos % bs).to(DEV)
    k = torch.randn(B, 1, Hk, D, device=DEV).to(torch.bfloat16)
    v = torch.randn(B, 1, Hk, D, device=DEV).to(torch.bfloat16)
    q = torch.randn(B, 1, Hq, D, device=DEV).to(torch.bfloat16)
    cs = rotary_cos_sin(4096, D).to(DEV)
    assert_same(run_both(k, v, c, slots.view(B, 1), q=q, positions=pos.view(B, 1).to(DEV), cos_sin_cache=cs))


def test_prefill_many_tokens():
    torch.manual_seed(5)
    T, Hk, D = 3000, 8, 128
    k = torch.randn(T, Hk, D, device=DEV).to(torch.bfloat16)
    v = torch.randn(T, Hk, D, device=DEV).to(torch.bfloat16)
    c = caches((200, 16, Hk, D), torch.bfloat16)
    slots = torch.randperm(3200, device=DEV)[:T]
    assert_same(run_both(k, v, c, slots))


def test_empty_and_all_padding():
    k = torch.randn(0, 2, 64, device=DEV)
    c = caches((2, 4, 2, 64), torch.float32)
    assert_same(run_both(k, k, c, torch.zeros(0, dtype=torch.int64, device=DEV)))
    k = torch.randn(5, 2, 64, device=DEV)
    res = run_both(k, k, c, torch.full((5,), -1, dtype=torch.int64, device=DEV))
    assert_same(res)
    assert torch.isnan(res[0][0][0]).all()


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.int8], ids=str)
def test_cuda_graph_capture(cache_dtype):
    torch.manual_seed(6)
    k, v, c, slots, pos = paged_problem(torch.bfloat16, cache_dtype)
    cs = rotary_cos_sin(512, 128).to(DEV)
    q = torch.randn(k.shape[0], 8, 128, device=DEV).to(torch.bfloat16)
    got, qg = clone(c), q.clone()

    def step():
        llmkern.ops.kv_cache_append(k, v, got[0], got[1], slots, k_scale=got[2], v_scale=got[3], q=qg,
                                    positions=pos, cos_sin_cache=cs, backend="cuda")

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), strict():
        step()  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with strict(), torch.cuda.graph(g):
        step()
    for t in got:
        if t is not None:
            t.copy_(torch.full_like(t, 99) if t.dtype == torch.int8 else torch.full_like(t, float("nan")))
    qg.copy_(q)
    g.replay()
    torch.cuda.synchronize()
    assert OPS["kv_cache_append"].last_backend == "cuda"
    want, qw = clone(c), q.clone()
    reference.kv_cache_append(k, v, want[0], want[1], slots, want[2], want[3], qw, pos, cs, False)
    assert_same(((got, qg), (want, qw)))
