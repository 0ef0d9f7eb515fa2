"""GPU-only tests of the CUDA decode_attention (split-KV): every option against the reference, odd
lengths, paged == contiguous, split == unsplit, batch == one at a time, int8 caches, full model shapes
and CUDA-graph capture. Caches are NaN-poisoned past each sequence's length and in spare blocks (a key
read that should not happen fails), outputs are poisoned before the kernel runs."""
import math
import sys

import pytest
import torch

import llmkern
import llmkern.ops
from llmkern import reference
from llmkern.ops import OPS, strict

from _attention_helpers import TOL, assert_rel, poisoned_outputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA kernels need a GPU")

DEV = "cuda"
DA = sys.modules["llmkern.ops.decode_attention"]


class Problem:
    """Per-sequence keys/values placed in a contiguous or paged cache (float or int8), NaN elsewhere."""

    def __init__(self, lens, Hq, Hk, D, dtype, block_size=None, Sq=1, int8=False, seed=0, kv=None):
        g = torch.Generator(device=DEV).manual_seed(seed)
        self.lens, self.Hq, self.Hk, self.D, self.Sq = list(lens), Hq, Hk, D, Sq
        B, L = len(lens), max(list(lens) + [1])
        if kv is None:
            k = torch.randn(B, L, Hk, D, generator=g, device=DEV)
            v = torch.randn(B, L, Hk, D, generator=g, device=DEV)
        else:
            k, v = kv
        self.kv = (k, v)
        self.q = torch.randn(B, Sq, Hq, D, generator=g, device=DEV).to(dtype)
        if Sq == 1:
            self.q = self.q[:, 0]
        self.seq_lens = torch.tensor(self.lens, dtype=torch.int32, device=DEV)
        cdt = torch.int8 if int8 else dtype
        self.k_scale = self.v_scale = self.block_table = None
        if block_size is None:
            shape = (B, L + 3, Hk, D)
        else:
            nb = [(n + block_size - 1) // block_size for n in self.lens]
            nblocks = sum(nb) + 2
            perm = torch.randperm(nblocks, generator=torch.Generator().manual_seed(seed))
            table = torch.full((B, max(nb + [1]) + 1), -1, dtype=torch.int32)
            used = 0
            for b, n in enumerate(nb):
                table[b, :n] = perm[used:used + n].to(torch.int32)
                used += n
            self.block_table = table.to(DEV)
            shape = (nblocks, block_size, Hk, D)
        self.k_cache = self._empty(shape, cdt)
        self.v_cache = self._empty(shape, cdt)
        if int8:
            self.k_scale = torch.full(shape[:3], float("nan"), device=DEV)
            self.v_scale = torch.full(shape[:3], float("nan"), device=DEV)
        for b, n in enumerate(self.lens):
            if n == 0:
                continue
            j = torch.arange(n, device=DEV)
            if block_size is None:
                rows, cols = torch.full_like(j, b), j
            else:
                rows, cols = self.block_table[b].long()[j // block_size], j % block_size
            for src, cache, sc in ((k, self.k_cache, self.k_scale), (v, self.v_cache, self.v_scale)):
                x = src[b, :n].to(dtype)
                if int8:
                    qx, s = reference.quantize_rows_int8(x)
                    cache[rows, cols], sc[rows, cols] = qx, s
                else:
                    cache[rows, cols] = x

    @staticmethod
    def _empty(shape, dt):
        if dt == torch.int8:
            return torch.full(shape, 99, dtype=torch.int8, device=DEV)
        return torch.full(shape, float("nan"), dtype=dt, device=DEV)

    def args(self):
        return (self.q, self.k_cache, self.v_cache, self.seq_lens)

    def kw(self, **opts):
        return dict(block_table=self.block_table, k_scale=self.k_scale, v_scale=self.v_scale, **opts)

    def run(self, q=None, **opts):
        q = self.q if q is None else q
        with strict(), poisoned_outputs():
            out = llmkern.ops.decode_attention(q, self.k_cache, self.v_cache, self.seq_lens, backend="cuda",
                                               **self.kw(**opts))
        assert OPS["decode_attention"].last_backend == "cuda"
        return out

    def ref(self, **opts):
        k = self.kw(**opts)
        return reference.decode_attention(self.q, self.k_cache, self.v_cache, self.seq_lens, k["block_table"],
                                          k["k_scale"], k["v_scale"], opts.get("scale"), opts.get("softcap", 0.0),
                                          opts.get("window_left", -1))


@pytest.fixture
def force_splits():
    """Set DA.CUDA_FORCE_SPLITS for one test (restored after)."""
    old = DA.CUDA_FORCE_SPLITS

    def set_(n):
        DA.CUDA_FORCE_SPLITS = n

    yield set_
    DA.CUDA_FORCE_SPLITS = old


ODD_LENS = [1, 17, 100, 257, 1000]
HEADS = [(32, 8, 128), (9, 3, 64), (8, 1, 128), (4, 4, 64), (16, 1, 64), (12, 2, 128)]
OPTS = {"plain": {}, "window": dict(window_left=37), "softcap": dict(softcap=2.0, scale=0.3), "scale": dict(scale=0.05)}


def _check_reference(dtype, heads, block_size):
    Hq, Hk, D = heads
    p = Problem(ODD_LENS + [0], Hq, Hk, D, dtype, block_size=block_size, seed=1)
    out = p.run()
    assert out.dtype == dtype and out.shape == p.q.shape
    assert_rel(out, p.ref(), TOL[dtype])
    assert torch.equal(out[-1], torch.zeros_like(out[-1])), "a zero-length sequence gives 0"


@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"H{h[0]}x{h[1]}_D{h[2]}")
@pytest.mark.parametrize("block_size", [None, 1, 7, 16, 256], ids=lambda b: "contig" if b is None else f"bs{b}")
def test_matches_reference(heads, block_size):
    _check_reference(torch.bfloat16, heads, block_size)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("heads", [(32, 8, 128), (9, 3, 64), (16, 1, 64)], ids=lambda h: f"H{h[0]}x{h[1]}_D{h[2]}")
@pytest.mark.parametrize("block_size", [None, 16], ids=lambda b: "contig" if b is None else f"bs{b}")
def test_matches_reference_dtypes(dtype, heads, block_size):
    _check_reference(dtype, heads, block_size)


@pytest.mark.parametrize("opt", list(OPTS), ids=str)
@pytest.mark.parametrize("Sq", [1, 2, 5])
@pytest.mark.parametrize("heads", [(32, 8, 128), (9, 3, 64)], ids=lambda h: f"H{h[0]}x{h[1]}_D{h[2]}")
def test_options_and_multi_token(opt, Sq, heads):
    Hq, Hk, D = heads
    p = Problem([5, 17, 100, 257, 1000, 0], Hq, Hk, D, torch.bfloat16, block_size=16, Sq=Sq, seed=2)
    assert_rel(p.run(**OPTS[opt]), p.ref(**OPTS[opt]), TOL[torch.bfloat16])
    p32 = Problem([5, 17, 1000], Hq, Hk, D, torch.float32, Sq=Sq, seed=3)
    assert_rel(p32.run(**OPTS[opt]), p32.ref(**OPTS[opt]), TOL[torch.float32])


@pytest.mark.parametrize("window", [0, 1, 5, 300, 5000])
def test_windows(window):
    p = Problem([3, 4, 100, 1000], 8, 2, 128, torch.float32, block_size=7, Sq=3, seed=4)
    assert_rel(p.run(window_left=window), p.ref(window_left=window), TOL[torch.float32])


@pytest.mark.parametrize("heads", [(32, 8, 128), (9, 3, 64)], ids=str)
@pytest.mark.parametrize("block_size", [1, 16, 33, 256])
def test_paged_equals_contiguous(force_splits, heads, block_size):
    Hq, Hk, D = heads
    a = Problem(ODD_LENS, Hq, Hk, D, torch.bfloat16, seed=5)
    b = Problem(ODD_LENS, Hq, Hk, D, torch.bfloat16, block_size=block_size, seed=5, kv=a.kv)
    b.q = a.q
    for ns in (1, 3):
        force_splits(ns)
        assert torch.equal(a.run(), b.run()), "same keys in the same order give the same bits"
    force_splits(None)
    assert_rel(a.run(), b.run(), 1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("heads", [(32, 8, 128), (9, 3, 64), (16, 1, 64)], ids=lambda h: f"H{h[0]}x{h[1]}_D{h[2]}")
@pytest.mark.parametrize("block_size", [None, 1, 16], ids=lambda b: "contig" if b is None else f"bs{b}")
def test_pipelined_loop_equals_register_loop(monkeypatch, force_splits, dtype, heads, block_size):
    """CUDA_DECODE_PIPELINE (cp.async into shared memory a step ahead) gives the register loop's bits on the GPU
    (the same math in the same order), splits and Sq > 1 with a window too; the launcher says which loop ran."""
    Hq, Hk, D = heads
    for Sq, opts in ((1, {}), (3, dict(window_left=37))):
        p = Problem(ODD_LENS + [0], Hq, Hk, D, dtype, block_size=block_size, Sq=Sq, seed=11)
        for ns in (1, 3):
            force_splits(ns)
            monkeypatch.setattr(DA, "CUDA_DECODE_PIPELINE", False)
            a = p.run(**opts)
            assert DA._last_cuda_path == "split"
            monkeypatch.setattr(DA, "CUDA_DECODE_PIPELINE", True)
            b = p.run(**opts)
            assert DA._last_cuda_path == "split_pipelined"
            assert torch.equal(a.view(torch.int16) if dtype != torch.float32 else a.view(torch.int32),
                               b.view(torch.int16) if dtype != torch.float32 else b.view(torch.int32)), (Sq, ns)
        assert_rel(b, p.ref(**opts), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("heads", [(32, 8, 128), (9, 3, 64), (40, 2, 64)], ids=lambda h: f"H{h[0]}x{h[1]}_D{h[2]}")
@pytest.mark.parametrize("block_size", [None, 1, 16], ids=lambda b: "contig" if b is None else f"bs{b}")
def test_mma_kernel(monkeypatch, force_splits, dtype, heads, block_size):
    """CUDA_DECODE_MMA (decode_attention_mma.cuh): the tensor-core kernel against the reference and close to the
    split kernel, with splits, Sq > 1 with a window, softcap, 20 rows per KV head (two row chunks); the launcher
    says it ran; reruns give the same bits; a CUDA graph replays it."""
    Hq, Hk, D = heads
    monkeypatch.setattr(DA, "CUDA_DECODE_MMA", True)
    for Sq, opts in ((1, {}), (3, dict(window_left=37)), (1, dict(softcap=30.0))):
        p = Problem(ODD_LENS + [0], Hq, Hk, D, dtype, block_size=block_size, Sq=Sq, seed=16)
        for ns in (1, 3, None):
            force_splits(ns)
            out = p.run(**opts)
            assert DA._last_cuda_path == "split_mma"
            assert_rel(out, p.ref(**opts), TOL[dtype])
            assert torch.equal(out, p.run(**opts))
    monkeypatch.setattr(DA, "CUDA_DECODE_MMA", False)
    split = p.run(**opts)
    assert DA._last_cuda_path == "split"
    assert_rel(out, split, TOL[dtype])
    monkeypatch.setattr(DA, "CUDA_DECODE_MMA", True)
    with strict():
        p.run()  # warm-up (the kernel's shared-memory opt-in)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = llmkern.ops.decode_attention(*p.args(), **p.kw(), backend="cuda")
    p.q.copy_(torch.randn_like(p.q))
    g.replay()
    torch.cuda.synchronize()
    assert_rel(out, p.ref(), TOL[dtype])


@pytest.mark.parametrize("model", ["llama3-8b", "smollm2"])
def test_mma_kernel_full_shapes(monkeypatch, model):
    """CUDA_DECODE_MMA at batch 64, random lengths up to 4096, paged (block 16) and contiguous."""
    monkeypatch.setattr(DA, "CUDA_DECODE_MMA", True)
    Hq, Hk, D = (32, 8, 128) if model == "llama3-8b" else (9, 3, 64)
    gen = torch.Generator().manual_seed(19)
    lens = torch.randint(1, 4097, (64,), generator=gen).tolist()
    lens[0], lens[1] = 4096, 1
    p = Problem(lens, Hq, Hk, D, torch.bfloat16, block_size=16, seed=19)
    assert_rel(p.run(), p.ref(), TOL[torch.bfloat16])
    assert DA._last_cuda_path == "split_mma"
    p = Problem([4096] * 4, Hq, Hk, D, torch.bfloat16, block_size=None, seed=20)
    assert_rel(p.run(), p.ref(), TOL[torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("splits", [2, 3, 7, 16, 64, 1000])
def test_split_equals_unsplit(force_splits, dtype, splits):
    p = Problem(ODD_LENS + [0, 4096], 32, 8, 128, dtype, block_size=16, seed=6)
    force_splits(1)
    one = p.run()
    force_splits(splits)
    many = p.run()
    assert_rel(many, one, 1e-6 if dtype == torch.float32 else 1e-2)
    assert_rel(many, p.ref(), TOL[dtype])
    assert torch.equal(many[-2], torch.zeros_like(many[-2]))


def test_batch_equals_one_at_a_time(force_splits):
    force_splits(4)
    p = Problem(ODD_LENS + [0], 9, 3, 64, torch.bfloat16, block_size=16, seed=7)
    full = p.run()
    for b in range(len(p.lens)):
        with strict():
            one = llmkern.ops.decode_attention(p.q[b:b + 1], p.k_cache, p.v_cache, p.seq_lens[b:b + 1],
                                               block_table=p.block_table[b:b + 1], backend="cuda")
        assert torch.equal(one[0], full[b])


@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("heads", [(32, 8, 128), (9, 3, 64)], ids=str)
@pytest.mark.parametrize("block_size", [None, 16])
def test_int8_cache(q_dtype, heads, block_size):
    Hq, Hk, D = heads
    f = Problem(ODD_LENS + [0], Hq, Hk, D, q_dtype, block_size=block_size, seed=8)
    i8 = Problem(ODD_LENS + [0], Hq, Hk, D, q_dtype, block_size=block_size, int8=True, seed=8, kv=f.kv)
    i8.q = f.q
    out = i8.run()
    assert_rel(out, i8.ref(), TOL[q_dtype])  # against the dequantized cache: the kernel's own error
    assert_rel(out, f.ref(), 2e-2)  # quantization error vs the float cache
    for opt in ("window", "softcap"):
        assert_rel(i8.run(**OPTS[opt]), i8.ref(**OPTS[opt]), TOL[q_dtype])


@pytest.mark.parametrize("model", ["llama3-8b", "smollm2"])
@pytest.mark.parametrize("cache", ["bf16", "int8"])
def test_full_shapes(model, cache):
    """Batch 64 of random lengths up to 4096 in a paged cache (block 16), plus a 4096-token batch of 4."""
    Hq, Hk, D = (32, 8, 128) if model == "llama3-8b" else (9, 3, 64)
    gen = torch.Generator().manual_seed(9)
    lens = torch.randint(1, 4097, (64,), generator=gen).tolist()
    lens[0], lens[1] = 4096, 1
    p = Problem(lens, Hq, Hk, D, torch.bfloat16, block_size=16, int8=cache == "int8", seed=9)
    assert_rel(p.run(), p.ref(), TOL[torch.bfloat16])
    p = Problem([4096] * 4, Hq, Hk, D, torch.bfloat16, block_size=None, int8=cache == "int8", seed=10)
    assert_rel(p.run(), p.ref(), TOL[torch.bfloat16])


def test_non_contiguous_q_and_unsupported_head_dim():
    p = Problem([17, 100], 8, 2, 128, torch.bfloat16, block_size=16, seed=11)
    qn = torch.randn(2, 8, 256, device=DEV).to(torch.bfloat16)[..., ::2]
    p.q = qn
    assert_rel(p.run(q=qn), p.ref(), TOL[torch.bfloat16])
    p = Problem([17, 100], 4, 2, 256, torch.float32, block_size=16, seed=12)  # float32 caches: D <= 128
    with strict(), pytest.raises(RuntimeError, match="head dim"):
        llmkern.ops.decode_attention(*p.args(), **p.kw(), backend="cuda")
    # Without strict the op falls back (to triton or the reference) and is still right.
    assert_rel(llmkern.ops.decode_attention(*p.args(), **p.kw()), p.ref(), TOL[torch.float32])


@pytest.mark.parametrize("D", [32, 40, 80, 96, 256])
@pytest.mark.parametrize("int8", [False, True])
def test_other_head_dims(D, int8):
    """Head dims between the instantiated widths (64, 128, 256): the lanes past D idle."""
    p = Problem(ODD_LENS + [0], 8, 2, D, torch.bfloat16, block_size=16, int8=int8, seed=14)
    assert_rel(p.run(), p.ref(), TOL[torch.bfloat16])
    p = Problem([1, 100], 8, 2, D, torch.float16, seed=15)
    assert_rel(p.run(window_left=7), p.ref(window_left=7), TOL[torch.float16])


@pytest.mark.parametrize("splits", [1, 5])
def test_cuda_graph_capture(force_splits, splits):
    force_splits(splits)
    p = Problem([1, 17, 100, 1000], 32, 8, 128, torch.bfloat16, block_size=16, seed=13)
    with strict():
        p.run()  # warm-up
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = llmkern.ops.decode_attention(*p.args(), **p.kw(), backend="cuda")
    assert OPS["decode_attention"].last_backend == "cuda"
    p.q.copy_(torch.randn_like(p.q))  # new inputs in the captured buffers
    g.replay()
    torch.cuda.synchronize()
    assert_rel(out, p.ref(), TOL[torch.bfloat16])


def test_split_choice_fills_the_gpu():
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert DA.cuda_num_splits(1, 8, 4, 4096, sms) > 8
    assert DA.cuda_num_splits(64, 8, 4, 100, sms) == 1
    ns = DA.cuda_num_splits(64, 8, 4, 4096, sms)
    assert 1 <= ns <= 4 and math.ceil(64 * 8 * ns) >= sms
