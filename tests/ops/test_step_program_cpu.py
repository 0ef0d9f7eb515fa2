"""The pieces of the decode-step program (csrc/cpu/decode_step.cpp): KernelCall (`<op>_call` makes the
same launch as `<op>`, checked when made), StepProgram, and its own small kernels: the embedding
gather, SwiGLU's silu_mul and the KV cache counter advance."""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from _cpu_helpers import C, ISAS, isa, threads  # noqa: F401 (fixtures)
from llmkern import ops
from llmkern.ops.quant import quantize_int4, quantize_int8

# the op modules (llmkern.ops re-exports functions of the same names)
da_mod, i4_mod, i8_mod, kva_mod, rms_mod = (importlib.import_module(f"llmkern.ops.{n}") for n in (
    "decode_attention", "int4_linear", "int8_linear", "kv_cache_append", "rms_norm"))

CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}  # DESIGN.md


def rel(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


# ---------------------------------------------------------------------------------------- silu_mul


def silu_mul(gu, out, isa_name=""):
    """out [M, I] = silu(gu[:, :I]) * gu[:, I:2I] through silu_mul_call (rows at their strides)."""
    M, I = out.shape
    C.silu_mul_call(gu.data_ptr(), CODE[gu.dtype], gu.stride(0), M, I, out.data_ptr(), out.stride(0), isa_name)()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,I", [(1, 1), (1, 7), (3, 17), (2, 100), (1, 1000), (5, 1536)])
def test_silu_mul_matches_reference_and_is_identical_on_every_isa(dtype, M, I):
    g = torch.Generator().manual_seed(M * 1000 + I)
    base = torch.randn(M, 2 * I + 5, generator=g) * 4  # 5 spare columns: rows at a stride > 2I
    base[0, 0] = 30.0
    if I > 2:
        base[0, 1], base[0, 2] = -30.0, 0.0
    gu = base.to(dtype)[:, : 2 * I]
    gate, up = gu[:, :I], gu[:, I:]
    ref = F.silu(gate.double()) * up.double()
    outs = []
    for name in ISAS:
        big = torch.full((M, I + 3), float("nan"), dtype=dtype)  # poisoned, rows at a stride > I
        out = big[:, :I]
        silu_mul(gu, out, name)
        assert torch.isfinite(out).all() and torch.isnan(big[:, I:]).all()  # every element, nothing past a row
        assert rel(out, ref) <= (1e-6 if dtype == torch.float32 else TOL[dtype])  # fp32: a few ulps
        outs.append(out.clone())
    for o in outs[1:]:
        assert torch.equal(o, outs[0])  # one exp implementation: bit-identical across ISAs
    torch_out = F.silu(gate) * up  # torch's own (Sleef exp): within an ulp or two
    assert torch.allclose(outs[0].float(), torch_out.float(), rtol=4e-7 if dtype == torch.float32 else 1e-2, atol=1e-30)


def test_silu_mul_special_values():
    g = torch.tensor([[0.0, -0.0, 1e-30, -200.0, 200.0, float("inf"), float("nan"), 88.5, -88.5, -1.0]])
    gu = torch.cat([g, torch.full_like(g, 2.0)], dim=1)
    for name in ISAS:
        out = torch.full_like(g, 7.0)
        silu_mul(gu, out, name)
        want = F.silu(g.double()) * 2
        assert out[0, 0] == 0 and out[0, 1] == 0 and out[0, 5] == float("inf") and torch.isnan(out[0, 6])
        finite = torch.isfinite(want)
        assert torch.allclose(out[finite].double(), want[finite], rtol=1e-6, atol=1e-35)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_silu_mul_16bit_special_values_identical_on_every_isa(dtype):
    # 19 gate values (a full vector of 16 and a tail, and 2 x 8 + 3 for AVX2) against u = 2 and u = -3:
    # zeros, infinities, NaN, overflow of the product, values whose silu is subnormal, fp16 subnormals
    tiny = 2.0 ** -24 if dtype == torch.float16 else 1e-39
    g = torch.tensor([[0.0, -0.0, tiny, -tiny, 1.0, -1.0, 3.5, -3.5, 60000.0, -60000.0, float("inf"), float("-inf"),
                       float("nan"), 88.5, -88.5, -20.0, 0.3, 7.0, -100.0]]).to(dtype)
    for u in (2.0, -3.0):
        gu = torch.cat([g, torch.full_like(g, u)], dim=1)
        outs = []
        for name in ISAS:
            out = torch.full_like(g, 7.0)
            silu_mul(gu, out, name)
            outs.append(out)
        want = (F.silu(g.float()).to(dtype).float() * u).to(dtype)  # silu rounded to the dtype, then the product
        # (silu(-inf): torch says NaN (-inf / inf), the kernel -inf (exp's clamp); only the ISAs are compared there)
        cmp = g[0] != float("-inf")
        o, w = outs[0][0, cmp], want[0, cmp]
        finite = torch.isfinite(w)
        assert torch.allclose(o[finite].float(), w[finite].float(), rtol=1e-2, atol=1e-30)  # (exp clamp: x < -88)
        assert torch.equal(torch.isnan(o), torch.isnan(w)) and torch.equal(o[torch.isinf(w)], w[torch.isinf(w)])
        for o in outs[1:]:  # bit for bit, NaN included
            assert torch.equal(o.view(torch.int16), outs[0].view(torch.int16)), (dtype, u)


def test_silu_mul_call_checks_its_arguments():
    gu, out = torch.randn(2, 8), torch.empty(2, 4)
    with pytest.raises(ValueError, match="gu_stride"):
        C.silu_mul_call(gu.data_ptr(), 0, 6, 2, 4, out.data_ptr(), 4, "")
    with pytest.raises(ValueError, match="out_stride"):
        C.silu_mul_call(gu.data_ptr(), 0, 8, 2, 4, out.data_ptr(), 3, "")
    with pytest.raises(ValueError, match="dtype"):
        C.silu_mul_call(gu.data_ptr(), 5, 8, 2, 4, out.data_ptr(), 4, "")
    with pytest.raises(ValueError, match="null pointer"):
        C.silu_mul_call(0, 0, 8, 2, 4, out.data_ptr(), 4, "")
    assert C.silu_mul_call(gu.data_ptr(), 0, 8, 0, 4, out.data_ptr(), 4, "").empty  # no rows: nothing to launch


# ---------------------------------------------------------------------- embedding, advance, program


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding_call_gathers_rows_and_checks_ids_each_run(dtype):
    table = torch.randn(11, 6).to(dtype)
    tokens = torch.tensor([3, 0, 10], dtype=torch.int64)
    out = torch.full((3, 6), float("nan"), dtype=dtype)
    call = C.embedding_call(table.data_ptr(), CODE[dtype], 11, 6, tokens.data_ptr(), 3, out.data_ptr())
    call()
    assert torch.equal(out, table[tokens])
    for bad in (11, -1):
        tokens[1] = bad  # ids are read at run time, through the bound pointer
        out.fill_(5.0)
        with pytest.raises(IndexError, match=f"token id {bad} of batch row 1 is out of range"):
            call()
        assert (out == 5.0).all()  # checked before anything is written


def test_advance_call_counts_one_token_per_sequence():
    lens = torch.tensor([0, 4, 7], dtype=torch.int32)
    nxt = torch.stack([lens.long(), torch.arange(3) * 16 + lens.long()])  # [2, B]: positions, slots
    call = C.advance_call(lens.data_ptr(), nxt.data_ptr(), 3)
    call()
    call()
    assert lens.tolist() == [2, 6, 9] and nxt.tolist() == [[2, 6, 9], [2, 22, 41]]


def test_step_program_runs_calls_in_order_and_skips_empty_ones():
    x = torch.zeros(4)
    lens, nxt = torch.zeros(1, dtype=torch.int32), torch.zeros(2, dtype=torch.int64)
    prog = C.StepProgram()
    prog.append(C.advance_call(lens.data_ptr(), nxt.data_ptr(), 1))
    prog.append(C.silu_mul_call(x.data_ptr(), 0, 4, 0, 2, x.data_ptr(), 2, ""))  # empty: skipped
    prog.append(C.advance_call(lens.data_ptr(), nxt.data_ptr(), 1))
    assert len(prog) == 2 and prog.names() == ["advance", "advance"]
    prog.run()
    assert int(lens[0]) == 2 and nxt.tolist() == [2, 2]


# ------------------------------------------------------------- <op>_call: the same launch as <op>


@pytest.mark.parametrize("M", [1, 3])
def test_linear_runner_calls_equal_their_runs(M, isa, threads):  # noqa: F811
    torch.manual_seed(M)
    K, N = 256, 33
    w = torch.randn(N, K)
    q4 = quantize_int4(w, group_size=64)
    q8 = quantize_int8(w, group_size=32)
    runners = [i4_mod._cpu_runner(*q4, torch.randn(N)), i4_mod._cpu_prepare(*q4, None, "w4a16"),
               i4_mod._cpu_prepare(*q4, torch.randn(N), "w4a8"),
               i8_mod._cpu_runner(*q8, torch.randn(N), "w8a16"), i8_mod._cpu_runner(*q8, None, "w8a8")]
    x = torch.randn(M, K + 8)[:, :K]  # rows at a stride > K
    for run in runners:
        want = run(x)
        ws = torch.empty(max(run.workspace_size(M, threads), 1), dtype=torch.uint8)
        out = torch.full((M, N), float("nan"))
        call = run.call(x, out, ws, threads)
        call()
        assert call.name in ("int4_linear", "int4_linear_w4a8", "int8_linear")
        assert torch.equal(out, want)


def test_rms_norm_kv_append_and_decode_attention_calls_equal_the_ops(isa, threads):  # noqa: F811
    torch.manual_seed(0)
    B, H, Hq, Hk, D, S = 2, 40, 6, 2, 32, 24
    x, r, w = torch.randn(B, H), torch.randn(B, H), torch.randn(H)
    y, h = torch.full((B, H), float("nan")), torch.full((B, H), float("nan"))
    rms_mod._cpu_call(x, w, 1e-5, r, y, h, threads)()
    want_y, want_h = ops.rms_norm(x, w, 1e-5, residual=r, backend="cpu")
    assert torch.equal(y, want_y) and torch.equal(h, want_h)

    kc, vc = torch.randn(B, S, Hk, D), torch.randn(B, S, Hk, D)
    lens = torch.tensor([5, 9], dtype=torch.int32)
    pos = lens.long()[:, None].clone()                                   # [B, 1]
    slots = (torch.arange(B) * S)[:, None] + pos                         # [B, 1]
    cos_sin = torch.randn(S, D)
    qkv = torch.randn(B, (Hq + 2 * Hk) * D)
    q, k, v = (t.view(B, 1, -1, D) for t in qkv.split([Hq * D, Hk * D, Hk * D], dim=-1))  # strided views
    kc2, vc2, q2 = kc.clone(), vc.clone(), q.clone()
    kva_mod._cpu_call(k, v, kc, vc, slots, None, None, q, pos, cos_sin, False, threads)()
    ops.kv_cache_append(k, v, kc2, vc2, slots, q=q2, positions=pos, cos_sin_cache=cos_sin, backend="cpu")
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2) and torch.equal(q, q2)

    lens += 1
    q3 = q.view(B, Hq, D)
    ws = torch.empty(C.decode_attention_workspace_size(B, 1, Hq, Hk, D, S, threads), dtype=torch.uint8)
    out = torch.full((B, Hq, D), float("nan"))
    da_mod._cpu_call(q3, kc, vc, lens, None, None, out, ws, threads)()
    assert torch.equal(out, ops.decode_attention(q3, kc, vc, lens, backend="cpu"))


def test_op_calls_check_arguments_when_made():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="x_stride"):
        C.rms_norm_call(x.data_ptr(), 0, 4, 0, 0, 0, x.data_ptr(), 0, x.data_ptr(), 0, 2, 8, 1e-6, 1, "")
    empty = C.rms_norm_call(x.data_ptr(), 0, 8, 0, 0, 0, x.data_ptr(), 0, x.data_ptr(), 0, 0, 8, 1e-6, 1, "")
    assert empty.empty and "empty" in repr(empty)
    k = torch.randn(1, 1, 1, 16)[..., ::2]  # head dim not contiguous: the launch would read a temporary copy
    with pytest.raises(ValueError, match="kv_cache_append call: .* must not need a copy"):
        kva_mod._cpu_call(k, k, torch.zeros(1, 4, 1, 8), torch.zeros(1, 4, 1, 8), torch.zeros(1, 1, dtype=torch.int64),
                          None, None, None, None, None, False, 1)
