"""kv_cache_append (write new keys/values into the cache by slot) against eager torch.

Group = (model kv heads / head dim, B sequences x S new tokens, dtype, variant). Variants and entries:
- float: `kv_cache_append(k, v, k_cache, v_cache, slot_mapping)` vs `index_copy_` of k and v into the
  caches seen as [slots, Hk, D] (what an eager runtime does);
- int8: quantize-on-write into an int8 cache with a float32 scale per (token, head), vs eager
  amax / round / clamp then `index_copy_` of values and scales;
- rotary: fused rotary (rotate q in place and k before writing, Llama "rotate half") vs eager rotation
  then `index_copy_`.
Cache [B, Smax, Hk, D]; decode writes one token per sequence at position Smax / 2, prefill writes
positions 0..S-1. Each entry's first call is checked: float caches bit-exact, int8 within its
quantization error, rotated values against an fp32 rotation.
"""
from __future__ import annotations

import pytest
import torch

import _shapes as S

OP = "kv_cache_append"
VARIANTS = ("float", "int8", "rotary")
TOL = {"fp32": 1e-5, "bf16": 1e-2, "fp16": 1e-2, "int8": 1e-2}  # int8: half a step of 127 per value


def _items():
    items = []
    for base in S.append_cases():
        for var in VARIANTS:
            case = S.Variant(base, var)
            for dt in S.dtypes():
                for b in S.llmkern_backends(OP, 0.0, 2.0 * base.B * base.S * base.Hk * base.D * 4):
                    items.append((case, dt, f"llmkern.{b}"))
                items.append((case, dt, f"eager.{var}"))
    return items


def _cos_sin(smax: int, d: int) -> torch.Tensor:
    """float32 [Smax, D]: cos | sin of pos * 10000^(-2i/D) (the rotary table the op takes)."""
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = torch.arange(smax, dtype=torch.float64)[:, None] * inv[None, :]  # [Smax, D/2]
    return torch.cat([ang.cos(), ang.sin()], dim=1).float()


