"""int8_linear W8A16 of 16+ rows on AVX-512 and AVX2 with fp32 arithmetic: the fp32 GEMM over dequantized panels
(csrc/include/llmkern/cpu/int8_linear_f32.h, panel_gemm.h), through the launcher with poisoned outputs.

Shapes cross every edge of its blocking:
- 16-column vectors and 48-column strips (AVX2: 8 and 16), with N tails;
- K blocks (K > 128, K = 576 cut in 128 + 4 x 112; AVX2: K > 256);
- 8-row micro-kernel blocks (AVX2: 6), with M tails; chunks of rows (K = 16384: 128 rows a chunk);
- more threads than column vectors (the rows are split instead);
- per-channel and grouped scales (16, 32, 48: a group boundary inside a K block); strided x rows.
fp32 x is read in place; fp16 and bf16 x (AVX2, or AVX-512 without BF16) through converted chunks.
"""
from __future__ import annotations

import pytest
import torch

import llmkern._C as C
from _cpu_helpers import ISAS, launch_w8a16, reference_w8a16

GEMM_ISAS = [i for i in ("avx512_vnni", "avx2") if i in ISAS]  # the ISAs the route has kernels for
pytestmark = pytest.mark.skipif(not GEMM_ISAS, reason="needs AVX-512 or AVX2")

_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def launch(x, w, scale, bias, group, threads, isa="avx512_vnni"):
    """y [M, N] in x's dtype through the launcher, the ISA pinned (AVX-512 unless given)."""
    return launch_w8a16(x, w, scale, bias, group, threads, isa)


reference = reference_w8a16


CASES = [  # M, N, K, group (K: per channel), bias
    (16, 16, 16, 16, False),      # the smallest call the route takes
    (17, 100, 96, 96, True),      # M tail of 1, N tail inside the third strip
    (37, 1000, 576, 576, True),   # K = 576 in blocks of 128 + 4 x 112 (AVX2: 3 x 192); row groups 16 + 16 + 5
    (64, 576, 576, 32, False),    # GGUF Q8_0 / Q5_0 groups
    (40, 70, 1536, 16, True),     # GGUF Q6_K groups of 16; 12 K blocks: K spans of 10 + 2 (AVX2: 6, one span)
    (19, 50, 336, 48, False),     # groups of 48 across blocks of 112 (AVX2: 176 + 160)
    (129, 130, 320, 64, True),    # three K blocks (112 + 112 + 96), 130 = 2 strips + 34
    (33, 8, 512, 512, True),      # one column vector narrower than 16: 2 threads split the rows
    (150, 40, 16384, 16384, False),  # two chunks of rows (128 + 22); 128 K blocks in 13 spans
]


