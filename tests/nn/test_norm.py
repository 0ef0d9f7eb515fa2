"""RMSNorm and RotaryEmbedding modules vs naive float64 definitions; dtype conversions; state dicts."""
from __future__ import annotations

import pytest
import torch

from llmkern.nn import RMSNorm, RotaryEmbedding
from nn_testutil import naive_rope, rel_err


def naive_rms(x, w, eps):
    x = x.to(torch.float64)
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.to(torch.float64)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_rms_norm_with_and_without_residual(dtype, tol):
    torch.manual_seed(0)
    m = RMSNorm(257, eps=1e-5, dtype=dtype)
    with torch.no_grad():
        m.weight.normal_()
    x = torch.randn(3, 5, 257, dtype=dtype)
    r = torch.randn(3, 5, 257, dtype=dtype)
    assert rel_err(m(x), naive_rms(x, m.weight, 1e-5)) <= tol
    y, h = m(x, r)
    assert torch.equal(h, x + r)  # the residual stream, rounded to x's dtype like an unfused model
    assert rel_err(y, naive_rms(h, m.weight, 1e-5)) <= tol
    assert set(m.state_dict()) == {"weight"} and "257" in repr(m)


def test_rotary_module_matches_naive_and_keeps_fp32_table():
    torch.manual_seed(1)
    rot = RotaryEmbedding(64, 100, base=500000.0)
    q, k = torch.randn(2, 7, 6, 64), torch.randn(2, 7, 2, 64)
    pos = torch.randint(0, 100, (2, 7))
    qr, kr = rot(q, k, pos)
    assert rel_err(qr, naive_rope(q, pos, 500000.0)) <= 1e-5
    assert rel_err(kr, naive_rope(k, pos, 500000.0)) <= 1e-5
    assert "cos_sin_cache" not in rot.state_dict()  # derived from the arguments, not saved
    rot = rot.to(torch.bfloat16)
    assert rot.cos_sin_cache.dtype == torch.float32
    qb, kb = rot(q.bfloat16(), k.bfloat16(), pos)
    assert qb.dtype == torch.bfloat16 and rel_err(qb, naive_rope(q.bfloat16(), pos, 500000.0)) <= 1e-2
    with pytest.raises(ValueError, match="positions"):
        rot(q, k, torch.full((2, 7), 100))
