"""Decode attention (one new token per sequence over its KV cache) against torch's SDPA.

Group = (model heads / head dim, B sequences, L cached tokens each, dtype). Entries:
- llmkern.<backend>.contiguous: `decode_attention(q [B, Hq, D], k/v cache [B, L, Hk, D], seq_lens [B])`;
- llmkern.<backend>.paged16 / .paged64: the same values in a paged cache [B * L / bs, bs, Hk, D] of
  16- / 64-token blocks scattered by a random block table [B, L / bs] (64: the CPU runtime's default
  block size, `llmkern.nn.paged_kv_cache.default_block_size`; 16: the GPU one);
- llmkern.cuda.contiguous.pipelined / .paged16.pipelined: the CUDA split kernel's cp.async-pipelined loop
  (CUDA_DECODE_PIPELINE; off by default until timed against the register loop);
- llmkern.cuda.contiguous.mma / .paged16.mma / .paged64.mma: the tensor-core decode kernel
  (CUDA_DECODE_MMA, csrc/include/llmkern/cuda/decode_attention_mma.cuh; off by default until timed);
- llmkern.<backend>.int8: an int8 contiguous cache with a float32 scale per (token, head) (half the
  bytes of bf16);
- llmkern.cpu.int8.fp32dot (bf16 / fp16 groups, AVX-512 VNNI and AVX2 CPUs): the same with
  llmkern.ops.decode_attention.CPU_I16_DOT off, fp32 FMAs instead of the default int16 dot products;
- SDPA: `F.scaled_dot_product_attention(q [B, Hq, 1, D], k/v [B, Hk, L, D])`, the cache in SDPA's own
  layout, `enable_gqa` when Hq != Hk. Every sequence has length L (SDPA takes no per-sequence lengths).
- memory.read / memory.read.end (CPU runs): kind "limit", not peers: plain reads of as many bytes as the K / V cache,
  first and last in the group (conftest.py's Bench.memory_read); the report takes the group's
  "% BW" from the best of them and the run's probe.
Caches rotate through copies (LLMKERN_BENCH_COLD, see conftest.py): each call reads its cache from
memory, as each layer's cache is in a real decode step. Every entry's first result is checked against
fp32 SDPA on the same values (for int8: on the dequantized cache).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import _shapes as S
from llmkern import _backends

OP = "decode_attention"
BLOCKS = (16, 64)
LAYOUTS = ("contiguous",) + tuple(f"paged{bs}" for bs in BLOCKS) + ("int8",)
TOL = {"fp32": 1e-4, "bf16": 1e-2, "fp16": 1e-2}


def _flops(c) -> float:
    return 4.0 * c.B * c.Hq * c.L * c.D  # q k^T and p v over L keys


def _items():
    items = []
    for case in S.decode_cases():
        for dt in S.dtypes():
            if S.read_entry_wanted():
                items.append((case, dt, S.READ_ENTRY))
            for b in S.llmkern_backends(OP, _flops(case), 2.0 * case.B * case.L * case.Hk * case.D * 4):
                items += [(case, dt, f"llmkern.{b}.{lay}") for lay in LAYOUTS]
                if b == "cpu" and dt != "fp32" and _backends.cpu_isa() != "scalar":
                    items.append((case, dt, "llmkern.cpu.int8.fp32dot"))
                if b == "cuda" and dt != "fp32":  # the CUDA split kernel's cp.async-pipelined loop; the mma kernel
                    items += [(case, dt, f"llmkern.cuda.{lay}.pipelined") for lay in ("contiguous", "paged16")]
                    items += [(case, dt, f"llmkern.cuda.{lay}.mma") for lay in ("contiguous", "paged16", "paged64")]
            items.append((case, dt, "SDPA"))
            if S.read_entry_wanted():
                items.append((case, dt, S.READ_ENTRY_END))
    return items


# Variant entries: (the module switch that selects the route, the launcher's answer when it ran).
_ROUTES = {"pipelined": ("CUDA_DECODE_PIPELINE", "split_pipelined"), "mma": ("CUDA_DECODE_MMA", "split_mma")}


def _route(switch, path, fn):
    """fn with llmkern.ops.decode_attention.<switch> on during each call, asserting the launcher took `path`."""
    import importlib

    ops_mod = importlib.import_module("llmkern.ops.decode_attention")  # the module, not the function

    def checked(*args, **kwargs):
        out = fn(*args, **kwargs)
        assert ops_mod._last_cuda_path == path, ops_mod._last_cuda_path  # (that route ran)
        return out

    return S.with_switch("decode_attention", switch, checked)


def _sdpa(q, k, v, c):
    """q [B, Hq, 1, D], k/v [B, Hk, L, D] -> [B, Hq, 1, D]."""
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=c.Hq != c.Hk)


def _quant(x):
    """Per (token, head) symmetric int8 of x [..., D]: (q int8 [..., D], scale fp32 [...])."""
    amax = x.float().abs().amax(dim=-1)
    scale = amax / 127.0
    q = torch.round(x.float() / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def _make(c, dtype, device):
    g = torch.Generator().manual_seed(0)
    dt = S.DTYPES[dtype]
    q = torch.randn(c.B, c.Hq, c.D, generator=g).to(dt)
    k = torch.randn(c.B, c.L, c.Hk, c.D, generator=g).to(dt)  # [B, L, Hk, D], llmkern's contiguous cache
    v = torch.randn(c.B, c.L, c.Hk, c.D, generator=g).to(dt)
    d = {"q": q, "k": k, "v": v, "seq_lens": torch.full((c.B,), c.L, dtype=torch.int32)}

    # paged: block j of sequence b stored at block_table[b, j] of a [B * L / bs, bs, Hk, D] pool
    for bs in BLOCKS:
        nb = c.B * c.L // bs
        table = torch.randperm(nb, generator=g).to(torch.int32).view(c.B, c.L // bs)
        for name in ("k", "v"):
            pool = torch.empty(nb, bs, c.Hk, c.D, dtype=dt)
            pool[table.flatten().long()] = d[name].reshape(nb, bs, c.Hk, c.D)  # [B, L/bs] order
            d[f"{name}_paged{bs}"] = pool
        d[f"block_table{bs}"] = table

    for name in ("k", "v"):
        d[name + "_q8"], d[name + "_scale"] = _quant(d[name])

    def ref(kk, vv):  # [B, L, Hk, D] -> fp32 SDPA result [B, Hq, D]
        return _sdpa(q.float()[:, :, None], kk.float().transpose(1, 2), vv.float().transpose(1, 2), c)[:, :, 0]

    d["y"] = ref(k, v)
    d["y_int8"] = ref(d["k_q8"].float() * d["k_scale"][..., None], d["v_q8"].float() * d["v_scale"][..., None])
    return {key: val.to(device) for key, val in d.items()}


@pytest.mark.parametrize("case, dtype, impl", S.params(_items()))
def test_decode_attention(bench, group_cache, case, dtype, impl):
    if impl in (S.READ_ENTRY, S.READ_ENTRY_END):  # the group's own read bandwidth: as many bytes as its K / V cache
        bench.memory_read(impl, op=OP, case=case, dtype=dtype,
                          nbytes=2 * case.B * case.L * case.Hk * case.D * S.ELT[dtype])
        return
    t = group_cache.get((case, dtype), lambda: _make(case, dtype, bench.device))
    c, e = case, S.ELT[dtype]
    q, lens = t["q"], t["seq_lens"]
    kv_elems = 2 * c.B * c.L * c.Hk * c.D  # K and V values read
    io_bytes = 2 * c.B * c.Hq * c.D * e + 4 * c.B  # q in, out, seq_lens
    backend, kind, ref = None, "peer", t["y"]

    if impl.startswith("llmkern."):
        _, backend, layout, *variant = impl.split(".")
        kind = "llmkern"
        from llmkern.ops import decode_attention

        if variant == ["fp32dot"]:  # the CPU's int8 cache in fp32 FMAs (the default takes int16 dot products)
            decode_attention = S.with_switch("decode_attention", "CPU_I16_DOT", decode_attention, value=False)
        elif variant:  # an opt-in CUDA route: its switch on during the call, and the launcher's answer checked
            switch, path = _ROUTES[variant[0]]
            decode_attention = _route(switch, path, decode_attention)

        if layout == "contiguous":
            cache_bytes = kv_elems * e
            nxt = bench.rotating((t["k"], t["v"]), cache_bytes)
            fn = lambda: decode_attention(q, *nxt(), lens, backend=backend)  # noqa: E731
        elif layout.startswith("paged"):
            bs = int(layout[5:])
            table = t[f"block_table{bs}"]
            cache_bytes = kv_elems * e + 4 * table.numel()
            nxt = bench.rotating((t[f"k_paged{bs}"], t[f"v_paged{bs}"]), kv_elems * e)
            fn = lambda: decode_attention(q, *nxt(), lens, block_table=table, backend=backend)  # noqa: E731
        else:  # int8 cache: 1 byte per value + one fp32 scale per (token, head)
            cache_bytes = kv_elems + 2 * c.B * c.L * c.Hk * 4
            nxt = bench.rotating((t["k_q8"], t["v_q8"], t["k_scale"], t["v_scale"]), cache_bytes)

            def fn():
                kc, vc, ks, vs = nxt()
                return decode_attention(q, kc, vc, lens, k_scale=ks, v_scale=vs, backend=backend)

            ref = t["y_int8"]
        check = lambda out: bench.close(out, ref, TOL[dtype])  # noqa: E731
    elif impl == "SDPA":
        cache_bytes = kv_elems * e
        q4 = q[:, :, None]  # [B, Hq, 1, D]
        nxt = bench.rotating((t["k"].transpose(1, 2).contiguous(), t["v"].transpose(1, 2).contiguous()), cache_bytes)
        fn = lambda: _sdpa(q4, *nxt(), c)  # noqa: E731
        check = lambda out: bench.close(out[:, :, 0], ref, TOL[dtype])  # noqa: E731
    else:
        raise AssertionError(impl)

    bench(fn, op=OP, impl=impl, kind=kind, backend=backend, case=case, dtype=dtype,
          nbytes=cache_bytes + io_bytes, flops=_flops(c), check=check)
