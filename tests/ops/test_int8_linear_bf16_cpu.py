"""int8_linear W8A16 with bf16 x of 16+ rows on AVX-512 BF16 CPUs: the bf16 GEMM over dequantized panels
(csrc/include/llmkern/cpu/int8_linear_bf16.h), through the launcher with poisoned outputs.

Shapes cross every edge of its blocking: 16-column vectors and 48-column strips (N tails), K blocks (K > 256,
K = 576 cut in 3 x 192), 8-row micro-kernel blocks (M tails), chunks of rows (K = 16384: 256 rows a chunk),
more threads than column vectors (rows split instead), per-channel and grouped scales, strided x rows.
"""
from __future__ import annotations

import pytest
import torch

import llmkern._C as C
from _cpu_helpers import ISAS, launch_w8a16, reference_w8a16

pytestmark = pytest.mark.skipif(
    "avx512_vnni" not in ISAS or not C.cpu_features()["avx512_bf16"], reason="needs AVX-512 BF16")


def launch(x, w, scale, bias, group, threads):
    """y [M, N] bf16 through llmkern._C.int8_linear (W8A16, AVX-512), into a NaN-poisoned buffer."""
    return launch_w8a16(x, w, scale, bias, group, threads, "avx512_vnni")


reference = reference_w8a16


CASES = [  # M, N, K, group (K: per channel), bias
    (16, 16, 32, 32, False),      # the smallest call the route takes
    (17, 100, 96, 96, True),      # M tail of 1, N tail inside the third strip
    (37, 1000, 576, 576, True),   # K = 576 in 3 blocks of 192
    (64, 576, 576, 32, False),    # GGUF Q8_0 groups
    (40, 70, 1536, 16, True),     # GGUF Q6_K groups of 16: two groups per 32 values of k
    (19, 50, 192, 48, False),     # groups of 48: a group boundary inside every other 32 values of k
    (129, 130, 320, 64, True),    # two K blocks (160 + 160), 130 = 2 strips + 34
    (33, 8, 512, 512, True),      # one column vector narrower than 16: 2 threads split the rows
    (300, 40, 16384, 16384, False),  # two chunks of rows (256 + 44)
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "M{}-N{}-K{}-G{}{}".format(*c[:4], "-bias" if c[4] else ""))
def test_bf16_gemm_matches_reference_and_thread_counts(case):
    M, N, K, group, with_bias = case
    gen = torch.Generator().manual_seed(M * 7 + N)
    xs = torch.randn(M, K + 24, generator=gen).to(torch.bfloat16)
    x = xs[:, 3:K + 3]  # rows at a stride of K + 24 elements, not 64-byte aligned
    w = torch.randint(-128, 128, (N, K), generator=gen, dtype=torch.int8)  # -128 too: a bf16 value
    scale = torch.rand(N, K // group, generator=gen) * 0.02 + 1e-3
    bias = torch.randn(N, generator=gen) if with_bias else None
    assert C.int8_linear_route(M, K, group, "w8a16", 1, "avx512_vnni") == "gemm_bf16"
    one = launch(x, w, scale, bias, group, 1)
    two = launch(x, w, scale, bias, group, 2)
    assert torch.equal(one, two)  # each output is one thread's fixed-order sum
    ref = reference(x, w, scale, bias, group)
    err = ((one.double() - ref).norm() / ref.norm()).item()
    # bf16 output rounding (2^-9, ~1.6e-3 in norm); grouped weights are rounded to bf16 too
    assert torch.isfinite(one).all() and err <= (3e-3 if group == K else 4e-3), err


def test_bf16_gemm_equals_the_op_and_module():
    """The op and Int8Linear route 16+ bf16 rows to the same kernel (same bits as the launcher)."""
    from llmkern import ops
    from llmkern.nn import Int8Linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(576, 200)
    m = Int8Linear.from_linear(lin)
    x = torch.randn(40, 576).to(torch.bfloat16)
    want = launch(x, m.weight, m.weight_scale.reshape(200, -1).contiguous(), m.bias, 576, torch.get_num_threads())
    assert torch.equal(ops.int8_linear(x, m.weight, m.weight_scale, m.bias, "w8a16"), want)
    assert torch.equal(m(x), want) and torch.equal(m(x), want)  # first call (the op) and the prepared one
