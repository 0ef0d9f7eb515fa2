"""int8_linear (y = x @ dequant(w)^T) against F.linear, torch._weight_int8pack_mm and torch._int_mm.

Group = (layer shape N x K, rows M, activation dtype; per-channel scales, or "G32": a scale per 32 values of
k, as GGUF Q8_0 / Q5_0 load, on the CPU prefill cases). Entries:
- llmkern.<backend>.w8a16 / .w8a8: `llmkern.ops.int8_linear(x, w int8 [N, K], scale fp32 [N], mode=...)`;
- llmkern.<backend>.<mode>.module: the `llmkern.nn.Int8Linear` module over the same weights, the path
  a model runs (after its first, checked call the module calls the backend's prepared runner: no
  dispatcher, no re-checking of the weights; compare with the op entry for the per-call overhead);
- llmkern.cpu.<mode>.step: that module's prepared kernel bound once as a KernelCall and run as llmkern's
  decode step program runs it (no Python per layer; `_shapes.step_calls`): the kernel and its launch;
- llmkern.cuda.w8a8.sm90 (compute capability 9.0, M > 16): the W8A8 op with the sm_90a GEMM (TMA + wgmma,
  LLMKERN_CUDA_INT8_WGMMA), off by default until a GPU run has checked it;
- llmkern.cuda.w8a16.dequant_cublas (16-bit x, M > 16): W8A16's other prefill route (CUDA_PREFILL_CUBLAS): the
  weight dequantized into a temporary in x's dtype, then F.linear (cuBLAS);
- F.linear: the float layer, weight [N, K] in the activation dtype (what you run without quantization);
- torch._weight_int8pack_mm: torch's W8A16 CPU kernel, (x [M, K], w int8 [N, K], scales [N] in x's dtype);
- torch._int_mm.w8a8: the W8A8 pipeline in eager torch: per-row quantize x, int8 x int8 -> int32 with
  `torch._int_mm(xq [M, K], w^T [K, N])`, rescale by row scale x channel scale.
- memory.read / memory.read.end (CPU runs, M = 1): kind "limit", not peers: plain reads of as many bytes as the
  int8 weights, first and last in the group (conftest.py's Bench.memory_read); the report takes the group's
  "% BW" from the best of them and the run's probe.
test_int8_linear_in_turn (CPU, M = 1, bf16 x; `-k in_turn`): the W8A16 module and the W8A8 step kernel, each timed in
turn with torch._weight_int8pack_mm, two calls of each per round (conftest.py's Bench.in_turn), a group per pair
"<group>: <entry> in turn with <peer>"; the median over rounds of the peer's time / the entry's is issue 3's ratio
that this host's drift between entries cannot move (targets.py: the rows "..., in turn").
Every entry's first result is checked against an fp32 F.linear on the same dequantized weights.
"""
from __future__ import annotations

import importlib
import itertools

import pytest
import torch
import torch.nn.functional as F

import _shapes as S

OP = "int8_linear"
MODES = ("w8a16", "w8a8")
PEERS = ("F.linear", "torch._weight_int8pack_mm", "torch._int_mm.w8a8")
# Sanity tolerances (relative error vs fp32): bf16 rounding of x / w / y is ~3e-3; W8A8's own
# per-row activation quantization adds ~1e-2. The correctness tests live in tests/ops/.
TOL = {"fp32": 1e-4, "bf16": 1e-2, "fp16": 1e-2, "w8a8": 3e-2}


# Grouped weights (a scale per 32 values of k: GGUF Q8_0 / Q5_0 files load so) on the CPU prefill cases.
# torch's int8 peers take per-channel scales only, so these groups have F.linear as their peer.
GROUPED = 32
GROUPED_PEERS = ("F.linear",)


def _cases() -> list:
    """The per-channel cases (plain LinearCase: targets.py names them), then a "G32" variant of each CPU case
    with M > 1 (prefill sizes): llmkern's W8A16 prefill routes are the ones grouped scales change most."""
    cases = list(S.linear_cases(gpu_rows=(1, 1024)))  # GPU: decode, and issue 7's W8A8 M >= 1024
    if not S.GPU:
        cases += [S.Variant(c, f"G{GROUPED}", (("G", GROUPED),)) for c in cases if c.M > 1 and c.K % GROUPED == 0]
    return cases


def _base(case):
    """The LinearCase of a case or of its grouped variant."""
    return getattr(case, "base", case)


def _group(case) -> int:
    """Scale group along K: the variant's G, else K (per channel)."""
    return case.shape.get("G", _base(case).K)


