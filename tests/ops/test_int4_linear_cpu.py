"""int4_linear on the "cpu" backend (llmkern._C), every ISA this CPU supports, against a naive definition.

The definition here is written from the docstring of llmkern/ops/int4_linear.py: q = nibbles of qweight
(low nibble = even k), w = fp32(q * scale) + offset (two fp32 roundings), y = x @ w^T + bias in float64.
The kernel has two paths (decode for M <= decode_max_rows, prefill above), each per ISA; bf16 x on a CPU
with AVX512-BF16 takes bf16 dot products (prefill on bf16-rounded weights). Tolerances: fp32 1e-5,
bf16/fp16 1e-2 (relative Frobenius error against float64). Besides those: both paths forced on every row
count, bitwise equal results for 1, 2 and 3 threads, outputs written exactly (NaN-poisoned, strided),
and launcher argument checks.
"""
import zlib

import pytest
import torch

import llmkern
import llmkern._C as C  # not importorskip: the compiled module is part of the build, its absence fails
from llmkern.ops import OPS
from _cpu_helpers import ISAS


DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# (M, N, K, G, bias): M on both sides of the decode/prefill switch, odd N, K = 2 or 3 groups, all G
SHAPES = [
    (1, 1, 64, 32, False),
    (2, 3, 96, 32, True),
    (3, 17, 64, 64, True),
    (5, 33, 128, 128, False),
    (8, 257, 96, 32, True),
    (9, 33, 64, 32, False),
    (17, 17, 256, 128, True),   # one panel, two column vectors: one per thread
    (64, 100, 192, 64, False),
    (100, 257, 384, 128, True),
    (3, 49, 416, 32, True),     # K = 3 * 128 + 32: a 32-value tail block
    (100, 49, 320, 64, False),  # K blocks of 160, two panels with a 1-column tail
    (1000, 16, 128, 32, True),  # one column vector: rows split between threads (8-row blocks); 2 M chunks
]


@pytest.fixture
def threads():
    saved = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(saved)


