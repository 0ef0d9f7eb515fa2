"""The CUDA backends of kv_cache_append, decode_attention, rms_norm and rotary_embedding, run on the CPU
through a host emulation of the CUDA kernels (build_emu.py, include/cuda_runtime.h): the real adapter code
(llmkern/ops/<op>.py `_cuda`, with the device check, the stream and the SM count swapped for CPU stand-ins),
the real bindings, launchers and kernels. Catches index, reduction and rounding errors without a GPU;
the GPU-only tests (tests/ops/test_<op>_cuda.py) remain the real check."""
import inspect
import re
import shutil
import sys
import textwrap

import pytest
import torch

import llmkern.ops  # noqa: F401  (registers the ops; the adapters live in sys.modules)
from llmkern import reference
from llmkern.ops import rotary_cos_sin

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the CUDA emulator is built with g++")

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.int8: torch.int8}


@pytest.fixture(scope="module")
def emu():
    import build_emu

    return build_emu.load()


def adapter(emu, name):
    """llmkern.ops.<name>._cuda rewritten to run on CPU tensors with the emulated module."""
    mod = sys.modules[f"llmkern.ops.{name}"]
    src = textwrap.dedent(inspect.getsource(mod._cuda))
    src = "\n".join(line for line in src.splitlines() if not line.startswith("@"))
    for old, new in (('.device.type != "cuda"', '.device.type != "cpu"'), ("_backends.cuda_module()", "EMU")):
        assert old in src
        src = src.replace(old, new)
    src = re.sub(r"_backends\.cuda_stream\([^)]*\)", "0", src)
    src = re.sub(r"_sm_count\(.*?current_device\(\)\)", "4", src, flags=re.S)
    g = dict(mod.__dict__, EMU=emu)
    exec(src, g)
    return g["_cuda"], mod


def rel(a, b):
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm()).item() if b.norm() > 0 else (a - b).norm().item()


def bits_equal(a, b):
    return a.dtype == b.dtype and torch.equal(a.view(INT_VIEW[a.dtype]), b.view(INT_VIEW[b.dtype]))


# ---------------------------------------------------------------- rotary_embedding, rms_norm


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_rotary_bit_exact(emu, dtype, interleaved):
    rot, _ = adapter(emu, "rotary_embedding")
    torch.manual_seed(0)
    q = torch.randn(3, 2, 5, 64).to(dtype)[:, 1]  # non-contiguous tokens
    k = torch.randn(3, 2, 66).to(dtype)[..., :64]  # head stride 66: misaligned pairs for odd offsets
    pos = torch.randint(0, 100, (3,))
    cs = rotary_cos_sin(100, 48)
    qo, ko = rot(q, k, pos, cs, interleaved)
    qr, kr = reference.rotary_embedding(q, k, pos, cs, interleaved)
    assert bits_equal(qo, qr) and bits_equal(ko, kr)


@pytest.mark.parametrize("N", [64, 576, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_rms_norm(emu, dtype, N):
    rms, _ = adapter(emu, "rms_norm")
    torch.manual_seed(1)
    x, r, w = torch.randn(3, N).to(dtype), torch.randn(3, N).to(dtype), torch.randn(N).to(dtype)
    y, h = rms(x, w, 1e-5, r)
    ry, rh = reference.rms_norm(x, w, 1e-5, r)
    assert rel(y, ry) <= TOL[dtype] and torch.equal(h, rh)
    y, _ = rms(x, w.float(), 1e-5, None)
    assert rel(y, reference.rms_norm(x, w.float(), 1e-5, None)[0]) <= TOL[dtype]


# ---------------------------------------------------------------- kv_cache_append


def _caches(shape, dt):
    if dt == torch.int8:
        return [torch.full(shape, 99, dtype=dt), torch.full(shape, 99, dtype=dt),
                torch.full(shape[:3], float("nan")), torch.full(shape[:3], float("nan"))]
    return [torch.full(shape, float("nan"), dtype=dt), torch.full(shape, float("nan"), dtype=dt), None, None]


@pytest.mark.parametrize("rotary", ["none", "k", "neox", "gptj"])
@pytest.mark.parametrize("D", [64, 40, 3])
@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16),
                                               (torch.bfloat16, torch.int8), (torch.float32, torch.int8)], ids=str)