def _items():
    items = []
    for case in _cases():
        c, grouped = _base(case), isinstance(case, S.Variant)
        for dt in S.dtypes():
            if S.read_entry_wanted(c.M):
                items.append((case, dt, S.READ_ENTRY))
            flops = 2.0 * c.M * c.N * c.K
            for b in S.llmkern_backends(OP, flops, 4.0 * c.N * c.K):  # the reference dequantizes to fp32+
                items += [(case, dt, f"llmkern.{b}.{mode}") for mode in MODES]
                if b != "reference":
                    items += [(case, dt, f"llmkern.{b}.{mode}.module") for mode in MODES]
                if b == "cpu":
                    items += [(case, dt, f"llmkern.cpu.{mode}.step") for mode in MODES]
                if b == "cuda" and c.M > 16 and torch.cuda.is_available() and \
                        torch.cuda.get_device_capability() == (9, 0):
                    items.append((case, dt, "llmkern.cuda.w8a8.sm90"))
                if b == "cuda" and c.M > 16 and dt != "fp32":
                    items.append((case, dt, "llmkern.cuda.w8a16.dequant_cublas"))
            items += [(case, dt, p) for p in (GROUPED_PEERS if grouped else PEERS)]
            if S.read_entry_wanted(c.M):
                items.append((case, dt, S.READ_ENTRY_END))
    return items


