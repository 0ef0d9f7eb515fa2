"""int8_linear on the "cpu" backend (llmkern._C), every ISA this CPU supports, against naive definitions.

The definitions here are written from the docstrings of llmkern/ops/int8_linear.py and quant.py:
- W8A16: y = x @ (w * scale)^T + bias in float64 (x's bf16/fp16 values are exact in float64).
- W8A8: x rows quantized in fp32 exactly per the rule (amax in fp32, inv = 127 / amax, q = round half
  to even of x * inv), integer dot products per weight group in int64, rescaled in float64.
Besides the tolerance checks, exact checks: quantization read back bit for bit through an identity
weight, bf16/fp16 outputs equal to the fp32 result rounded once, results independent of the thread count.
"""
import zlib

import pytest
import torch

import llmkern
import llmkern._C as C  # not importorskip: the compiled module is part of the build, its absence fails
from llmkern.ops import OPS
from _cpu_helpers import ISAS


DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MODES = ("w8a16", "w8a8")
# (M, N, K, group or 0 for per-channel, bias)
SHAPES = [
    (1, 1, 32, 0, False),
    (2, 3, 96, 32, True),
    (3, 17, 96, 0, True),
    (5, 33, 32, 32, False),
    (17, 257, 96, 32, True),
    (1, 257, 96, 0, False),
    (17, 17, 32, 0, True),   # fewer column chunks than threads: rows are split too
    (5, 3, 256, 128, True),
    (2, 1, 96, 96, False),   # one group given as [N, 1]
    (3, 5, 33, 0, True),     # K = 2 * 16 + 1: one-element vector tails
    (4, 9, 99, 33, False),   # groups that are no multiple of any vector width
    (2, 7, 65, 0, True),
    (3, 5, 80, 16, True),    # small groups (4..32) take their own W8A8 path with AVX-512
    (2, 9, 24, 8, False),
    (1, 4, 20, 4, True),
    (2, 3, 72, 12, True),    # 12 does not divide 64: the general group path
]


@pytest.fixture
def threads():
    saved = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(saved)


def rel_err(out, ref):
    out = out.to(torch.float64)
    return ((out - ref).norm() / ref.norm()).item()


def check_close(out, ref, dtype):
    assert torch.isfinite(out).all(), "non-finite output"  # NaN never passes
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    err = rel_err(out, ref)
    assert err <= tol, f"relative error {err:.3g} > {tol}"


def quant_rows(xf):
    """xf [M, K] float32 (finite) -> (q [M, K] int64, scale [M] float32), the rule, in fp32.

    In a row so tiny that inv = 127 / amax overflows to inf, x * inv is +-inf (clamped to +-127) and
    0 * inf is NaN, taken as 0, exactly as the rule reads (and llmkern/reference/quant.py does).
    """
    amax = xf.abs().amax(dim=1)  # [M]
    inv = torch.div(torch.full_like(amax, 127.0), amax)  # IEEE fp32 division
    inv = torch.where(amax > 0, inv, torch.zeros_like(inv))
    q = torch.round(xf * inv[:, None]).clamp(-127, 127)  # torch.round: half to even
    return torch.nan_to_num(q, nan=0.0).to(torch.int64), torch.div(amax, torch.full_like(amax, 127.0))


def naive(x, w, scale, bias, mode):
    """x [M, K] (any float dtype), w [N, K] int8, scale [N] or [N, G'] -> y [M, N] float64."""
    M, K = x.shape
    N = w.shape[0]
    s = scale.reshape(N, -1).to(torch.float64)  # [N, groups]
    groups = s.shape[1]
    G = K // groups
    if mode == "w8a16":
        wd = (w.to(torch.float64).reshape(N, groups, G) * s[:, :, None]).reshape(N, K)
        y = x.to(torch.float64) @ wd.T
    else:
        q, sx = quant_rows(x.to(torch.float32))
        # [M, groups, G] x [N, groups, G] -> [M, N, groups] exact int64 group sums
        dots = torch.einsum("mgk,ngk->mng", q.reshape(M, groups, G), w.to(torch.int64).reshape(N, groups, G))
        y = (dots.to(torch.float64) * s[None]).sum(-1) * sx.to(torch.float64)[:, None]
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y


