"""int4_linear's AVX2 decode tiles: the scaled row form (csrc/include/llmkern/cpu/int4_linear_avx2.h).

The AVX2 decode prep multiplies value t of each lane by 16^-t so the tiles can take nibble t as
d & (15 << 4t) = q 16^t: x' q' = x q exactly, so the results must be the bits of the plain form (shift,
then mask). Where a row holds a value 0 < |x| < 2^-102 (x 16^-6 would leave the normal range), every
row of the call takes the plain form. Checked here: a row's output is the same with its call in the
scaled form (alone) and in the plain form (beside a row that forces it), for M = 1..4 rows, every
dtype, canonical and packed layouts; tiny rows against float64 (the fallback is what keeps them right);
special values.
"""
import importlib
import zlib

import pytest
import torch

from _cpu_helpers import ISAS
from test_int4_linear_cpu import check_close, make_weights, naive

I4 = importlib.import_module("llmkern.ops.int4_linear")

pytestmark = pytest.mark.skipif("avx2" not in ISAS, reason="needs AVX2")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TINY = 2.0 ** -110  # below the 2^-102 bound: forces the plain form (a normal fp32 value; fp16 x has none:
# its smallest value is 2^-24, so fp16 rows always take the scaled form, compared here with fp32 rows)


@pytest.fixture(autouse=True)
def avx2(monkeypatch):
    monkeypatch.setenv("LLMKERN_CPU_ISA", "avx2")


def runners(qw, s, o, b):
    """The canonical and the packed (fp16 scales; read by one-row calls) runner of the same weights."""
    s16, o16 = s.half().float(), o.half().float()
    return {"canonical": I4._cpu_runner(qw, s16, o16, b, pack=False),
            "packed": I4._cpu_runner(qw, s16, o16, b, pack=True)}, s16, o16


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("threads", [1, 2])
def test_scaled_form_gives_the_plain_forms_bits(dtype, threads):
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(zlib.crc32(f"{dtype}{threads}".encode()))
        for N, K, G in ((33, 576, 32), (8, 192, 64), (17, 1536, 128), (5, 416, 32)):
            qw, s, o = make_weights(N, K, G, gen)
            b = torch.randn(N, generator=gen).to(dtype)
            runs, s16, o16 = runners(qw, s, o, b)
            for M in (1, 2, 3, 4):
                x = (torch.randn(M, K, generator=gen) * 3).to(dtype)
                # zeros and values near the ends of fp16's range (every dtype holds them)
                x[0, :4] = torch.tensor([0.0, -0.0, 2.0 ** -14, -(2.0 ** 15)]).to(dtype)
                forcing = torch.randn(1, K, generator=gen)
                forcing[0, 7] = TINY
                for name, run in runs.items():
                    scaled = run(x)  # every row passes the bound: the scaled form
                    # The same rows in fp32 (exact) beside a tiny row: the whole call in the plain form,
                    # fp32 outputs rounded to x's dtype as the kernel's store rounds them.
                    plain = run(torch.cat([x.float(), forcing]))[:M].to(dtype)
                    where = f"{name} N={N} K={K} G={G} M={M}"
                    assert torch.equal(scaled, plain), where
                    check_close(scaled, naive(x, qw, s16, o16, b), dtype, where)
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_tiny_rows_stay_accurate(dtype):
    """Rows whose every value is around 1e-37 (x 16^-6 would be subnormal, a few bits): right to the tolerance."""
    gen = torch.Generator().manual_seed(7)
    N, K, G = 40, 256, 32
    qw, s, o = make_weights(N, K, G, gen)
    runs, s16, o16 = runners(qw, s, o, None)
    for M in (1, 3):
        x = (torch.randn(M, K, generator=gen) * 1e-37).to(dtype)
        ref = naive(x, qw, s16, o16, None)
        for name, run in runs.items():
            check_close(run(x), ref, dtype, f"{name} M={M}")


def test_special_values():
    """NaN and inf in x reach the outputs as the plain form computes them (q = 0 times inf is NaN)."""
    gen = torch.Generator().manual_seed(9)
    N, K, G = 16, 128, 32
    qw, s, o = make_weights(N, K, G, gen)
    runs, _, _ = runners(qw, s, o, None)
    x = torch.randn(2, K, generator=gen)
    x[0, 5] = float("nan")
    x[1, 70] = float("inf")
    forcing = torch.randn(1, K, generator=gen)
    forcing[0, 0] = TINY
    for run in runs.values():
        a, b = run(x), run(torch.cat([x, forcing]))[:2]
        assert torch.equal(a.isnan(), b.isnan()) and a.isnan().any()
        assert torch.equal(a.nan_to_num(), b.nan_to_num())
