"""Int8Linear / Int4Linear / quantize_linears: quality vs float, exactness vs dequantize-then-matmul,
state-dict round trips, conversions and errors."""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from llmkern import ops
from llmkern.nn import Int4Linear, Int8Linear, quantize_linears
from nn_testutil import rel_err, sqnr_db


def gaussian_linear(K, N, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(K, N, bias=bias)
    with torch.no_grad():
        lin.weight.normal_()
        if bias:
            lin.bias.normal_()
    return lin


def float64_linear(x, w, b):
    """x [..., K] @ w[N, K]^T + b in float64."""
    y = x.to(torch.float64) @ w.to(torch.float64).t()
    return y if b is None else y + b.to(torch.float64)


def noncontig_x(*lead, K, dtype=torch.float32):
    """Random x [*lead, K] that is a non-contiguous view (every other column of a wider tensor)."""
    x = torch.randn(*lead, 2 * K, dtype=dtype)[..., ::2]
    assert not x.is_contiguous()
    return x


# ------------------------------------------------------------------------------------------ quality


@pytest.mark.parametrize("group_size", [0, 32])
def test_int8_from_linear_sqnr(group_size):
    lin = gaussian_linear(160, 100)
    m = Int8Linear.from_linear(lin, group_size=group_size)
    x = torch.randn(3, 17, 160)
    db = sqnr_db(m(x), float64_linear(x, lin.weight, lin.bias))
    assert db > 35.0, db


def test_int4_from_linear_sqnr_g32():
    lin = gaussian_linear(256, 100)
    m = Int4Linear.from_linear(lin, group_size=32)
    x = torch.randn(5, 256)
    db = sqnr_db(m(x), float64_linear(x, lin.weight, lin.bias))
    assert db > 18.0, db


def _groups(t, G):
    """[N, K] -> [N, K / G, G]"""
    return t.reshape(t.shape[0], -1, G)


@pytest.mark.parametrize("group_size,std,seed", [(32, 1.0, 0), (64, 0.02, 1), (128, 0.02, 2)])
def test_int4_from_linear_fp16_scales(group_size, std, seed):
    """from_linear's default: scales and offsets are fp16 values, q is the nearest level for them (the group's min and
    max within 0.04 of a step of levels 0 and 15), and the quality is quantize_int4's fp32 one's (weight SQNR within
    0.01 dB); fp16_scales=False gives quantize_int4's output exactly."""
    lin = gaussian_linear(256, 48, seed=seed)
    with torch.no_grad():
        lin.weight.mul_(std)
    w = lin.weight.detach()
    m = Int4Linear.from_linear(lin, group_size=group_size)
    q32, s32, o32 = ops.quantize_int4(w, group_size)
    for t in (m.scales, m.offsets):
        assert t.dtype == torch.float32 and torch.equal(t, t.to(torch.float16).to(torch.float32))
    assert not torch.equal(m.scales, s32)  # (rounded: Gaussian scales are not fp16 values to begin with)
    s, o = m.scales.unsqueeze(-1), m.offsets.unsqueeze(-1)  # [N, K / G, 1]
    deq = _groups(ops.dequantize_int4(m.qweight, m.scales, m.offsets), group_size)
    err = (_groups(w, group_size) - deq).abs()  # [N, K / G, G]
    assert bool((err <= 0.5 * s * (1 + 1e-5) + 0.04 * s).all()), float((err / s).max())
    q = _groups(ops.unpack_int4(m.qweight).float(), group_size)
    lo, hi = _groups(w, group_size).amin(-1, keepdim=True), _groups(w, group_size).amax(-1, keepdim=True)
    assert torch.equal(torch.round((lo - o) / s), torch.zeros_like(lo)) and bool(((hi - o) / s <= 15.04).all())
    assert q.min() == 0 and q.max() == 15
    db16 = sqnr_db(ops.dequantize_int4(m.qweight, m.scales, m.offsets), w)
    db32 = sqnr_db(ops.dequantize_int4(q32, s32, o32), w)
    assert abs(db16 - db32) < 0.01, (db16, db32)
    exact = Int4Linear.from_linear(lin, group_size=group_size, fp16_scales=False)
    for a, b in zip((exact.qweight, exact.scales, exact.offsets), (q32, s32, o32)):
        assert torch.equal(a, b)


def test_int4_from_linear_on_meta():
    """A meta Linear (shapes only, as a model is built before its weights load) converts as before."""
    m = Int4Linear.from_linear(nn.Linear(64, 8, device="meta"))
    assert m.qweight.device.type == "meta" and m.qweight.shape == (8, 32) and m.scales.shape == (8, 2)


@pytest.mark.parametrize("case", ["tiny", "offset"])
def test_int4_from_linear_keeps_fp32_scales_fp16_cannot_hold(case):
    """A weight whose scales fall below fp16's normal range, or whose offsets are large against their group's spread
    (fp16 rounding would move them by more than 1/32 of a step), keeps quantize_int4's fp32 values."""
    lin = gaussian_linear(64, 8, seed=3)
    with torch.no_grad():
        if case == "tiny":
            lin.weight.mul_(1e-6)  # scales ~5e-7: fp16 subnormals
        else:
            lin.weight.mul_(1e-3).add_(5.0)  # offsets ~5, steps ~4e-4: fp16's spacing at 5 is 2^-8
    m = Int4Linear.from_linear(lin)
    for a, b in zip((m.qweight, m.scales, m.offsets), ops.quantize_int4(lin.weight.detach(), 32)):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------ exactness of the kernel


@pytest.mark.parametrize("group_size,bias", [(0, True), (0, False), (32, True)])
def test_int8_matches_dequantize_then_linear_fp32(group_size, bias):
    lin = gaussian_linear(96, 33, bias=bias, seed=1)
    m = Int8Linear.from_linear(lin, group_size=group_size)
    x = noncontig_x(2, 3, 17, K=96)
    w = ops.dequantize_int8(m.weight, m.weight_scale)
    out = m(x)
    assert out.shape == (2, 3, 17, 33) and out.dtype == torch.float32
    assert rel_err(out, float64_linear(x, w, m.bias)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int8_half_precision_activations(dtype):
    lin = gaussian_linear(64, 257, seed=2)
    m = Int8Linear.from_linear(lin).to(dtype)
    assert m.weight_scale.dtype == torch.float32 and m.bias.dtype == dtype  # scales never converted
    x = torch.randn(3, 64, dtype=dtype)
    out = m(x)
    assert out.dtype == dtype
    w = ops.dequantize_int8(m.weight, m.weight_scale)
    assert rel_err(out, float64_linear(x, w, m.bias)) <= 1e-2


@pytest.mark.parametrize("group_size", [0, 32])
def test_int8_w8a8_matches_integer_math(group_size):
    lin = gaussian_linear(64, 17, seed=3)
    m = Int8Linear.from_linear(lin, mode="w8a8", group_size=group_size)
    x = torch.randn(5, 64)
    # Naive definition: int8 rows of x times int8 weights, exact integer sums per group in float64.
    qx, sx = ops.quantize_rows_int8(x)
    g = m.weight_scale.reshape(17, -1).shape[1]
    xg = qx.to(torch.float64).reshape(5, g, -1)                 # [M, g, G]
    wg = m.weight.to(torch.float64).reshape(17, g, -1)          # [N, g, G]
    acc = torch.einsum("mgk,ngk->mng", xg, wg)                  # [M, N, g] integer sums
    ref = (acc * m.weight_scale.to(torch.float64).reshape(1, 17, g)).sum(-1) * sx.to(torch.float64)[:, None]
    ref = ref + m.bias.to(torch.float64)
    assert rel_err(m(x), ref) <= 1e-5
    # and W8A8 still approximates the float layer
    assert sqnr_db(m(x), float64_linear(x, lin.weight, lin.bias)) > 30.0


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_matches_dequantize_then_linear_fp32(group_size):
    lin = gaussian_linear(256, 33, seed=4)
    m = Int4Linear.from_linear(lin, group_size=group_size)
    x = noncontig_x(3, 7, K=256)
    w = ops.dequantize_int4(m.qweight, m.scales, m.offsets)
    out = m(x)
    assert out.shape == (3, 7, 33)
    assert rel_err(out, float64_linear(x, w, m.bias)) <= 1e-5


def test_from_linear_keeps_device_dtype_and_bias_values():
    lin = gaussian_linear(64, 9, seed=5).to(torch.bfloat16)
    m8, m4 = Int8Linear.from_linear(lin), Int4Linear.from_linear(lin)
    for m in (m8, m4):
        assert m.bias.dtype == torch.bfloat16 and torch.equal(m.bias, lin.bias)
        assert m.bias.data_ptr() != lin.bias.data_ptr()  # a copy: the float model may be freed
        assert (m.in_features, m.out_features) == (64, 9)


# --------------------------------------------------------------------------------- state dicts


def _round_trip(m, fresh):
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    fresh.__dict__["_run"] = "stale"  # prepared (maybe repacked) weights must be dropped by a load
    fresh.load_state_dict(torch.load(buf))
    assert fresh._run is None
    return fresh


@pytest.mark.parametrize("group_size,mode,bias", [(0, "w8a16", True), (32, "w8a8", False)])
def test_int8_state_dict_round_trip(group_size, mode, bias):
    m = Int8Linear.from_linear(gaussian_linear(64, 33, bias=bias, seed=6), group_size=group_size, mode=mode)
    keys = {"weight", "weight_scale"} | ({"bias"} if bias else set())
    assert set(m.state_dict()) == keys
    m2 = _round_trip(m, Int8Linear(64, 33, bias, group_size=group_size, mode=mode))
    x = torch.randn(4, 64)
    assert torch.equal(m2(x), m(x))
    for k, t in m.state_dict().items():
        assert torch.equal(m2.state_dict()[k], t) and m2.state_dict()[k].dtype == t.dtype


def test_int4_state_dict_round_trip():
    m = Int4Linear.from_linear(gaussian_linear(128, 17, seed=7), group_size=64)
    assert set(m.state_dict()) == {"qweight", "scales", "offsets", "bias"}
    m2 = _round_trip(m, Int4Linear(128, 17, True, group_size=64))
    x = torch.randn(3, 5, 128)
    assert torch.equal(m2(x), m(x))


def test_fresh_module_is_deterministic_and_reprs():
    m = Int8Linear(32, 8)
    assert torch.equal(m(torch.randn(2, 32)), torch.zeros(2, 8))  # zero weights, zero bias
    r = repr(Int8Linear(32, 8, group_size=16, mode="w8a8"))
    assert "in_features=32" in r and "out_features=8" in r and "group_size=16" in r and "w8a8" in r
    assert "group_size=32" in repr(Int4Linear(64, 8))


def test_from_quantized_wraps_tensors_and_checks_them():
    q, s = ops.quantize_int8(torch.randn(8, 64), 32)
    m = Int8Linear.from_quantized(q, s)
    assert m.weight is q and m.group_size == 32 and m.bias is None
    with pytest.raises(TypeError, match="weight"):
        Int8Linear.from_quantized(q.float(), s)
    with pytest.raises(ValueError, match="weight_scale"):
        Int8Linear.from_quantized(q, torch.ones(8, 5))
    with pytest.raises(ValueError, match="bias"):
        Int8Linear.from_quantized(q, s, torch.ones(7))
    qw, sc, of = ops.quantize_int4(torch.randn(8, 64), 32)
    m4 = Int4Linear.from_quantized(qw, sc, of)
    assert m4.qweight is qw and m4.group_size == 32
    with pytest.raises(ValueError, match="scales/offsets"):
        Int4Linear.from_quantized(qw, sc, of[:, :1])
    with pytest.raises(TypeError, match="qweight"):
        Int4Linear.from_quantized(qw.to(torch.int8), sc, of)


def test_constructor_and_forward_errors():
    with pytest.raises(ValueError, match="mode"):
        Int8Linear(64, 8, mode="w4a4")
    with pytest.raises(ValueError, match="group_size"):
        Int8Linear(64, 8, group_size=48)
    with pytest.raises(ValueError, match="group_size"):
        Int4Linear(64, 8, group_size=16)
    with pytest.raises(ValueError, match="group_size"):
        Int4Linear(96, 8, group_size=64)
    with pytest.raises(ValueError, match="x"):
        Int8Linear(64, 8)(torch.randn(3, 63))
    with pytest.raises(ValueError, match="x"):
        Int4Linear(64, 8)(torch.randn(3, 32))


# ---------------------------------------------------------------------------- quantize_linears


def _model(seed=8):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 128), nn.Sequential(nn.Linear(128, 64)))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(std=0.2)
    return m