def make(M, N, K, group, bias, dtype, gen):
    x = torch.randn(M, K, generator=gen).to(dtype)
    w = torch.randint(-128, 128, (N, K), generator=gen, dtype=torch.int8)  # -128 too: kernels must be exact
    shape = (N,) if group == 0 else (N, K // group)
    scale = torch.rand(shape, generator=gen) * 0.02 + 0.001
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    return x, w, scale, b


def run_cpu(x, w, scale, b, mode):
    with llmkern.ops.strict():
        out = llmkern.ops.int8_linear(x, w, scale, b, mode=mode, backend="cpu")
    assert OPS["int8_linear"].last_backend == "cpu"
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("isa", ISAS)
def test_matches_naive_definition(isa, mode, dtype, monkeypatch, threads):
    monkeypatch.setenv("LLMKERN_CPU_ISA", isa)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{isa}{mode}{dtype}".encode()))
    for nt in (1, 2):
        threads(nt)
        for M, N, K, group, bias in SHAPES:
            x, w, scale, b = make(M, N, K, group, bias, dtype, gen)
            out = run_cpu(x, w, scale, b, mode)
            assert out.shape == (M, N) and out.dtype == dtype
            ref = naive(x, w, scale, None if b is None else b.float(), mode)
            check_close(out, ref, dtype)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("isa", ISAS)
def test_llama_sized_row_and_groups(isa, mode, monkeypatch, threads):
    """K=4096 once per ISA and mode: per-channel and per-group-128 scales, bf16 and fp32, 2 threads."""
    monkeypatch.setenv("LLMKERN_CPU_ISA", isa)
    threads(2)
    gen = torch.Generator().manual_seed(7)
    for dtype, group in ((torch.bfloat16, 0), (torch.float32, 128)):
        x, w, scale, b = make(3, 100, 4096, group, True, dtype, gen)
        check_close(run_cpu(x, w, scale, b, mode), naive(x, w, scale, b.float(), mode), dtype)


@pytest.mark.parametrize("isa", ISAS)
def test_rows_spanning_several_m_tiles(isa, monkeypatch, threads):
    """M = 150 rows with K = 2048: W8A16 converts 64-row tiles (3 tiles), W8A8 works in 128-row tiles."""
    monkeypatch.setenv("LLMKERN_CPU_ISA", isa)
    threads(2)
    gen = torch.Generator().manual_seed(13)
    for mode, dtype, group in (("w8a16", torch.bfloat16, 0), ("w8a16", torch.float16, 64), ("w8a8", torch.bfloat16, 32)):
        x, w, scale, b = make(150, 40, 2048, group, True, dtype, gen)
        check_close(run_cpu(x, w, scale, b, mode), naive(x, w, scale, b.float(), mode), dtype)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("isa", ISAS)
def test_non_contiguous_inputs(isa, mode, monkeypatch, threads):
    monkeypatch.setenv("LLMKERN_CPU_ISA", isa)
    threads(2)
    gen = torch.Generator().manual_seed(11)
    K, N = 96, 33
    _, w, scale, b = make(1, N, K, 32, True, torch.float32, gen)
    big = torch.randn(5, K + 13, generator=gen).to(torch.bfloat16)
    cases = {
        "row stride > K": big[:, :K],
        "offset view": big[:, 7:7 + K],
        "transposed (copied)": torch.randn(K, 4, generator=gen).T,
        "3-d, strided": torch.randn(2, 3, 2 * K, generator=gen).to(torch.float16)[:, :, ::2],
        "rows broadcast (stride 0)": torch.randn(1, K, generator=gen).expand(4, K),
        "3-d batch": torch.randn(2, 3, K, generator=gen),
    }
    for name, x in cases.items():
        out = run_cpu(x, w, scale, b, mode)
        assert out.shape == x.shape[:-1] + (N,), name
        ref = naive(x.reshape(-1, K), w, scale, b, mode).reshape(out.shape)
        check_close(out, ref, x.dtype)


@pytest.mark.parametrize("isa", ISAS)
def test_results_do_not_depend_on_threads_and_low_precision_is_rounded_once(isa, monkeypatch, threads):
    """Each output is one thread's fixed-order sum: bitwise equal for 1 and 2 threads. A bf16/fp16 x gives
    exactly the fp32 result of the same values, rounded once to bf16/fp16; except W8A16 with bf16 x of 16+
    rows on AVX-512 BF16 CPUs (int8_linear_bf16.h: a bf16 GEMM, its sums in another order, grouped weights
    rounded to bf16), which is within bf16 rounding of it."""
    monkeypatch.setenv("LLMKERN_CPU_ISA", isa)
    gen = torch.Generator().manual_seed(3)
    for M in (15, 19):  # below and at the bf16 GEMM's row threshold (16)
        for group in (32, 160):  # grouped, per channel
            for mode in MODES:
                for dtype in (torch.bfloat16, torch.float16):
                    x, w, scale, b = make(M, 130, 160, group, True, dtype, gen)
                    b = b.float()
                    threads(1)
                    one = run_cpu(x, w, scale, b, mode)
                    ref32 = run_cpu(x.float(), w, scale, b, mode)
                    threads(2)
                    two = run_cpu(x, w, scale, b, mode)
                    assert torch.equal(one, two), (M, group, mode, dtype)
                    bf16_gemm = (mode == "w8a16" and dtype == torch.bfloat16 and M >= 16 and isa == "avx512_vnni"
                                 and C.cpu_features()["avx512_bf16"])
                    if bf16_gemm:
                        err = ((one.double() - ref32.double()).norm() / ref32.double().norm()).item()
                        assert 0 < err <= (4e-3 if group == 32 else 2.5e-3), (M, group, err)  # output (+ weight) rounding
                    else:
                        assert torch.equal(one, ref32.to(dtype)), (M, group, mode, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("isa", ISAS)
def test_w8a8_quantization_is_bit_exact(isa, dtype, monkeypatch, threads):
    """With w = identity and scale 1, y[m, n] = q[m, n] * row_scale[m]: the quantization read back exactly.
    Rows: random, exact ties (amax 127 -> inv 1, so x * inv = x.5 rounds half to even), all zero,
    tiny (127 / amax overflows fp32; fp16 subnormals), a NaN row and an inf row (outputs NaN)."""
    monkeypatch.setenv("LLMKERN_CPU_ISA", isa)
    threads(2)
    gen = torch.Generator().manual_seed(5)
    K = 70  # not a multiple of any vector width
    x = torch.randn(8, K, generator=gen) * 3
    ties = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 126.5, -126.5])
    x[1, : ties.numel()] = ties
    x[2] = 0.0
    x[3] = x[3] * 1e-38 if dtype != torch.float16 else x[3] * 1e-5  # tiny within the dtype's range
    x[3, 4] = 0.0
    x[6, 5] = float("nan")
    x[7, 9] = float("inf")
    x = x.to(dtype)
    w = torch.eye(K, dtype=torch.int8)
    out = run_cpu(x, w, torch.ones(K), None, "w8a8")
    q, sx = quant_rows(x[:6].float())
    q_ref, sx_ref = llmkern.ops.quantize_rows_int8(x[:6], backend="reference")  # the project's reference
    assert torch.equal(q, q_ref.to(torch.int64)) and torch.equal(sx, sx_ref)
    assert torch.equal(q[1, 1:7], torch.tensor([0, 2, 2, 0, -2, -2]))  # the definition itself rounds to even
    expect = (q.to(torch.float32) * sx[:, None]).to(dtype)
    assert torch.equal(out[:6], expect)
    assert torch.isnan(out[6:]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("isa", ISAS)
def test_w8a16_identity_is_exact(isa, dtype, monkeypatch):
    """w = identity, scale 1: y = x exactly (the bf16/fp16 -> fp32 -> dtype round trip is exact)."""
    monkeypatch.setenv("LLMKERN_CPU_ISA", isa)
    K = 37
    x = (torch.randn(4, K) * 100).to(dtype)
    assert torch.equal(run_cpu(x, torch.eye(K, dtype=torch.int8), torch.ones(K), None, "w8a16"), x)


# ------------------------------------------------------------------------------ the launcher itself


def launch(x, w, scale, out, *, bias=None, mode="w8a16", ws=None, ws_bytes=None, isa="", threads=2, **over):
    """Call llmkern._C.int8_linear on tensors; `over` replaces any raw argument."""
    M, K = x.shape
    N = w.shape[0]
    group = K if scale.dim() == 1 else K // scale.shape[1]
    need = C.int8_linear_workspace_size(M, K, N, mode)
    if ws is None:
        ws = torch.empty(max(need, 1), dtype=torch.uint8)
    args = dict(
        x_ptr=x.data_ptr(), x_dtype={torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[x.dtype],
        x_row_stride=x.stride(0), M=M, K=K, w_ptr=w.data_ptr(), N=N, scale_ptr=scale.data_ptr(),
        group_size=group, bias_ptr=0 if bias is None else bias.data_ptr(), out_ptr=out.data_ptr(),
        out_row_stride=out.stride(0), mode=mode, ws_ptr=ws.data_ptr(),
        ws_bytes=need if ws_bytes is None else ws_bytes, num_threads=threads, isa=isa,
    )
    args.update(over)
    return C.int8_linear(**args)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("isa", ISAS)
def test_launcher_writes_exactly_the_output(isa, mode):
    """Output poisoned with NaN, written through a row stride > N: every output written, padding untouched."""
    gen = torch.Generator().manual_seed(1)
    x, w, scale, b = make(6, 45, 64, 32, True, torch.float32, gen)
    buf = torch.full((6, 50), float("nan"))
    launch(x, w, scale, buf[:, :45], bias=b, mode=mode, isa=isa)
    check_close(buf[:, :45], naive(x, w, scale, b, mode), torch.float32)
    assert torch.isnan(buf[:, 45:]).all()


def test_launcher_rejects_bad_arguments():
    x = torch.randn(3, 64)
    w = torch.randint(-127, 128, (5, 64), dtype=torch.int8)
    s = torch.rand(5)
    out = torch.empty(3, 5)
    launch(x, w, s, out)  # valid baseline
    bad = [
        (dict(mode="w4a4"), "mode"),
        (dict(x_dtype=3), "x_dtype"),
        (dict(isa="sse9"), "isa"),
        (dict(ws_bytes=0), "workspace"),
        (dict(ws_bytes=C.int8_linear_workspace_size(3, 64, 5, "w8a16") - 1), "workspace"),
        (dict(mode="w8a8", ws_bytes=C.int8_linear_workspace_size(3, 64, 5, "w8a8") - 1), "workspace"),
        (dict(group_size=48), "group_size"),
        (dict(group_size=0), "group_size"),
        (dict(K=0, group_size=1), "K"),
        (dict(M=-1), "M"),
        (dict(N=-2), "N"),
        (dict(num_threads=0), "num_threads"),
        (dict(num_threads=100000), "num_threads"),
        (dict(x_ptr=0), "x_ptr"),
        (dict(w_ptr=0), "w_ptr"),
        (dict(scale_ptr=0), "scale_ptr"),
        (dict(out_ptr=0), "out_ptr"),
        (dict(ws_ptr=0), "ws_ptr"),
        (dict(x_ptr=x.data_ptr() + 2), "x_ptr"),
        (dict(out_row_stride=4), "out_row_stride"),
        (dict(x_row_stride=-1), "x_row_stride"),
    ]
    for over, word in bad:
        with pytest.raises(ValueError, match=word):
            launch(x, w, s, out, **over)
    big_group = 1 << 18
    with pytest.raises(ValueError, match="group_size"):  # W8A8 int32 group sums would not be exact
        launch(x, w, s, out, mode="w8a8", K=big_group, group_size=big_group, ws_bytes=1 << 30)
    with pytest.raises(ValueError, match="mode"):
        C.int8_linear_workspace_size(1, 64, 5, "int8")
    with pytest.raises(ValueError):
        C.int8_linear_workspace_size(1, 0, 5, "w8a16")


def test_launcher_empty_output_is_a_no_op():
    """M = 0 reads and writes nothing: null x/out pointers are accepted, no exception, no crash."""
    x = torch.randn(0, 64)
    w = torch.randint(-127, 128, (5, 64), dtype=torch.int8)
    assert launch(x, w, torch.rand(5), torch.empty(0, 5), x_ptr=0, out_ptr=0) is None


def test_workspace_size():
    for M, K, N in ((1, 32, 1), (17, 96, 257), (1, 4096, 4096), (4096, 4096, 4096)):
        w8a8 = C.int8_linear_workspace_size(M, K, N, "w8a8")
        w8a16 = C.int8_linear_workspace_size(M, K, N, "w8a16")
        assert w8a8 >= M * K + 4 * M  # quantized rows + row scales
        assert w8a16 >= min(M, 4) * K * 4  # at least a few converted fp32 rows
        # a bounded M tile (fp32 rows: ~512 KiB; the bf16 GEMM's packed rows: <= 8 MiB), not all of M
        assert w8a16 <= 9 * 1024 * 1024
        two = C.int8_linear_workspace_size(M, K, N, "w8a16", 2)  # the bf16 GEMM's scratch per thread
        assert two > w8a16 if M >= 16 else two == w8a16


# ------------------------------------------------------------------------------ ISA and CPU features

FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx_vnni")


def test_cpu_features_and_isa():
    feats = C.cpu_features()
    assert tuple(feats) == FEATURES and all(isinstance(v, bool) for v in feats.values())
    best = C.resolve_isa("")
    assert best == ISAS[0] and "scalar" in ISAS
    assert ("avx512_vnni" in ISAS) == all(feats[f] for f in ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx2"))
    assert ("avx2" in ISAS) == all(feats[f] for f in ("avx2", "fma", "f16c"))
    for isa in ISAS:
        assert C.resolve_isa(isa) == isa
    for isa in {"avx512_vnni", "avx2"} - set(ISAS):
        with pytest.raises(ValueError, match="supported"):
            C.resolve_isa(isa)
    with pytest.raises(ValueError, match="scalar"):  # the message lists what is supported
        C.resolve_isa("avx1024")
    try:  # Linux: the kernel's view of cpuid (it also masks what the OS does not enable)
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return
    for name in FEATURES:
        assert feats[name] == (name in flags), name


def test_forced_isa_comes_from_the_environment(monkeypatch):
    from llmkern import _backends

    for isa in ISAS:
        monkeypatch.setenv("LLMKERN_CPU_ISA", isa)
        assert _backends.cpu_isa() == isa
    monkeypatch.setenv("LLMKERN_CPU_ISA", "avx1024")
    with pytest.raises(ValueError):
        _backends.cpu_isa()