def test_kv_cache_append_bit_exact(emu, dtype, cache_dtype, D, rotary):
    if rotary != "none" and D % 2:
        pytest.skip("rotary needs an even head dim")
    kv, _ = adapter(emu, "kv_cache_append")
    torch.manual_seed(2)
    T, Hk, Hq = 7, 2, 3
    k, v = torch.randn(T, Hk, D).to(dtype), torch.randn(T, Hk, D).to(dtype)
    if D == 40:  # an all-zero head and exact ties of the int8 rounding
        k[1, 0] = 0
        k[2, 1, :5] = torch.tensor([127.0, 2.5, 3.5, -0.5, -1.5])
    slots = torch.tensor([3, -1, 0, 5, 9, -1, 2])
    got, want = _caches((5, 2, Hk, D), cache_dtype), _caches((5, 2, Hk, D), cache_dtype)
    rot = rotary != "none"
    q1 = torch.randn(T, Hq, D).to(dtype) if rotary in ("neox", "gptj") else None
    q2 = None if q1 is None else q1.clone()
    pos = torch.randint(0, 50, (T,)) if rot else None
    cs = rotary_cos_sin(50, min(D, 32)) if rot else None
    inter = rotary == "gptj"
    kv(k, v, got[0], got[1], slots, got[2], got[3], q1, pos, cs, inter)
    reference.kv_cache_append(k, v, want[0], want[1], slots, want[2], want[3], q2, pos, cs, inter)
    for a, b in zip(got, want):
        if a is not None:
            assert bits_equal(a, b)
    if q1 is not None:
        assert bits_equal(q1, q2)


# ---------------------------------------------------------------- decode_attention