@pytest.mark.parametrize("quant,cls,min_db", [("int8", Int8Linear, 35.0), ("int4", Int4Linear, 15.0)])
def test_quantize_linears_sequential(quant, cls, min_db):
    model = _model()
    x = torch.randn(5, 64)
    ref = model(x).detach().to(torch.float64)
    kept = model[3][0]
    out_model = quantize_linears(model, quant, skip=("3.0",))
    assert out_model is model
    assert isinstance(model[0], cls) and isinstance(model[2], cls)
    assert model[3][0] is kept  # skipped by its full name
    assert sqnr_db(model(x), ref) > min_db


def test_quantize_linears_skip_by_leaf_name_root_linear_and_errors():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(64, 64)
            self.lm_head = nn.Linear(64, 10)

    net = quantize_linears(Net(), "int8", mode="w8a8", group_size=32, skip=["lm_head"])
    assert isinstance(net.body, Int8Linear) and net.body.mode == "w8a8" and net.body.group_size == 32
    assert type(net.lm_head) is nn.Linear
    assert isinstance(quantize_linears(nn.Linear(64, 4), "int4"), Int4Linear)
    with pytest.raises(ValueError, match="quant"):
        quantize_linears(Net(), "int3")
    with pytest.raises(ValueError, match="body"):  # K=64 cannot take groups of 128: names the layer
        quantize_linears(Net(), "int4", group_size=128)
