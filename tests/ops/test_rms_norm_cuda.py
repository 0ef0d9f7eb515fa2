"""GPU-only tests of the CUDA rms_norm: model shapes, odd sizes, mixed dtypes, non-contiguous rows, the
fused residual add (h bit-exact), the vector and scalar paths, and CUDA-graph capture."""
import pytest
import torch

import llmkern
from llmkern import reference
from llmkern.ops import OPS, strict

from _attention_helpers import TOL, assert_rel, poisoned_outputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA kernels need a GPU")

DEV = "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def run(x, w, eps, r):
    with strict(), poisoned_outputs():
        res = llmkern.ops.rms_norm(x, w, eps, r, backend="cuda")
    assert OPS["rms_norm"].last_backend == "cuda"
    return res if r is not None else (res, None)


def check(x, w, r, eps=1e-5):
    y, h = run(x, w, eps, r)
    ry, rh = reference.rms_norm(x, w, eps, r)
    assert y.dtype == x.dtype and y.shape == x.shape and y.is_contiguous()
    assert_rel(y, ry, TOL[x.dtype])
    if r is not None:
        assert torch.equal(h, rh), "h = x + residual must be bit-exact"


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 576), (64, 4096), (64, 576), (3, 17, 4096), (1, 1), (7, 3), (1000, 100),
                                   (2, 8200), (5, 1, 257)], ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, dtype, residual):
    torch.manual_seed(0)
    x = torch.randn(*shape, device=DEV).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], device=DEV)).to(dtype)
    r = torch.randn(*shape, device=DEV).to(dtype) if residual else None
    check(x, w, r)


@pytest.mark.parametrize("layout", ["sliced", "transposed", "offset"])
def test_non_contiguous_and_mixed_dtypes(layout):
    torch.manual_seed(1)
    if layout == "sliced":
        x = torch.randn(6, 17, 512, device=DEV).to(torch.bfloat16)[::2, :, :256]
    elif layout == "transposed":
        x = torch.randn(17, 3, 256, device=DEV).to(torch.bfloat16).transpose(0, 1)
    else:  # misaligned rows: the scalar path
        x = torch.randn(3 * 17 * 256 + 1, device=DEV).to(torch.bfloat16)[1:].view(3, 17, 256)
    w = torch.randn(256, device=DEV)  # fp32 weight with bf16 x
    r = torch.randn(3, 17, 256, device=DEV).to(torch.float16)  # residual of another dtype
    check(x, w, r)
    check(x, w.to(torch.bfloat16), None)


def test_empty_rows():
    x = torch.randn(0, 64, device=DEV)
    y, _ = run(x, torch.ones(64, device=DEV), 1e-6, None)
    assert y.shape == (0, 64)


def test_cuda_graph_capture():
    torch.manual_seed(2)
    x = torch.randn(64, 4096, device=DEV).to(torch.bfloat16)
    r = torch.randn(64, 4096, device=DEV).to(torch.bfloat16)
    w = torch.randn(4096, device=DEV).to(torch.bfloat16)
    with strict():
        run(x, w, 1e-5, r)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y, h = llmkern.ops.rms_norm(x, w, 1e-5, r, backend="cuda")
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    ry, rh = reference.rms_norm(x, w, 1e-5, r)
    assert_rel(y, ry, TOL[torch.bfloat16])
    assert torch.equal(h, rh)
