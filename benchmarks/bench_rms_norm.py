"""rms_norm (optionally fused with the residual add) against F.rms_norm and the eager Llama formula.

Group = (M tokens x hidden size, dtype, plain | residual). Entries:
- llmkern.<backend>: `rms_norm(x [M, H], weight [H], eps)`, or with `residual=` (returns y and x + residual);
- F.rms_norm: `torch.nn.functional.rms_norm` (after `x + residual` for the residual variant);
- eager: the Hugging Face Llama formula (fp32 mean of squares, rsqrt, weight in x's dtype).
Every entry's first result is checked against an fp32 computation on the same (dtype-rounded) values.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import _shapes as S

OP = "rms_norm"
EPS = 1e-6
PEERS = ("F.rms_norm", "eager")
TOL = {"fp32": 1e-5, "bf16": 1e-2, "fp16": 1e-2}


def _items():
    items = []
    for base in S.norm_cases():
        for var in ("plain", "residual"):
            case = S.Variant(base, var)
            for dt in S.dtypes():
                items += [(case, dt, f"llmkern.{b}") for b in S.llmkern_backends(OP, 0.0, 8.0 * base.M * base.hidden)]
                items += [(case, dt, p) for p in PEERS]
    return items


def _make(base, dtype, device):
    g = torch.Generator().manual_seed(0)
    dt = S.DTYPES[dtype]
    x = torch.randn(base.M, base.hidden, generator=g).to(dt)  # [M, H]
    r = torch.randn(base.M, base.hidden, generator=g).to(dt)  # [M, H] residual stream
    w = (1.0 + 0.1 * torch.randn(base.hidden, generator=g)).to(dt)  # [H]
    h = x + r  # rounded to dtype, as an unfused model computes it

    def ref(a):  # fp32 normalization of a [M, H]
        a = a.float()
        return a * torch.rsqrt(a.pow(2).mean(dim=-1, keepdim=True) + EPS) * w.float()

    d = {"x": x, "r": r, "w": w, "h": h, "y": ref(x), "y_res": ref(h)}
    return {k: v.to(device) for k, v in d.items()}


def _eager(a, w):
    """Hugging Face LlamaRMSNorm.forward."""
    var = a.float().pow(2).mean(-1, keepdim=True)
    return w * (a.float() * torch.rsqrt(var + EPS)).to(a.dtype)


@pytest.mark.parametrize("case, dtype, impl", S.params(_items()))
def test_rms_norm(bench, group_cache, case, dtype, impl):
    base, residual = case.base, case.tag == "residual"
    t = group_cache.get((base, dtype), lambda: _make(base, dtype, bench.device))
    e = S.ELT[dtype]
    x, r, w = t["x"], t["r"], t["w"]
    n = base.M * base.hidden
    nbytes = 2 * n * e + base.hidden * e + (2 * n * e if residual else 0)  # x in, y out, w; r in, h out
    backend, kind = None, "peer"

    if impl.startswith("llmkern."):
        backend, kind = impl.split(".")[1], "llmkern"
        from llmkern.ops import rms_norm

        if residual:
            fn = lambda: rms_norm(x, w, EPS, residual=r, backend=backend)  # noqa: E731
        else:
            fn = lambda: rms_norm(x, w, EPS, backend=backend)  # noqa: E731
    else:
        norm = (lambda a: F.rms_norm(a, (base.hidden,), w, EPS)) if impl == "F.rms_norm" else (lambda a: _eager(a, w))
        if residual:
            def fn():
                h = x + r
                return norm(h), h
        else:
            fn = lambda: norm(x)  # noqa: E731

    def check(out):
        if residual:
            y, h = out
            bench.close(h, t["h"], 0.0, "x + residual (bit-exact)")
            bench.close(y, t["y_res"], TOL[dtype])
        else:
            bench.close(out, t["y"], TOL[dtype])

    bench(fn, op=OP, impl=impl, kind=kind, backend=backend, case=case, dtype=dtype, nbytes=nbytes, flops=0.0,
          check=check)