@pytest.mark.parametrize("isa", GEMM_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "M{}-N{}-K{}-G{}{}".format(*c[:4], "-bias" if c[4] else ""))
def test_f32_gemm_matches_reference_and_thread_counts(case, dtype, isa):
    M, N, K, group, with_bias = case
    if dtype == torch.bfloat16 and isa == "avx512_vnni" and C.cpu_features()["avx512_bf16"]:
        pytest.skip("bf16 x takes the bf16 GEMM there (test_int8_linear_bf16_cpu.py)")
    assert C.int8_linear_route(M, K, group, "w8a16", _CODE[dtype], isa) == "gemm_f32"
    gen = torch.Generator().manual_seed(M * 7 + N)
    xs = torch.randn(M, K + 24, generator=gen).to(dtype)
    x = xs[:, 3:K + 3]  # rows at a stride of K + 24 elements, not 64-byte aligned
    w = torch.randint(-128, 128, (N, K), generator=gen, dtype=torch.int8)
    scale = torch.rand(N, K // group, generator=gen) * 0.02 + 1e-3
    bias = torch.randn(N, generator=gen) if with_bias else None
    one = launch(x, w, scale, bias, group, 1, isa)
    two = launch(x, w, scale, bias, group, 2, isa)
    assert torch.equal(one, two)  # each output is one thread's fixed-order sum
    ref = reference(x, w, scale, bias, group)
    err = ((one.double() - ref).abs().max() / ref.abs().max()).item()
    # fp32: one chain of K fp32 additions per output, measured at 0.3-0.6 K^0.5 2^-24 of the largest output
    # (a wrong scale or k gives > 1e-3); fp16 / bf16: the output's rounding (2^-11 / 2^-8 at most)
    tol = {torch.float32: 2 * K ** 0.5 * 2.0 ** -24, torch.float16: 1e-3, torch.bfloat16: 4e-3}[dtype]
    assert torch.isfinite(one).all() and err <= tol, err


@pytest.mark.parametrize("isa", GEMM_ISAS)
def test_f32_gemm_rows_do_not_depend_on_the_batch(isa):
    """A row's output is the same whether it comes with 15 other rows or 200 (one fixed order per output)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(200, 576, generator=gen)
    w = torch.randint(-128, 128, (96, 576), generator=gen, dtype=torch.int8)
    scale = torch.rand(96, 18, generator=gen) * 0.02
    big = launch(x, w, scale, None, 32, 2, isa)
    small = launch(x[40:56], w, scale, None, 32, 2, isa)
    assert torch.equal(big[40:56], small)


@pytest.mark.parametrize("isa", GEMM_ISAS)
def test_f32_gemm_nonfinite_x_propagates(isa):
    """inf / NaN in x reach exactly the outputs of their rows (no other row, no lost NaN)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(24, 64, generator=gen)
    x[5, 7] = float("nan")
    x[9, 0] = float("inf")
    w = torch.randint(1, 128, (20, 64), generator=gen, dtype=torch.int8)  # positive: inf stays inf
    scale = torch.rand(20, 2, generator=gen) + 0.1
    y = launch(x, w, scale, None, 32, 2, isa)
    assert torch.isnan(y[5]).all() and torch.isposinf(y[9]).all()
    keep = [i for i in range(24) if i not in (5, 9)]
    assert torch.isfinite(y[keep]).all()


def test_f32_gemm_equals_the_op_and_module():
    """The op and Int8Linear route 16+ fp32 rows to the same kernel (same bits as the launcher)."""
    if "avx512_vnni" not in ISAS:
        pytest.skip("the op runs the best ISA; the launcher here pins AVX-512")
    from llmkern import ops
    from llmkern.nn import Int8Linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(576, 200)
    m = Int8Linear.from_linear(lin)
    x = torch.randn(40, 576)
    want = launch(x, m.weight, m.weight_scale.reshape(200, -1).contiguous(), m.bias, 576, torch.get_num_threads())
    assert torch.equal(ops.int8_linear(x, m.weight, m.weight_scale, m.bias, "w8a16"), want)
    assert torch.equal(m(x), want) and torch.equal(m(x), want)  # first call (the op) and the prepared one


@pytest.mark.parametrize("M,K,group,dtype,want", [
    (15, 576, 32, 0, "tiles"),    # fewer rows than the route takes: the tiles (decode sizes go to the packed layout)
    (16, 40, 40, 0, "tiles"),     # K not a multiple of 16
    (16, 576, 8, 0, "tiles"),     # groups of 8: 16 values of k span two groups
    (16, 576, 24, 2, "tiles"),    # groups of 24 likewise
    (16, 576, 32, 2, "gemm_f32"),
])
def test_route_choice(M, K, group, dtype, want):
    for isa in GEMM_ISAS:
        assert C.int8_linear_route(M, K, group, "w8a16", dtype, isa) == want
        assert C.int8_linear_route(M, K, group, "w8a8", dtype, isa) == "tiles"  # W8A16 only
    assert C.int8_linear_route(M, K, group, "w8a16", dtype, "scalar") == "tiles"  # AVX-512 and AVX2 only


def test_route_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="mode"):
        C.int8_linear_route(16, 64, 64, "w4a16", 0, "")
    with pytest.raises(ValueError, match="x_dtype"):
        C.int8_linear_route(16, 64, 64, "w8a16", 3, "")
    with pytest.raises(ValueError, match="group_size"):
        C.int8_linear_route(16, 64, 48, "w8a16", 0, "")
    with pytest.raises(ValueError, match="M must"):
        C.int8_linear_route(0, 64, 64, "w8a16", 0, "")
    with pytest.raises(ValueError, match="K must"):
        C.int8_linear_route(16, 2 ** 40, 16, "w8a16", 0, "")