def _problem(lens, Hq, Hk, D, dt, bs=None, Sq=1, int8=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, L = len(lens), max(list(lens) + [1])
    k, v = torch.randn(B, L, Hk, D, generator=g), torch.randn(B, L, Hk, D, generator=g)
    q = torch.randn(B, Sq, Hq, D, generator=g).to(dt)
    if Sq == 1:
        q = q[:, 0]
    bt = None
    if bs is None:
        shape = (B, L + 3, Hk, D)
    else:
        nb = [(n + bs - 1) // bs for n in lens]
        perm = torch.randperm(sum(nb) + 2, generator=g)
        bt = torch.full((B, max(nb + [1]) + 1), -1, dtype=torch.int32)
        used = 0
        for b, n in enumerate(nb):
            bt[b, :n] = perm[used:used + n].to(torch.int32)
            used += n
        shape = (sum(nb) + 2, bs, Hk, D)
    if int8:
        kc, vc = torch.full(shape, 99, dtype=torch.int8), torch.full(shape, 99, dtype=torch.int8)
        ks, vs = torch.full(shape[:3], float("nan")), torch.full(shape[:3], float("nan"))
    else:
        kc, vc = torch.full(shape, float("nan"), dtype=dt), torch.full(shape, float("nan"), dtype=dt)
        ks = vs = None
    for b, n in enumerate(lens):
        j = torch.arange(n)
        rows, cols = (torch.full_like(j, b), j) if bs is None else (bt[b].long()[j // bs], j % bs)
        for src, c, s in ((k, kc, ks), (v, vc, vs)):
            x = src[b, :n].to(dt)
            if int8:
                c[rows, cols], s[rows, cols] = reference.quantize_rows_int8(x)
            else:
                c[rows, cols] = x
    return q, kc, vc, torch.tensor(lens, dtype=torch.int32), bt, ks, vs


def _check_decode(emu, args, splits, dt, scale=None, softcap=0.0, window=-1, pipeline=False, mma=False):
    mod = sys.modules["llmkern.ops.decode_attention"]
    old = mod.CUDA_FORCE_SPLITS, mod.CUDA_DECODE_PIPELINE, mod.CUDA_DECODE_MMA
    mod.CUDA_FORCE_SPLITS, mod.CUDA_DECODE_PIPELINE, mod.CUDA_DECODE_MMA = splits, pipeline, mma
    try:
        dec, _ = adapter(emu, "decode_attention")  # (after the switches: the adapter runs on a copy of the globals)
        out = dec(*args, scale, softcap, window)
    finally:
        mod.CUDA_FORCE_SPLITS, mod.CUDA_DECODE_PIPELINE, mod.CUDA_DECODE_MMA = old
    if args[3].numel() and args[0].shape[-1] <= 128:  # (the launcher says which loop ran)
        int8, path = args[1].dtype == torch.int8, dec.__globals__["_last_cuda_path"]
        tc = mma and not int8 and args[1].dtype != torch.float32 and args[0].shape[-1] in (64, 128)
        assert path == ("split_mma" if tc else "split_pipelined" if pipeline and not int8 else "split"), path
    ref = reference.decode_attention(*args, scale, softcap, window)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert rel(out, ref) <= TOL[dt]
    empty = args[3] == 0
    assert bool((out[empty] == 0).all()), "a zero-length sequence gives 0"
    return out


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("bs", [None, 7], ids=lambda b: "contig" if b is None else f"bs{b}")
@pytest.mark.parametrize("heads", [(8, 2, 64), (3, 3, 128), (9, 3, 64), (16, 1, 64)], ids=str)
def test_decode_layouts_heads_splits(emu, heads, bs, splits):
    Hq, Hk, D = heads
    _check_decode(emu, _problem([0, 1, 17, 100], Hq, Hk, D, torch.bfloat16, bs), splits, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_decode_dtypes(emu, dtype):
    _check_decode(emu, _problem([0, 1, 17, 100], 8, 2, 128, dtype, 16), 2, dtype)


@pytest.mark.parametrize("opt", [{}, dict(window=5), dict(window=0), dict(softcap=2.0, scale=0.3)], ids=str)
def test_decode_multi_token_options(emu, opt):
    p = _problem([0, 3, 40], 8, 2, 64, torch.float32, 16, Sq=3)
    _check_decode(emu, p, 2, torch.float32, **opt)
    _check_decode(emu, _problem([1, 17, 60], 8, 2, 64, torch.float32, None), 2, torch.float32, **opt)


@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float32, torch.float16], ids=str)
def test_decode_int8(emu, q_dtype):
    p = _problem([0, 5, 70], 4, 2, 128, q_dtype, 16, int8=True)
    _check_decode(emu, p, 3, q_dtype)
    _check_decode(emu, p, 1, q_dtype, softcap=1.5)


def test_decode_paged_equals_contiguous_bitwise(emu):
    a = _problem([1, 17, 70], 8, 2, 64, torch.bfloat16, None, seed=4)
    b = _problem([1, 17, 70], 8, 2, 64, torch.bfloat16, 5, seed=4)
    assert torch.equal(_check_decode(emu, a, 2, torch.bfloat16), _check_decode(emu, b, 2, torch.bfloat16))


@pytest.mark.parametrize("bs", [1, 2, 3])
@pytest.mark.parametrize("heads", [(8, 2, 64), (4, 2, 128)], ids=str)
def test_decode_blocks_smaller_than_a_warp_step(emu, heads, bs):
    """Block sizes below the keys a warp covers per load (4 keys for D=64, 2 for D=128)."""
    Hq, Hk, D = heads
    _check_decode(emu, _problem([0, 1, 9, 50], Hq, Hk, D, torch.bfloat16, bs), 2, torch.bfloat16)


def test_misaligned_inputs_take_the_scalar_paths(emu):
    """Inputs one element off 16-byte alignment: the kernels must fall back to element accesses (the
    emulator raises on a misaligned vector access, as the GPU would fault)."""
    torch.manual_seed(5)
    kv, _ = adapter(emu, "kv_cache_append")
    k = torch.randn(2 * 3 * 64 + 1).to(torch.bfloat16)[1:].view(2, 3, 64)
    v = torch.randn(2, 3, 64).to(torch.bfloat16)
    got, want = _caches((2, 2, 3, 64), torch.bfloat16), _caches((2, 2, 3, 64), torch.bfloat16)
    q = torch.randn(2 * 4 * 64 + 1).to(torch.bfloat16)[1:].view(2, 4, 64)
    q2 = q.clone()
    pos, cs, slots = torch.tensor([1, 7]), rotary_cos_sin(8, 64), torch.tensor([0, 3])
    for inter in (False, True):
        kv(k, v, got[0], got[1], slots, None, None, q, pos, cs, inter)
        reference.kv_cache_append(k, v, want[0], want[1], slots, None, None, q2, pos, cs, inter)
        assert bits_equal(got[0], want[0]) and bits_equal(got[1], want[1]) and bits_equal(q, q2)
    rms, _ = adapter(emu, "rms_norm")
    x = torch.randn(3 * 64 + 1).to(torch.float16)[1:].view(3, 64)
    w, r = torch.randn(64), torch.randn(3, 64).to(torch.float16)
    y, h = rms(x, w, 1e-5, r)
    ry, rh = reference.rms_norm(x, w, 1e-5, r)
    assert rel(y, ry) <= TOL[torch.float16] and torch.equal(h, rh)
    rot, _ = adapter(emu, "rotary_embedding")
    for inter in (False, True):
        qo, ko = rot(q, k, pos, cs, inter)
        qr, kr = reference.rotary_embedding(q, k, pos, cs, inter)
        assert bits_equal(qo, qr) and bits_equal(ko, kr)


PIPE_CASES = [  # (lens, Hq, Hk, D, dtype, block size, Sq, options)
    ([0, 1, 17, 100], 8, 2, 64, torch.bfloat16, None, 1, {}),       # 4 rows per CTA, contiguous
    ([0, 1, 17, 100], 8, 2, 128, torch.float16, 7, 1, {}),          # blocks shorter than a step
    ([3, 70], 16, 1, 64, torch.bfloat16, 1, 1, {}),                 # 16 rows: 8 per CTA, 1-token blocks
    ([5, 129], 8, 2, 128, torch.float32, 16, 3, dict(window=9)),    # fp32 (4 per lane), Sq > 1, a window
    ([2, 40], 9, 3, 40, torch.bfloat16, 16, 1, dict(softcap=2.0)),  # D < DMAX: idle lanes copy nothing
]


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("case", PIPE_CASES, ids=lambda c: f"H{c[1]}x{c[2]}_D{c[3]}_{str(c[4])[6:]}_bs{c[5]}_Sq{c[6]}")
def test_decode_pipelined_equals_register_loop_bitwise(emu, case, splits):
    """CUDA_DECODE_PIPELINE: the cp.async-pipelined loop feeds the same values (zeros for dead slots) to the
    same math in the same order as the register loop: the same bits, and the reference's values."""
    lens, Hq, Hk, D, dt, bs, Sq, opt = case
    p = _problem(lens, Hq, Hk, D, dt, bs, Sq=Sq, seed=7)
    a = _check_decode(emu, p, splits, dt, **opt)
    b = _check_decode(emu, p, splits, dt, pipeline=True, **opt)
    assert bits_equal(a, b)


MMA_CASES = [  # (lens, Hq, Hk, D, dtype, block size, Sq, options)
    ([0, 1, 17, 100], 8, 2, 64, torch.bfloat16, None, 1, {}),           # 4 of 16 rows, contiguous, part tiles
    ([0, 1, 17, 150], 8, 2, 128, torch.float16, 7, 1, {}),              # blocks shorter than a thread's row step
    ([3, 70], 16, 1, 64, torch.bfloat16, 1, 1, {}),                     # a full 16-row tile, 1-token blocks
    ([5, 129], 8, 2, 128, torch.bfloat16, 16, 3, dict(window=9)),       # Sq > 1 (12 rows of 3 tokens), a window
    ([2, 140], 40, 2, 64, torch.bfloat16, 16, 1, dict(softcap=2.0, scale=0.3)),  # 20 rows: two chunks; softcap
]


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("case", MMA_CASES, ids=lambda c: f"H{c[1]}x{c[2]}_D{c[3]}_{str(c[4])[6:]}_bs{c[5]}_Sq{c[6]}")
def test_decode_mma(emu, case, splits):
    """CUDA_DECODE_MMA: the tensor-core kernel (decode_attention_mma.cuh; caches poisoned with NaN past each
    sequence, outputs and workspace poisoned too) against the reference at the op's tolerance, and close to the
    split kernel (P rounded to 16 bits before P V: not its bits)."""
    lens, Hq, Hk, D, dt, bs, Sq, opt = case
    p = _problem(lens, Hq, Hk, D, dt, bs, Sq=Sq, seed=8)
    a = _check_decode(emu, p, splits, dt, **opt)
    b = _check_decode(emu, p, splits, dt, mma=True, **opt)
    assert rel(a, b) <= TOL[dt]


def test_decode_mma_leaves_other_caches_to_the_split_kernel(emu):
    """fp32 and int8 caches and head dims other than 64 / 128 keep the split kernel with the switch on."""
    _check_decode(emu, _problem([3, 41], 8, 2, 64, torch.float32, 16), 2, torch.float32, mma=True)
    _check_decode(emu, _problem([3, 41], 8, 2, 64, torch.bfloat16, 16, int8=True), 2, torch.bfloat16, mma=True)
    _check_decode(emu, _problem([3, 41], 8, 2, 96, torch.bfloat16, 16), 2, torch.bfloat16, mma=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("D", [32, 40, 80, 96, 136, 256])
def test_decode_other_head_dims(emu, D, dtype):
    """Head dims between the instantiated widths (64, 128, 256): lanes past D idle."""
    if dtype == torch.float32 and D > 128:
        pytest.skip("float32 caches: D <= 128")
    _check_decode(emu, _problem([0, 3, 41], 8, 2, D, dtype, 16), 2, dtype)
    _check_decode(emu, _problem([0, 3, 41], 8, 2, D, dtype, 16, int8=True), 1, dtype)