def make_weights(N, K, G, gen):
    """Random canonical int4: every byte value, positive scales, offsets near -8 * scale."""
    qweight = torch.randint(0, 256, (N, K // 2), generator=gen, dtype=torch.uint8)
    scales = torch.rand(N, K // G, generator=gen) * 0.02 + 1e-3
    offsets = -8 * scales + torch.randn(N, K // G, generator=gen) * 0.01
    return qweight, scales, offsets


def dequant(qweight, scales, offsets):
    """float32 [N, K]: q * scale (fp32), then + offset (fp32), as the docstring defines it."""
    p = qweight.to(torch.int64)
    q = torch.stack([p % 16, p // 16], dim=-1).reshape(p.shape[0], -1)  # [N, K/2, 2] -> [N, K], low nibble first
    G = q.shape[1] // scales.shape[1]
    return q.to(torch.float32) * scales.repeat_interleave(G, 1) + offsets.repeat_interleave(G, 1)


def naive(x, qweight, scales, offsets, bias):
    """x [M, K] -> float64 [M, N]."""
    y = x.to(torch.float64) @ dequant(qweight, scales, offsets).to(torch.float64).T
    return y if bias is None else y + bias.to(torch.float64)


def check_close(out, ref, dtype, what=""):
    assert torch.isfinite(out).all(), f"{what}: non-finite output"  # NaN never passes
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    err = ((out.to(torch.float64) - ref).norm() / ref.norm()).item()
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"


def make(M, N, K, G, bias, dtype, gen):
    x = torch.randn(M, K, generator=gen).to(dtype)
    qw, s, o = make_weights(N, K, G, gen)
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    return x, qw, s, o, b


def run_cpu(x, qw, s, o, b):
    with llmkern.ops.strict():
        out = llmkern.ops.int4_linear(x, qw, s, o, b, backend="cpu")
    assert OPS["int4_linear"].last_backend == "cpu"
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("isa", ISAS)
def test_matches_naive_definition(isa, dtype, monkeypatch, threads):
    monkeypatch.setenv("LLMKERN_CPU_ISA", isa)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{isa}{dtype}".encode()))
    for nt in (1, 2):
        threads(nt)
        for M, N, K, G, bias in SHAPES:
            x, qw, s, o, b = make(M, N, K, G, bias, dtype, gen)
            out = run_cpu(x, qw, s, o, b)
            assert out.shape == (M, N) and out.dtype == dtype
            check_close(out, naive(x, qw, s, o, b), dtype, f"M={M} N={N} K={K} G={G} threads={nt}")


# ------------------------------------------------------------------------------ the launcher itself


def launch(x, qw, s, o, out, *, bias=None, ws_bytes=None, isa="", threads=2, decode_max_rows=-1, bf16_dot=True,
           **over):
    """Call llmkern._C.int4_linear on tensors; `over` replaces any raw argument."""
    M, K = x.shape
    N = qw.shape[0]
    need = C.int4_linear_workspace_size(M, K, N, threads, decode_max_rows)
    ws = torch.empty(max(need, 1), dtype=torch.uint8)
    args = dict(
        x_ptr=x.data_ptr(), x_dtype=CODE[x.dtype], x_row_stride=x.stride(0), M=M, K=K, qweight_ptr=qw.data_ptr(),
        N=N, scales_ptr=s.data_ptr(), offsets_ptr=o.data_ptr(), group_size=K // s.shape[1],
        bias_ptr=0 if bias is None else bias.data_ptr(), out_ptr=out.data_ptr(), out_row_stride=out.stride(0),
        ws_ptr=ws.data_ptr(), ws_bytes=need if ws_bytes is None else ws_bytes, num_threads=threads, isa=isa,
        decode_max_rows=decode_max_rows, bf16_dot=bf16_dot,
    )
    args.update(over)
    return C.int4_linear(**args)


def launch_out(x, qw, s, o, bias=None, **kw):
    """Output [M, N] written into a NaN-poisoned buffer of row stride N + 5; checks the padding is untouched."""
    M, N = x.shape[0], qw.shape[0]
    buf = torch.full((M, N + 5), float("nan"), dtype=x.dtype)
    launch(x, qw, s, o, buf[:, :N], bias=bias, **kw)
    assert torch.isnan(buf[:, N:]).all(), "wrote past the output columns"
    return buf[:, :N]


@pytest.mark.parametrize("isa", ISAS)
def test_decode_and_prefill_paths_on_every_row_count(isa):
    """Each path forced (decode_max_rows huge / 0) for M = 1..9 and 17, every route (bf16 dot on and off)."""
    gen = torch.Generator().manual_seed(zlib.crc32(isa.encode()))
    for dtype, bf16_dot in ((torch.float32, True), (torch.bfloat16, True), (torch.bfloat16, False), (torch.float16, True)):
        for M in (1, 2, 3, 4, 5, 6, 7, 8, 9, 17):
            N, K, G = (33, 96, 32) if M % 2 else (50, 256, 64)
            x, qw, s, o, b = make(M, N, K, G, True, dtype, gen)
            b32 = b.float()
            ref = naive(x, qw, s, o, b32)
            for path, dmax in (("decode", 1 << 20), ("prefill", 0)):
                out = launch_out(x, qw, s, o, bias=b32, isa=isa, decode_max_rows=dmax, bf16_dot=bf16_dot)
                check_close(out, ref, dtype, f"{path} M={M} {dtype} bf16_dot={bf16_dot}")


@pytest.mark.parametrize("isa", ISAS)
def test_llama_sized_k_and_m_chunks(isa, monkeypatch, threads):
    """K = 4096 on both paths, 2 threads; M = 150 fp16 rows converted in 128-row chunks (2 chunks)."""
    monkeypatch.setenv("LLMKERN_CPU_ISA", isa)
    threads(2)
    gen = torch.Generator().manual_seed(7)
    for M, dtype, G in ((3, torch.bfloat16, 128), (20, torch.float32, 32), (150, torch.float16, 64)):
        assert work_for_threads(M, 100, 4096, G, 2)
        x, qw, s, o, b = make(M, 100, 4096, G, True, dtype, gen)
        check_close(run_cpu(x, qw, s, o, b), naive(x, qw, s, o, b), dtype, f"M={M} {dtype}")


@pytest.mark.parametrize("isa", ISAS)
def test_non_contiguous_inputs(isa, monkeypatch, threads):
    monkeypatch.setenv("LLMKERN_CPU_ISA", isa)
    threads(2)
    gen = torch.Generator().manual_seed(11)
    K, N, G = 96, 33, 32
    qw, s, o = make_weights(N, K, G, gen)
    b = torch.randn(N, generator=gen)
    big = torch.randn(20, K + 13, generator=gen).to(torch.bfloat16)
    cases = {
        "row stride > K": big[:, :K],
        "offset view (2-byte aligned rows)": big[:, 7:7 + K],
        "offset view, prefill": big[:17, 3:3 + K],
        "transposed (copied)": torch.randn(K, 4, generator=gen).T,
        "3-d, strided": torch.randn(2, 3, 2 * K, generator=gen).to(torch.float16)[:, :, ::2],
        "rows broadcast (stride 0)": torch.randn(1, K, generator=gen).expand(12, K),
        "3-d batch": torch.randn(2, 5, K, generator=gen),
    }
    for name, x in cases.items():
        out = run_cpu(x, qw, s, o, b.to(x.dtype))
        assert out.shape == x.shape[:-1] + (N,), name
        ref = naive(x.reshape(-1, K), qw, s, o, b.to(x.dtype)).reshape(out.shape)
        check_close(out, ref, x.dtype, name)
    # non-contiguous weights are made contiguous by the adapter
    qwt = torch.randint(0, 256, (K // 2, N), generator=gen, dtype=torch.uint8).T
    x = torch.randn(5, K, generator=gen)
    check_close(run_cpu(x, qwt, s, o, None), naive(x, qwt, s, o, None), torch.float32, "qweight view")


def work_for_threads(M, N, K, G, threads):
    """Whether the kernel starts `threads` threads for this shape (small problems run on fewer)."""
    info = C.int4_linear_cpu_info()
    if M <= info["decode_max_rows_f32"]:  # decode on either route
        return N * (K // 2 + 8 * K // G) >= threads * info["decode_min_bytes_per_thread"]
    if M > info["decode_max_rows"]:
        return M * N * K >= threads * info["prefill_min_macs_per_thread"]
    return False


@pytest.mark.parametrize("isa", ISAS)
def test_results_do_not_depend_on_threads(isa):
    """Each output is one thread's fixed-order sum: bitwise equal for 1, 2 and 3 threads, on both paths."""
    gen = torch.Generator().manual_seed(3)
    N, K, G = 400, 1024, 32
    for M, dtype in ((1, torch.bfloat16), (5, torch.float32), (40, torch.bfloat16), (40, torch.float16)):
        assert work_for_threads(M, N, K, G, 3), "shape too small to run on 3 threads"
        x, qw, s, o, b = make(M, N, K, G, True, dtype, gen)
        b32 = b.float()
        outs = [launch_out(x, qw, s, o, bias=b32, isa=isa, threads=nt) for nt in (1, 2, 3)]
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2]), (M, dtype)


@pytest.mark.parametrize("isa", ISAS)
def test_nan_in_x_stays_in_its_row(isa):
    gen = torch.Generator().manual_seed(4)
    for M in (3, 30):  # decode, prefill
        for dtype in DTYPES:
            x, qw, s, o, _ = make(M, 50, 128, 32, False, dtype, gen)
            x[1, 77] = float("nan")
            out = launch_out(x, qw, s, o, isa=isa)
            assert torch.isnan(out[1]).all()
            assert torch.isfinite(out[[0, 2]]).all()


def test_launcher_rejects_bad_arguments():
    gen = torch.Generator().manual_seed(1)
    x, qw, s, o, _ = make(3, 5, 64, 32, False, torch.float32, gen)
    out = torch.empty(3, 5)
    launch(x, qw, s, o, out)  # valid baseline
    need = C.int4_linear_workspace_size(3, 64, 5, 2)
    bad = [
        (dict(x_dtype=3), "x_dtype"),
        (dict(isa="sse9"), "isa"),
        (dict(ws_bytes=0), "workspace"),
        (dict(ws_bytes=need - 1), "workspace"),
        (dict(group_size=16), "group_size"),
        (dict(group_size=48), "group_size"),
        (dict(K=96, group_size=64), "group_size"),
        (dict(K=0), "K"),
        (dict(K=48), "K"),
        (dict(M=-1), "M"),
        (dict(N=-2), "N"),
        (dict(num_threads=0), "num_threads"),
        (dict(num_threads=100000), "num_threads"),
        (dict(decode_max_rows=-2), "decode_max_rows"),
        (dict(x_ptr=0), "x_ptr"),
        (dict(qweight_ptr=0), "qweight_ptr"),
        (dict(scales_ptr=0), "scales_ptr"),
        (dict(offsets_ptr=0), "offsets_ptr"),
        (dict(out_ptr=0), "out_ptr"),
        (dict(ws_ptr=0), "ws_ptr"),
        (dict(x_ptr=x.data_ptr() + 2), "x_ptr"),
        (dict(scales_ptr=s.data_ptr() + 1), "scales_ptr"),
        (dict(bias_ptr=s.data_ptr() + 2), "bias_ptr"),
        (dict(out_row_stride=4), "out_row_stride"),
        (dict(x_row_stride=-1), "x_row_stride"),
    ]
    for over, word in bad:
        with pytest.raises(ValueError, match=word):
            launch(x, qw, s, o, out, **over)
    with pytest.raises(ValueError, match="K"):
        C.int4_linear_workspace_size(1, 40, 5, 2)
    with pytest.raises(ValueError, match="num_threads"):
        C.int4_linear_workspace_size(1, 64, 5, 0)


def test_empty_x_through_the_op():
    qw, s, o = make_weights(5, 64, 32, torch.Generator().manual_seed(2))
    for lead in ((0,), (2, 0)):
        out = run_cpu(torch.randn(*lead, 64), qw, s, o, None)
        assert out.shape == lead + (5,)


def test_launcher_empty_output_is_a_no_op():
    qw, s, o = make_weights(5, 64, 32, torch.Generator().manual_seed(2))
    # M = 0 or N = 0 reads and writes nothing: null pointers are accepted, no exception, no crash.
    assert launch(torch.randn(0, 64), qw, s, o, torch.empty(0, 5), x_ptr=0, out_ptr=0) is None
    assert launch(torch.randn(3, 64), qw[:0], s[:0], o[:0], torch.empty(3, 0), qweight_ptr=0, out_ptr=0) is None


def test_workspace_size():
    for M, K, N in ((1, 64, 1), (17, 96, 257), (1, 4096, 4096), (512, 4096, 11008), (4096, 14336, 4096)):
        for nt in (1, 2):
            ws = C.int4_linear_workspace_size(M, K, N, nt)
            assert ws >= nt * (2 * K // 32 * 4)  # at least each thread's scales and offsets of a strip
            assert ws <= 9 * 1024 * 1024 + nt * (64 * K + 1024 * 1024)  # bounded: an M chunk (<= 8 MiB of rows), not all of M
    assert C.int4_linear_workspace_size(1, 64, 5, 2) < C.int4_linear_workspace_size(1, 64, 5, 3)  # per thread


def test_cpu_info():
    info = C.int4_linear_cpu_info()
    assert info["decode_max_rows"] >= info["decode_max_rows_f32"] >= 1
    for limit in (info["decode_max_rows"], info["decode_max_rows_f32"]):  # SHAPES cover both paths of each route
        assert any(M <= limit for M, *_ in SHAPES) and any(M > limit for M, *_ in SHAPES)
    assert info["bf16_dot"] == (C.cpu_features()["avx512_bf16"] and "avx512_vnni" in ISAS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("isa", ISAS)
def test_prefill_reads_the_canonical_dequantized_weights(isa, dtype, monkeypatch):
    """One-hot rows make each output one dequantized weight: the prefill panels must hold q * scale, then
    + offset, each rounded (dequantize_int4), not a fused multiply-add rounded once (GCC contracts a * b + c
    into an FMA unless kept apart), and not a per-group fold. bf16 x: the weight rounded to bf16 once."""
    from llmkern.reference.quant import dequantize_int4

    monkeypatch.setenv("LLMKERN_CPU_ISA", isa)
    gen = torch.Generator().manual_seed(11)
    N, K, G, M = 64, 1024, 32, 200  # M > 16: the prefill path on every route
    qw = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=gen)
    scales = torch.randn(N, K // G, generator=gen) * 0.1
    offsets = torch.randn(N, K // G, generator=gen) * 0.3
    ks = torch.randperm(K, generator=gen)[:M]
    x = torch.zeros(M, K)
    x[torch.arange(M), ks] = 1.0  # [M, K]: row m picks k = ks[m]
    want = dequantize_int4(qw, scales, offsets)[:, ks].T  # [M, N]: q * s, then + o, in fp32
    y = OPS["int4_linear"](x.to(dtype), qw, scales, offsets, None, backend="cpu")
    assert torch.equal(y, want.to(dtype)), (y.float() != want.to(dtype).float()).sum().item()