def _rope(x, cs):
    """Rotate-half of x [..., H, D] by cs [..., D] (cos | sin of each row's position), fp32 math."""
    d = x.shape[-1] // 2
    cos, sin = cs[..., None, :d], cs[..., None, d:]  # [..., 1, D/2]
    x1, x2 = x[..., :d].float(), x[..., d:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def _quant(x):
    """x [..., D] -> (int8 [..., D], fp32 scale [...]) symmetric per row."""
    scale = x.float().abs().amax(dim=-1) / 127.0
    return torch.round(x.float() / scale[..., None]).clamp(-127, 127).to(torch.int8), scale


def _make(base, dtype, device):
    c = base
    g = torch.Generator().manual_seed(0)
    dt = S.DTYPES[dtype]
    k = torch.randn(c.B, c.S, c.Hk, c.D, generator=g).to(dt)
    v = torch.randn(c.B, c.S, c.Hk, c.D, generator=g).to(dt)
    q = torch.randn(c.B, c.S, c.Hq, c.D, generator=g).to(dt)
    if c.S == 1:  # decode: one token per sequence, in the middle of its cache
        pos = torch.full((c.B, 1), c.Smax // 2, dtype=torch.int64)
    else:  # prefill: positions 0..S-1
        pos = torch.arange(c.S, dtype=torch.int64)[None, :].expand(c.B, c.S).contiguous()
    slots = torch.arange(c.B, dtype=torch.int64)[:, None] * c.Smax + pos  # [B, S]: b * Smax + pos
    cs = _cos_sin(c.Smax, c.D)
    d = {"k": k, "v": v, "q": q, "pos": pos, "slots": slots, "cos_sin": cs}
    d["q_rot"] = _rope(q, cs[pos])  # [B, S, Hq, D]
    d["k_rot"] = _rope(k, cs[pos])
    return {key: val.to(device) for key, val in d.items()}


def _caches(base, dtype, var, device):
    """Fresh zeroed caches (+ scales for int8): the first call's writes are what the check reads."""
    shape = (base.B, base.Smax, base.Hk, base.D)
    if var == "int8":
        return (torch.zeros(shape, dtype=torch.int8, device=device), torch.zeros(shape, dtype=torch.int8, device=device),
                torch.zeros(shape[:3], device=device), torch.zeros(shape[:3], device=device))
    dt = S.DTYPES[dtype]
    return torch.zeros(shape, dtype=dt, device=device), torch.zeros(shape, dtype=dt, device=device)


@pytest.mark.parametrize("case, dtype, impl", S.params(_items()))
def test_kv_cache_append(bench, group_cache, case, dtype, impl):
    base, var = case.base, case.tag
    t = group_cache.get((base, dtype), lambda: _make(base, dtype, bench.device))
    e = S.ELT[dtype]
    T = base.B * base.S  # tokens written
    kv = T * base.Hk * base.D  # values per tensor (k or v)
    k, v, slots, pos, cs = t["k"], t["v"], t["slots"], t["pos"], t["cos_sin"]
    caches = _caches(base, dtype, var, bench.device)
    q = t["q"].clone()  # rotated in place by the rotary variant, call after call
    flat = slots.flatten()  # [T]
    Hk, D = base.Hk, base.D

    nbytes = 2 * kv * e + 8 * T  # read k, v and the slots
    nbytes += 2 * kv * 1 + 2 * T * Hk * 4 if var == "int8" else 2 * kv * e  # write the caches (+ scales)
    if var == "rotary":
        nbytes += 2 * T * base.Hq * D * e + T * D * 4 + 8 * T  # q read + written, cos/sin rows, positions

    backend, kind = None, "peer"
    if impl.startswith("llmkern."):
        backend, kind = impl.split(".")[1], "llmkern"
        from llmkern.ops import kv_cache_append

        if var == "float":
            fn = lambda: kv_cache_append(k, v, *caches, slots, backend=backend)  # noqa: E731
        elif var == "int8":
            kc, vc, ks, vs = caches
            fn = lambda: kv_cache_append(k, v, kc, vc, slots, k_scale=ks, v_scale=vs, backend=backend)  # noqa: E731
        else:
            fn = lambda: kv_cache_append(k, v, *caches, slots, q=q, positions=pos, cos_sin_cache=cs,  # noqa: E731
                                         backend=backend)
    elif var == "float":
        def fn():
            caches[0].view(-1, Hk, D).index_copy_(0, flat, k.reshape(-1, Hk, D))  # [slots, Hk, D] <- [T, Hk, D]
            caches[1].view(-1, Hk, D).index_copy_(0, flat, v.reshape(-1, Hk, D))
    elif var == "int8":
        def fn():
            for src, cache, scale in ((k, caches[0], caches[2]), (v, caches[1], caches[3])):
                qv, s = _quant(src.reshape(-1, Hk, D))  # [T, Hk, D], [T, Hk]
                cache.view(-1, Hk, D).index_copy_(0, flat, qv)
                scale.view(-1, Hk).index_copy_(0, flat, s)
    else:
        def fn():
            rows = cs[pos]  # [B, S, D]
            q.copy_(_rope(q, rows))
            caches[0].view(-1, Hk, D).index_copy_(0, flat, _rope(k, rows).reshape(-1, Hk, D))
            caches[1].view(-1, Hk, D).index_copy_(0, flat, v.reshape(-1, Hk, D))

    def check(_):
        kc = caches[0].view(-1, Hk, D)[flat]  # [T, Hk, D] as written
        vc = caches[1].view(-1, Hk, D)[flat]
        if var == "int8":
            ks, vs = caches[2].view(-1, Hk)[flat], caches[3].view(-1, Hk)[flat]
            bench.close(kc.float() * ks[..., None], k.reshape(-1, Hk, D).float(), TOL["int8"], "k cache")
            bench.close(vc.float() * vs[..., None], v.reshape(-1, Hk, D).float(), TOL["int8"], "v cache")
            return
        k_exp = t["k_rot"] if var == "rotary" else k
        bench.close(vc, v.reshape(-1, Hk, D), 0.0, "v cache (bit-exact)")
        bench.close(kc, k_exp.reshape(-1, Hk, D), 0.0 if var == "float" else TOL[dtype], "k cache")
        if var == "rotary":
            bench.close(q, t["q_rot"], TOL[dtype], "q rotated in place")

    bench(fn, op=OP, impl=impl, kind=kind, backend=backend, case=case, dtype=dtype, nbytes=nbytes, flops=0.0,
          check=check)