def _make(case, device):
    """Random int8 weight [N, K], fp32 scale [N] (per channel) or [N, K / G], fp32 x [M, K] and the fp32
    result y [M, N]."""
    c, G = _base(case), _group(case)
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (c.N, c.K), dtype=torch.int8, generator=g)
    # the magnitude of real int8 scales; [N] per channel, else [N, K / G]
    scale = torch.rand(c.N, generator=g) * 0.02 + 0.002 if G == c.K else torch.rand(c.N, c.K // G, generator=g) * 0.02 + 0.002
    x = torch.randn(c.M, c.K, generator=g)
    w_deq = w.float() * scale.reshape(c.N, -1).repeat_interleave(G, 1)  # [N, K] fp32: what the int8 layer stands for
    d = {"w": w, "scale": scale, "x": x, "w_deq": w_deq}
    d["y"] = F.linear(x, w_deq)  # [M, N] fp32 ground truth for the sanity check
    return {k: v.to(device) for k, v in d.items()}


def _derived(t, key, make):
    """Per-dtype tensors of a group, built on first use and kept with the group."""
    if key not in t:
        t[key] = make()
    return t[key]


@pytest.mark.parametrize("case, dtype, impl", S.params(_items()))
def test_int8_linear(bench, group_cache, case, dtype, impl):
    t = group_cache.get(case, lambda: _make(case, bench.device))
    if impl in (S.READ_ENTRY, S.READ_ENTRY_END):  # the group's own read bandwidth: as many bytes as its int8 weights
        c = _base(case)
        bench.memory_read(impl, op=OP, case=case, dtype=dtype, nbytes=c.N * c.K + 4 * t["scale"].numel())
        return
    bench.entry(_entry(bench, t, case, dtype, impl), op=OP, case=case, dtype=dtype)


# Issue 3's M = 1 ratios against torch's int8 kernel with bf16 x (8x asked on the Llama shapes, faster on SmolLM2's),
# timed in turn, round by round (conftest.py: Bench.in_turn): W8A16 (the module users get by default) and W8A8 as the
# step program runs it (the fastest entry on both host types).
IN_TURN = (("llmkern.cpu.w8a16.module", "torch._weight_int8pack_mm"),
           ("llmkern.cpu.w8a8.step", "torch._weight_int8pack_mm"))


def _in_turn_items():
    if S.GPU or "bf16" not in S.dtypes() or "cpu" not in S.llmkern_backends(OP, 2.0, 4.0):
        return []
    return [(case, "bf16", S.IN_TURN_SEP.join(p)) for case in _cases() if _base(case).M == 1 for p in IN_TURN]


@pytest.mark.parametrize("case, dtype, pair", S.params(_in_turn_items()))
def test_int8_linear_in_turn(bench, group_cache, case, dtype, pair):
    t = group_cache.get(case, lambda: _make(case, bench.device))
    ours, peer = (_entry(bench, t, case, dtype, impl) for impl in pair.split(S.IN_TURN_SEP))
    bench.in_turn(ours, peer, op=OP, case=case, dtype=dtype)


def _entry(bench, t: dict, case, dtype: str, impl: str):
    """Entry `impl` of group (case, dtype) over the group's tensors t (`_make`): its call on rotated copies of the
    weights, and the bytes and FLOPs it counts."""
    dt = S.DTYPES[dtype]
    e = S.ELT[dtype]
    M, N, K = _base(case).M, _base(case).N, _base(case).K
    w, scale = t["w"], t["scale"]
    wbytes = N * K + 4 * scale.numel()  # int8 weights and fp32 scales
    x = _derived(t, ("x", dtype), lambda: t["x"].to(dt))  # [M, K]
    io_bytes = M * K * e + M * N * e  # activations in, results out
    flops = 2.0 * M * N * K
    compute, tol = dtype, TOL[dtype]

    if impl in ("llmkern.cuda.w8a8.sm90", "llmkern.cuda.w8a16.dequant_cublas"):
        from llmkern.ops import int8_linear

        nxt = bench.rotating((w, scale), wbytes)
        mode = impl.split(".")[2]
        ops_mod = importlib.import_module("llmkern.ops.int8_linear")  # the module, not the function

        def call():
            out = int8_linear(x, *nxt(), None, mode, backend="cuda")
            if mode == "w8a8":  # the sm_90a kernel ran, not one of the kernels it leaves shapes to
                assert ops_mod._last_cuda_path == "w8a8_wgmma", ops_mod._last_cuda_path
            return out

        fn = S.with_switch("int8_linear", "CUDA_W8A8_WGMMA" if mode == "w8a8" else "CUDA_PREFILL_CUBLAS", call)
        backend, kind = "cuda", "llmkern"
        if mode == "w8a8":
            compute, tol = "int8", TOL["w8a8"]
        nbytes = wbytes + io_bytes
    elif impl.startswith("llmkern."):
        _, backend, mode, *module = impl.split(".")
        from llmkern.nn import Int8Linear
        from llmkern.ops import int8_linear

        nxt = bench.rotating((w, scale), wbytes)
        if module:
            # one module per rotated copy; each one's first call checks its weights and prepares it
            mods = [Int8Linear.from_quantized(*nxt(), mode=mode, backend=backend)
                    for _ in range(bench.benchmark.extra_info["copies"])]
            for m in mods:
                m(x)
            next_mod = itertools.cycle(mods).__next__
            fn = lambda: next_mod()(x)  # noqa: E731
            if module == ["step"]:
                fn = S.step_calls(mods, x, N, OP)
                if fn is None:
                    pytest.skip("the module has no prepared CPU kernel here")
        else:
            fn = lambda: int8_linear(x, *nxt(), None, mode, backend=backend)  # noqa: E731
        nbytes = wbytes + io_bytes
        if mode == "w8a8":
            compute, tol = "int8", TOL["w8a8"]
        kind = "llmkern"
    elif impl == "F.linear":
        wf = _derived(t, ("w_deq", dtype), lambda: t["w_deq"].to(dt))  # [N, K] in the activation dtype
        nxt = bench.rotating((wf,), N * K * e)
        fn = lambda: F.linear(x, *nxt())  # noqa: E731
        nbytes, backend, kind = N * K * e + io_bytes, None, "peer"
    elif impl == "torch._weight_int8pack_mm":
        s_dt = _derived(t, ("scale", dtype), lambda: scale.to(dt))  # [N]: it wants x's dtype
        nxt = bench.rotating((w, s_dt), N * K + N * e)
        fn = lambda: torch._weight_int8pack_mm(x, *nxt())  # noqa: E731
        nbytes, backend, kind = N * K + N * e + io_bytes, None, "peer"
    elif impl == "torch._int_mm.w8a8":
        nxt = bench.rotating((w, scale), wbytes)

        def fn():
            wq, ws = nxt()
            xf = x.float()
            sx = xf.abs().amax(dim=-1, keepdim=True) / 127.0  # [M, 1] row scales
            xq = torch.round(xf / sx).clamp_(-127, 127).to(torch.int8)  # [M, K]
            acc = torch._int_mm(xq, wq.t())  # [M, N] int32; w^T: a [K, N] view of the [N, K] weight
            return (acc.float() * sx * ws).to(dt)

        nbytes, backend, kind = wbytes + io_bytes, None, "peer"
        compute, tol = "int8", TOL["w8a8"]
    else:
        raise AssertionError(impl)

    return S.Entry(impl, fn, kind, nbytes=nbytes, flops=flops, compute=compute, backend=backend,
                   check=lambda out: bench.close(out, t["y"], tol))
