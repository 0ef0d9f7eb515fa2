"""GPU-only tests of the CUDA rotary_embedding: bit-exact against the reference (float64 products,
one rounding), NeoX and GPT-J pairs, partial rotary dims, odd head counts and lengths, non-contiguous
inputs, mixed q/k dtypes and CUDA-graph capture."""
import pytest
import torch

import llmkern
from llmkern import reference
from llmkern.ops import OPS, rotary_cos_sin, strict

from _attention_helpers import poisoned_outputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA kernels need a GPU")

DEV = "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def check(q, k, pos, cs, interleaved):
    with strict(), poisoned_outputs():
        qo, ko = llmkern.ops.rotary_embedding(q, k, pos, cs, interleaved, backend="cuda")
    assert OPS["rotary_embedding"].last_backend == "cuda"
    qr, kr = reference.rotary_embedding(q, k, pos, cs, interleaved)
    assert qo.shape == q.shape and qo.dtype == q.dtype and ko.shape == k.shape and ko.dtype == k.dtype
    assert torch.equal(qo, qr) and torch.equal(ko, kr), "rotary must match the reference bit for bit"


# (leading shape, Hq, Hk, D, R)
CASES = [((64, 1), 32, 8, 128, 128), ((64, 1), 9, 3, 64, 64), ((3, 17), 4, 2, 64, 32), ((1000,), 3, 1, 80, 80),
         ((257,), 5, 5, 65, 64), ((1,), 1, 1, 2, 2), ((2, 100), 8, 8, 256, 128)]


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_bit_exact(case, dtype, interleaved):
    lead, Hq, Hk, D, R = case
    torch.manual_seed(0)
    q = torch.randn(*lead, Hq, D, device=DEV).to(dtype)
    k = torch.randn(*lead, Hk, D, device=DEV).to(dtype)
    pos = torch.randint(0, 4096, lead, device=DEV)
    cs = rotary_cos_sin(4096, R, scaling={"type": "llama3", "factor": 8.0}).to(DEV)
    check(q, k, pos, cs, interleaved)
    check(q, k, pos.to(torch.int32), cs, interleaved)


@pytest.mark.parametrize("interleaved", [False, True])
def test_non_contiguous_and_mixed_dtypes(interleaved):
    torch.manual_seed(1)
    q = torch.randn(5, 17, 12, 128, device=DEV).to(torch.bfloat16)[:, :, ::3]  # head stride 384
    k = torch.randn(17, 5, 2, 128, device=DEV).transpose(0, 1)  # fp32 k, token dims swapped
    pos = torch.randint(0, 100, (5, 17), device=DEV)
    cs = rotary_cos_sin(100, 128).to(DEV)
    check(q, k, pos, cs, interleaved)
    qm = torch.randn(5 * 17 * 4 * 128 + 1, device=DEV).to(torch.float16)[1:].view(5, 17, 4, 128)  # misaligned
    check(qm, k, pos, cs, interleaved)


def test_cuda_graph_capture():
    torch.manual_seed(2)
    q = torch.randn(64, 32, 128, device=DEV).to(torch.bfloat16)
    k = torch.randn(64, 8, 128, device=DEV).to(torch.bfloat16)
    pos = torch.randint(0, 4096, (64,), device=DEV)
    cs = rotary_cos_sin(4096, 128).to(DEV)
    with strict():
        llmkern.ops.rotary_embedding(q, k, pos, cs, False, backend="cuda")
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            qo, ko = llmkern.ops.rotary_embedding(q, k, pos, cs, False, backend="cuda")
    q.copy_(torch.randn_like(q))
    pos.copy_(torch.randint(0, 4096, (64,), device=DEV))
    g.replay()
    torch.cuda.synchronize()
    qr, kr = reference.rotary_embedding(q, k, pos, cs, False)
    assert torch.equal(qo, qr) and torch.equal(ko, kr)
