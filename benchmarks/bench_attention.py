"""Prefill attention (Sq = Sk = S, causal) against torch's scaled_dot_product_attention.

Group = (model heads / head dim, B, S, dtype). Entries:
- llmkern.<backend>: `llmkern.ops.attention(q [B, S, Hq, D], k, v [B, S, Hk, D], causal=...)`;
- llmkern.cuda.sm90 (compute capability 9.0 only): the cuda backend with its sm_90a kernel (TMA + warpgroup
  MMA, LLMKERN_CUDA_ATTN_WGMMA), off by default until a GPU run has checked it; llmkern.cuda.sm90o:
  its intra-warpgroup-overlap variant (LLMKERN_CUDA_ATTN_OVERLAP);
- SDPA: `F.scaled_dot_product_attention` on q [B, Hq, S, D], k/v [B, Hk, S, D] contiguous in its own
  layout, `enable_gqa` when Hq != Hk (torch's fastest path, layout conversion not counted);
- SDPA.bshd-views: the same call on `.transpose(1, 2)` views of llmkern's [B, S, H, D] tensors,
  what a model keeping that layout pays.
Every entry's first result is checked against SDPA in fp32 on the same (dtype-rounded) inputs.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import _shapes as S

OP = "attention"
PEERS = ("SDPA", "SDPA.bshd-views")
TOL = {"fp32": 1e-4, "bf16": 1e-2, "fp16": 1e-2}


def _flops(c) -> float:
    pairs = c.S * (c.S + 1) / 2 if c.causal else c.S * c.S  # (query, key) pairs that are computed
    return 4.0 * c.B * c.Hq * c.D * pairs  # q k^T and p v: 2 flops per multiply-add each


def _items():
    items = []
    for case in S.attention_cases():
        for dt in S.dtypes():
            for b in S.llmkern_backends(OP, _flops(case)):
                items.append((case, dt, f"llmkern.{b}"))
                if b == "cuda" and _sm90() and dt != "fp32":
                    items.append((case, dt, "llmkern.cuda.sm90"))
                    items.append((case, dt, "llmkern.cuda.sm90o"))
            items += [(case, dt, p) for p in PEERS]
    return items


def _sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def _make(case, dtype, device):
    """q [B, S, Hq, D], k/v [B, S, Hk, D] in `dtype`, and the fp32 result [B, S, Hq, D] on those values."""
    c = case
    g = torch.Generator().manual_seed(0)
    dt = S.DTYPES[dtype]
    q = torch.randn(c.B, c.S, c.Hq, c.D, generator=g).to(device, dt)
    k = torch.randn(c.B, c.S, c.Hk, c.D, generator=g).to(device, dt)
    v = torch.randn(c.B, c.S, c.Hk, c.D, generator=g).to(device, dt)
    y = _sdpa(q.float().transpose(1, 2), k.float().transpose(1, 2), v.float().transpose(1, 2), c)
    return {"q": q, "k": k, "v": v, "y": y.transpose(1, 2)}


def _sdpa(q, k, v, c):
    """SDPA in its layout [B, H, S, D]; GQA through enable_gqa (no repeated K/V in memory)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=c.causal, enable_gqa=c.Hq != c.Hk)


@pytest.mark.parametrize("case, dtype, impl", S.params(_items()))
def test_attention(bench, group_cache, case, dtype, impl):
    t = group_cache.get((case, dtype), lambda: _make(case, dtype, bench.device))
    c, e = case, S.ELT[dtype]
    q, k, v = t["q"], t["k"], t["v"]
    nbytes = 2 * c.B * c.S * (c.Hq + c.Hk) * c.D * e  # read q, k, v; write o
    backend, kind = None, "peer"
    check = lambda out: bench.close(out, t["y"], TOL[dtype])  # noqa: E731

    if impl in ("llmkern.cuda.sm90", "llmkern.cuda.sm90o"):
        backend, kind = "cuda", "llmkern"
        import importlib

        mod = importlib.import_module("llmkern.ops.attention")  # the module (llmkern.ops.attention is the function)
        overlap = impl.endswith("o")

        def fn():
            mod._CUDA_WGMMA, mod._CUDA_OVERLAP = True, overlap  # module switches, read per call by the adapter
            try:
                return mod.attention(q, k, v, causal=c.causal, backend="cuda")
            finally:
                mod._CUDA_WGMMA = mod._CUDA_OVERLAP = False

        def check(out):
            assert mod._last_cuda_kernel == "sm90", "the sm_90a kernel did not run"
            return bench.close(out, t["y"], TOL[dtype])
    elif impl.startswith("llmkern."):
        backend, kind = impl.split(".")[1], "llmkern"
        from llmkern.ops import attention

        fn = lambda: attention(q, k, v, causal=c.causal, backend=backend)  # noqa: E731
    elif impl == "SDPA":
        qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # [B, H, S, D]
        fn = lambda: _sdpa(qt, kt, vt, c)  # noqa: E731
        check = lambda out: bench.close(out.transpose(1, 2), t["y"], TOL[dtype])  # noqa: E731
    elif impl == "SDPA.bshd-views":
        fn = lambda: _sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), c)  # noqa: E731
        check = lambda out: bench.close(out.transpose(1, 2), t["y"], TOL[dtype])  # noqa: E731
    else:
        raise AssertionError(impl)

    bench(fn, op=OP, impl=impl, kind=kind, backend=backend, case=case, dtype=dtype, nbytes=nbytes,
          flops=_flops(c), check=check)
