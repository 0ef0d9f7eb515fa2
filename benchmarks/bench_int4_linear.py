"""int4_linear (y = x @ dequant(w)^T, 4-bit groups) against F.linear and torch's int4 weight-only matmul.

Group = (layer shape N x K, rows M, group size G, activation dtype). Entries:
- llmkern.<backend>: `llmkern.ops.int4_linear(x, qweight uint8 [N, K/2], scales, offsets fp32 [N, K/G])`;
- llmkern.cpu.module: the path users run, `llmkern.nn.Int4Linear`'s prepared call (after its first,
  checked call the cpu preparer binds the weights and repacks them into the packed decode layout;
  nbytes counts what the module streams: the packed layout, K/2 + 2 (K/G) E bytes per row, E = 2 with
  fp16-valued scales (the default cases), or the canonical tensors with fp32 ones, see _cases);
- llmkern.cpu.w4a8.module / .w4a8g.module: the same module in mode "w4a8" / "w4a8g" (x quantized to int8
  on the fly, one scale per row / per group; int4 x int8 dot products; weights packed once into the W4A8
  layout, the same bytes per row), checked with W8A8's tolerance (the activation rounding is part of the
  result);
- llmkern.cpu.step: the W4A16 module's prepared kernel bound once as a KernelCall and run as llmkern's
  decode step program runs it (no Python per layer; `_shapes.step_calls`): the kernel and its launch;
  llmkern.cpu.w4a8g.step: the same for the W4A8g module (how `llmkern generate --act-int8` runs its int4 layers);
- llmkern.cuda.module (16-bit x): `llmkern.nn.Int4Linear` on the GPU, its prepared call: the weights repacked
  once into the tensor-core order of csrc/include/llmkern/cuda/int4_linear_packed.cuh, read by the packed decode
  kernel (M <= 16) or the packed GEMM (int4_linear_packed_gemm.cuh); nbytes counts the packed bytes: K/2 per
  row, N padded to 16, plus 2 (K/G) E, E = 2 with fp16-valued scales, else 4;
- llmkern.cuda.sm90 (compute capability 9.0, 16-bit x, M > 16): the op with the sm_90a wgmma GEMM
  (LLMKERN_CUDA_INT4_WGMMA; the op's default there since the first GPU run, so this entry equals llmkern.cuda on
  an H100 / H200 unless LLMKERN_CUDA_INT4_WGMMA=0);
- llmkern.cuda.dequant_cublas / llmkern.cuda.module.dequant_cublas (16-bit x, M > 16): the prefill route of the op /
  of the packed module with CUDA_PREFILL_CUBLAS: the weight (the module: its packed copy) dequantized by a CUDA
  kernel into a temporary [N, K] in x's dtype, then F.linear (cuBLAS); the first GPU run measured the fused GEMMs
  at 0.17-0.33x F.linear at M >= 64, and these entries say what the simple route gives;
- llmkern.cuda.no_splitk / llmkern.cuda.module.no_splitk (16-bit x, 16 < M <= 256): the op / the packed module
  with CUDA_GEMM_SPLITK off: the M > 16 GEMMs on one CTA per output tile, as before split-K (which the default
  entries take where the tiles leave SMs idle, e.g. M = 64);
- F.linear: the float layer, weight [N, K] in the activation dtype;
- torch._weight_int4pack_mm: torch's weight-only int4 kernel on the same values, CPU:
  `_weight_int4pack_mm_for_cpu(x, _convert_weight_to_int4pack_for_cpu(q int32 [N, K], 2), G, sz)`,
  CUDA: `_weight_int4pack_mm(x, _convert_weight_to_int4pack(q packed uint8 [N, K/2], 8), G, sz)`, with
  sz [K/G, N, 2] = (scale, zero) in x's dtype and torch's dequant (q - 8) * scale + zero, i.e.
  zero = offset + 8 * scale for llmkern's q * scale + offset.
- memory.read / memory.read.end (CPU runs, M = 1): kind "limit", not peers: plain reads of as many bytes as the
  packed weights, first and last in the group (conftest.py's Bench.memory_read); the report takes the group's
  "% BW" from the best of them and the run's probe.
test_int4_linear_in_turn (CPU, M = 1, bf16 x; `-k in_turn`): the W4A16 and W4A8g modules and their step kernels,
each timed in turn with torch._weight_int4pack_mm, two calls of each per round (conftest.py's Bench.in_turn), a group
per pair "<group>: <entry> in turn with <peer>"; the median over rounds of the peer's time / the entry's is issue 3's
ratio that this host's drift between entries cannot move (targets.py: the rows "..., in turn").
Every entry's first result is checked against an fp32 F.linear on the dequantized weights.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import _shapes as S

OP = "int4_linear"
PEERS = ("F.linear", "torch._weight_int4pack_mm")
# Entries `llmkern.cuda[.module].<route>`: the cuda adapter's module switch (llmkern/ops/int4_linear.py) and the
# value it is set to during the call, the other entries timing the default.
SWITCHED = {"sm90": ("CUDA_INT4_WGMMA", True), "dequant_cublas": ("CUDA_PREFILL_CUBLAS", True),
            "no_splitk": ("CUDA_GEMM_SPLITK", False)}
TOL = {"fp32": 1e-4, "bf16": 1e-2, "fp16": 1e-2, "w4a8": 3e-2}  # see bench_int8_linear.py


def _cases() -> list[S.Variant]:
    """G=32 (GGUF Q4_0/Q4_1, the default model's format); full runs add G=128 (GPTQ/AWQ) where K allows, GPU
    runs at M = 1 on the Llama shapes (issue 7's 3.5x over bf16 at decode needs G=128's fewer scale bytes:
    G=32 with fp32 scales and offsets reads 0.75 B per weight, at best 2.7x fewer than bf16's 2).

    Scales and offsets: "G32" cases hold fp16 values (stored as fp32), as GGUF Q4_0/Q4_1 imports (the
    default model) do, as torch's packing keeps them (16 bits each) and as `Int4Linear.from_linear` (so
    `quantize_linears`) rounds them; the module then streams its packed layout with fp16 scales. "G32-f32" cases
    hold arbitrary fp32 values, as `quantize_int4` makes them (`from_linear(..., fp16_scales=False)`; the module
    streams 4-byte scales, 20% more bytes at G=32): the Llama-2-7B 4096x4096 M=1 case always, every case in full
    runs. "G32-q4k" cases hold GGUF
    Q4_K's form (scale = d * sc, offset = -(dmin * m), fp16 d / dmin per 256 k, 6-bit sc / m), which the
    CPU module streams factored (4.75 bits per weight): the same cases as "G32-f32", where K / 256 is whole."""
    groups = (32, 128) if S.FULL else (32,)
    out = []
    for c in S.linear_cases():
        for g in groups + ((128,) if S.GPU and not S.FULL and c.M == 1 and c.N * c.K >= 4096 * 4096 else ()):
            if c.K % g:
                continue
            out.append(S.Variant(c, f"G{g}", (("G", g), ("scales", "f16"))))
            if S.FULL or (c.N, c.K, c.M) == (4096, 4096, 1):
                out.append(S.Variant(c, f"G{g}-f32", (("G", g), ("scales", "f32"))))
                if g == 32 and c.K % 256 == 0:
                    out.append(S.Variant(c, f"G{g}-q4k", (("G", g), ("scales", "q4k"))))
    return out


def _items():
    items = []
    for case in _cases():
        c = case.base
        for dt in S.dtypes():
            if S.read_entry_wanted(c.M):
                items.append((case, dt, S.READ_ENTRY))
            for b in S.llmkern_backends(OP, 2.0 * c.M * c.N * c.K, 4.0 * c.N * c.K):
                items.append((case, dt, f"llmkern.{b}"))
                if b == "cuda" and dt != "fp32":
                    items.append((case, dt, "llmkern.cuda.module"))
                if b == "cuda" and dt != "fp32" and c.M > 16 and torch.cuda.is_available() and \
                        torch.cuda.get_device_capability() == (9, 0):
                    items.append((case, dt, "llmkern.cuda.sm90"))
                if b == "cuda" and dt != "fp32" and c.M > 16:
                    items.append((case, dt, "llmkern.cuda.dequant_cublas"))
                    items.append((case, dt, "llmkern.cuda.module.dequant_cublas"))
                if b == "cuda" and dt != "fp32" and 16 < c.M <= 256:
                    items.append((case, dt, "llmkern.cuda.no_splitk"))
                    items.append((case, dt, "llmkern.cuda.module.no_splitk"))
                if b == "cpu":
                    items.append((case, dt, "llmkern.cpu.module"))
                    items.append((case, dt, "llmkern.cpu.step"))
                    items.append((case, dt, "llmkern.cpu.w4a8.module"))
                    items.append((case, dt, "llmkern.cpu.w4a8g.module"))
                    items.append((case, dt, "llmkern.cpu.w4a8g.step"))
            items += [(case, dt, p) for p in PEERS]
            if S.read_entry_wanted(c.M):
                items.append((case, dt, S.READ_ENTRY_END))
    return items


def _make(case: S.Variant, device):
    """Random q in 0..15, packed [N, K/2]; scales/offsets [N, K/G] (fp32 tensors, fp16 values unless the
    case says f32 or q4k); x [M, K]; fp32 result y [M, N]."""
    c, G = case.base, case.shape["G"]
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (c.N, c.K), dtype=torch.uint8, generator=g)  # [N, K]
    qweight = q[:, 0::2] | (q[:, 1::2] << 4)  # [N, K/2]: low nibble even k, high nibble odd k
    scales = torch.rand(c.N, c.K // G, generator=g) * 0.02 + 0.002
    offsets = -scales * (8.0 + torch.randn(c.N, c.K // G, generator=g))  # zero points near the middle
    if case.shape["scales"] == "f16":  # fp16 values, as GGUF's d and m (see _cases)
        scales, offsets = scales.half().float(), offsets.half().float()
    elif case.shape["scales"] == "q4k":  # per 256 k an fp16 d / dmin, per group 6-bit sc / m (the largest 63)
        sb = c.K // 256
        d, dmin = ((torch.rand(c.N, sb, 1, generator=g) * 0.0004 + 3e-5).half().float() for _ in range(2))
        sc, m = (torch.randint(0, 64, (c.N, sb, 8), generator=g).float() for _ in range(2))
        sc[..., 0], m[..., 0] = 63, 63
        scales, offsets = (d * sc).reshape(c.N, -1), (-(dmin * m)).reshape(c.N, -1)
    x = torch.randn(c.M, c.K, generator=g)
    w_deq = q.float() * scales.repeat_interleave(G, 1) + offsets.repeat_interleave(G, 1)  # [N, K]
    d = {"q": q, "qweight": qweight, "scales": scales, "offsets": offsets, "x": x, "w_deq": w_deq}
    d["y"] = F.linear(x, w_deq)  # [M, N]
    return {k: v.to(device) for k, v in d.items()}


def _torch_int4(t, dt, G, device):
    """(packed weight, sz [K/G, N, 2]) in torch's tinygemm convention, or raise RuntimeError."""
    q = t["q"]
    zeros = t["offsets"] + 8.0 * t["scales"]  # (q - 8) * s + z == q * s + offset
    sz = torch.stack([t["scales"].t(), zeros.t()], dim=-1).to(dt).contiguous()  # [K/G, N, 2]
    if device == "cuda":
        packed_u8 = (q[:, 0::2] << 4) | q[:, 1::2]  # [N, K/2]: high nibble even k (torch's CUDA order)
        return torch._convert_weight_to_int4pack(packed_u8.contiguous(), 8), sz
    return torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2), sz


