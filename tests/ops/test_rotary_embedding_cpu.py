"""rotary_embedding on the "cpu" backend, each ISA pinned: the same bits as the reference (float64 pair
math rounded once, llmkern/cpu/rotary.h), whatever the row path (AVX-512 vector rows or portable),
for every dtype, NeoX and GPT-J pairs, partial rotary, odd head counts and strided inputs."""
import pytest
import torch

import llmkern
from llmkern import reference
from llmkern.ops import rotary_cos_sin, strict

from _cpu_helpers import isa, threads  # noqa: F401 - fixtures

# (leading shape, Hq, Hk, D, R): R < D and R not a multiple of 16 exercise the vector rows' tails
CASES = [((37,), 9, 3, 64, 64), ((2, 5), 4, 1, 80, 40), ((3,), 2, 2, 256, 200), ((70,), 3, 1, 128, 18)]


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_cpu_is_bitwise_the_reference(case, dtype, interleaved, isa, threads):
    lead, Hq, Hk, D, R = case
    g = torch.Generator().manual_seed(sum(lead) + D)
    q = torch.randn(*lead, Hq, 2 * D, generator=g).to(dtype)[..., ::2]  # strided rows: every other value
    k = torch.randn(*lead, Hk, D, generator=g).to(dtype)
    pos = torch.randint(0, 500, lead, generator=g)
    cs = rotary_cos_sin(500, R, base=10000.0)
    with strict():
        qo, ko = llmkern.ops.rotary_embedding(q, k, pos, cs, interleaved, backend="cpu")
    qr, kr = reference.rotary_embedding(q, k, pos, cs, interleaved)
    assert torch.equal(qo, qr) and torch.equal(ko, kr)