@pytest.mark.parametrize("case, dtype, impl", S.params(_items()))
def test_int4_linear(bench, group_cache, case, dtype, impl):
    t = group_cache.get(case, lambda: _make(case, bench.device))
    c, G = case.base, case.shape["G"]
    if impl in (S.READ_ENTRY, S.READ_ENTRY_END):  # the group's own read bandwidth: as many bytes as its packed weights
        bench.memory_read(impl, op=OP, case=case, dtype=dtype,
                          nbytes=c.N * c.K // 2 + 4 * c.N * (c.K // G))
        return
    bench.entry(_entry(bench, t, case, dtype, impl), op=OP, case=case, dtype=dtype)


# Issue 3's M = 1 ratios against torch's int4 kernel with bf16 x (1.5x asked on the Llama shapes, faster on SmolLM2's)
# timed in turn, round by round (conftest.py: Bench.in_turn): W4A16 (the module users get by default) and W4A8g (the
# fastest entry on the Intel host), each as a module and as the step program runs it.
IN_TURN = tuple((ours, "torch._weight_int4pack_mm") for ours in ("llmkern.cpu.module", "llmkern.cpu.step",
                                                                  "llmkern.cpu.w4a8g.module", "llmkern.cpu.w4a8g.step"))


def _in_turn_items():
    if S.GPU or "bf16" not in S.dtypes() or "cpu" not in S.llmkern_backends(OP, 2.0, 4.0):
        return []
    return [(case, "bf16", S.IN_TURN_SEP.join(p)) for case in _cases() if case.base.M == 1 for p in IN_TURN]


@pytest.mark.parametrize("case, dtype, pair", S.params(_in_turn_items()))
def test_int4_linear_in_turn(bench, group_cache, case, dtype, pair):
    t = group_cache.get(case, lambda: _make(case, bench.device))
    ours, peer = (_entry(bench, t, case, dtype, impl) for impl in pair.split(S.IN_TURN_SEP))
    bench.in_turn(ours, peer, op=OP, case=case, dtype=dtype)


def _entry(bench, t: dict, case: S.Variant, dtype: str, impl: str):
    """Entry `impl` of group (case, dtype) over the group's tensors t (`_make`): its call on rotated copies of the
    weights, and the bytes and FLOPs it counts."""
    dt, e = S.DTYPES[dtype], S.ELT[dtype]
    c, G = case.base, case.shape["G"]
    M, N, K = c.M, c.N, c.K
    if (dtype, "x") not in t:
        t[(dtype, "x")] = t["x"].to(dt)
    x = t[(dtype, "x")]  # [M, K]
    io_bytes = M * K * e + M * N * e
    backend, kind, compute, tol = None, "peer", None, TOL[dtype]

    if impl in ("llmkern.cpu.module", "llmkern.cpu.step", "llmkern.cpu.w4a8.module", "llmkern.cpu.w4a8g.module",
                "llmkern.cpu.w4a8g.step"):
        backend, kind = "cpu", "llmkern"
        from llmkern.nn import Int4Linear

        mode = impl.split(".")[2] if impl.count(".") == 3 else "w4a16"  # .module, .step: w4a16; .w4a8g.step: w4a8g
        if mode != "w4a16":
            compute, tol = "int8", TOL["w4a8"]
        w_bytes = N * K // 2 + 8 * N * (K // G)  # canonical: sizes the rotation like the op entry
        nxt = bench.rotating((t["qweight"], t["scales"], t["offsets"]), w_bytes)
        mods = [Int4Linear.from_quantized(*nxt(), mode=mode) for _ in range(bench.benchmark.extra_info["copies"])]
        for m in mods:
            m(x)  # the first call goes through the op; later calls take the prepared run(x)
        run = mods[0].__dict__["_run"]
        fn_ = None if run is None else run.__defaults__[0]  # Op.prepare's wrapper: run(x, _fn, _name)
        E = getattr(fn_, "packed_e", 0)
        if E:
            w_bytes = N * (K // 2 + 2 * (K // G) * E)
        bench.benchmark.extra_info["packed_e"] = E
        cyc = itertools.cycle(mods).__next__
        fn = lambda: cyc()(x)  # noqa: E731
        if impl.endswith("dequant_cublas"):  # the packed copy dequantized, then cuBLAS
            fn = S.with_switch("int4_linear", "CUDA_PREFILL_CUBLAS", fn)
        if impl.endswith(".step"):
            fn = S.step_calls(mods, x, N, OP)
            if fn is None:
                pytest.skip("the module has no prepared CPU kernel here")
    elif impl in ("llmkern.cuda.module", "llmkern.cuda.module.dequant_cublas", "llmkern.cuda.module.no_splitk"):
        backend, kind = "cuda", "llmkern"
        from llmkern.nn import Int4Linear

        w_bytes = N * K // 2 + 8 * N * (K // G)  # canonical: sizes the rotation like the op entry
        nxt = bench.rotating((t["qweight"], t["scales"], t["offsets"]), w_bytes)
        mods = [Int4Linear.from_quantized(*nxt(), backend="cuda") for _ in range(bench.benchmark.extra_info["copies"])]
        for m in mods:
            m(x)  # the first call goes through the op and prepares (packs); later calls take the prepared run(x)
        packed = getattr(getattr(mods[0]._run, "impl", None), "packed", None)
        if packed is None:
            pytest.skip("the module has no packed CUDA run here (LLMKERN_CUDA_INT4_PACKED=0?)")
        w_bytes = packed[0].numel() + packed[1].numel()
        bench.benchmark.extra_info["packed_e"] = 2 if packed[2] else 4
        cyc = itertools.cycle(mods).__next__
        fn = lambda: cyc()(x)  # noqa: E731
        if impl.split(".")[-1] in SWITCHED:  # the packed module's other prefill routes
            fn = S.with_switch(OP, *SWITCHED[impl.split(".")[-1]], fn)
    elif impl.startswith("llmkern."):
        backend, kind = impl.split(".")[1], "llmkern"
        from llmkern.ops import int4_linear

        w_bytes = N * K // 2 + 8 * N * (K // G)
        nxt = bench.rotating((t["qweight"], t["scales"], t["offsets"]), w_bytes)
        fn = lambda: int4_linear(x, *nxt(), None, backend=backend)  # noqa: E731
        if impl.split(".")[-1] in SWITCHED:  # the op's other CUDA routes
            fn = S.with_switch(OP, *SWITCHED[impl.split(".")[-1]], fn)
    elif impl == "F.linear":
        w_bytes = N * K * e
        nxt = bench.rotating((t["w_deq"].to(dt),), w_bytes)
        fn = lambda: F.linear(x, *nxt())  # noqa: E731
    elif impl == "torch._weight_int4pack_mm":
        w_bytes = N * K // 2 + 2 * e * N * (K // G)
        try:
            packed, sz = _torch_int4(t, dt, G, bench.device)
        except (RuntimeError, NotImplementedError) as err:
            pytest.skip(f"torch int4 packing not available here: {str(err).splitlines()[0][:200]}")
        nxt = bench.rotating((packed, sz), w_bytes)
        mm = torch._weight_int4pack_mm if bench.device == "cuda" else torch._weight_int4pack_mm_for_cpu

        def fn():
            p, s = nxt()
            return mm(x, p, G, s)
    else:
        raise AssertionError(impl)

    return S.Entry(impl, fn, kind, nbytes=w_bytes + io_bytes, flops=2.0 * M * N * K, compute=compute, backend=backend,
                 check=lambda out: bench.close(out, t["y"], tol))
