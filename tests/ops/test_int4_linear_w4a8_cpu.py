"""int4_linear modes "w4a8" / "w4a8g" on the CPU (csrc/include/llmkern/cpu/int4_linear_w4a8*.h).

W4A8 = the activations quantized to int8 by int8_linear's W8A8 rule (one scale per row, or per group of
G values of a row for "w4a8g"), dequantized, times the int4 weights. The kernel's integer dot products
per group are exact, so against a float64 computation on the same quantized activations its only error
is fp32 rounding of a few operations per group: the tolerances below are that (and the output dtype's
rounding), not more. Every ISA and thread count must give the same bits.
"""
import zlib

import pytest
import torch

import llmkern
import llmkern._C as C
from llmkern import ops
from llmkern.nn import Int4Linear
from llmkern.ops.int4_linear import _cpu_w4a8_runner
from llmkern.reference.quant import dequantize_int4, quantize_rows_int8
from _cpu_helpers import ISAS

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (N, K, G): N with block tails (1, 15, 17, 33, 100, 257 rows), every G, K one group up to many
SHAPES = [(1, 32, 32), (15, 64, 32), (17, 96, 32), (33, 640, 64), (100, 576, 32), (257, 256, 128),
          (48, 1536, 64), (16, 384, 128)]
ROWS = (1, 2, 3, 4, 5, 7, 8, 9, 17, 40)
EPS = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
MODES = ("w4a8", "w4a8g")


def weights(N, K, G, f16, gen):
    qw = torch.randint(0, 256, (N, K // 2), generator=gen, dtype=torch.uint8)
    s = torch.rand(N, K // G, generator=gen) * 0.02 + 1e-3
    o = -8 * s + torch.randn(N, K // G, generator=gen) * 0.01
    if f16:  # GGUF-like: every scale and offset an fp16 value (the layout stores them as fp16)
        s, o = s.half().float(), o.half().float()
    return qw, s, o


def dequant(qw, s, o):
    p = qw.to(torch.int64)
    q = torch.stack([p % 16, p // 16], -1).reshape(p.shape[0], -1).double()  # [N, K]
    G = q.shape[1] // s.shape[1]
    return q * s.double().repeat_interleave(G, 1) + o.double().repeat_interleave(G, 1)


def expected(x, qw, s, o, b, mode):
    """(float64 W4A8 result [M, N] before output rounding, magnitude bound sum |x_hat w| [M, N])."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    G = K // s.shape[1] if mode == "w4a8g" else K
    qx, sx = quantize_rows_int8(x2.reshape(x2.shape[0], K // G, G))  # [M, K/G, G], [M, K/G]
    xh = (qx.double() * sx.double().unsqueeze(-1)).reshape(x2.shape)
    w = dequant(qw, s, o)
    y = xh @ w.T
    mag = xh.abs() @ w.abs().T
    if b is not None:
        y = y + b.double()
        mag = mag + b.double().abs()
    return y, mag


def check_close(out, x, qw, s, o, b, what, mode="w4a8"):
    y, mag = expected(x, qw, s, o, b, mode)
    ng = s.shape[1]
    # fp32: 4 roundings per group (offset * A, the fma with the scale, the one with the activation scale
    # into the running sum, each bounded by mag), the bias; 16-bit outputs: plus half an ulp of the output.
    tol = (4 * ng + 4) * 2.0 ** -24 * mag + EPS[out.dtype] * y.abs() + 1e-30
    err = (out.reshape(y.shape).double() - y).abs()
    bad = err > tol
    assert not bad.any(), f"{what}: {int(bad.sum())} outputs off, worst {float((err / tol).max()):.2f}x tolerance"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("f16", [True, False], ids=["fp16-scales", "fp32-scales"])
@pytest.mark.parametrize("isa", ISAS)
def test_w4a8_matches_float64_on_the_quantized_rows(isa, f16, mode, monkeypatch):
    monkeypatch.setenv("LLMKERN_CPU_ISA", isa)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{isa}{f16}".encode()))
    saved = torch.get_num_threads()
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            for i, (N, K, G) in enumerate(SHAPES):
                qw, s, o = weights(N, K, G, f16, gen)
                run = _cpu_w4a8_runner(qw, s, o, None, mode == "w4a8g")
                assert run.packed_e == (2 if f16 else 4)
                for M in ROWS[i % 3::3] + (1,):
                    dt = DTYPES[(i + M) % 3]
                    x = torch.randn(M, K, generator=gen).to(dt)
                    b = torch.randn(N, generator=gen).to(dt) if (M + i) % 2 else None
                    out = ops.int4_linear(x, qw, s, o, b, mode, backend="cpu")
                    assert out.dtype == dt and out.shape == (M, N)
                    check_close(out, x, qw, s, o, b, f"{isa} t{nt} N{N} K{K} G{G} M{M} {dt}", mode)
                    if b is None:
                        assert torch.equal(run(x), out)  # prepared runner == op path
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("mode", MODES)
def test_w4a8_every_isa_and_thread_count_gives_the_same_bits(mode, monkeypatch):
    gen = torch.Generator().manual_seed(7)
    saved = torch.get_num_threads()
    try:
        for N, K, G in [(33, 640, 64), (100, 576, 32), (257, 256, 128)]:
            for f16 in (True, False):
                qw, s, o = weights(N, K, G, f16, gen)
                b = torch.randn(N, generator=gen)
                for M in (1, 3, 8, 19):
                    x = torch.randn(M, K, generator=gen).to(torch.bfloat16)
                    outs = []
                    for isa in ISAS:
                        monkeypatch.setenv("LLMKERN_CPU_ISA", isa)
                        for nt in (1, 2):
                            torch.set_num_threads(nt)
                            outs.append((isa, nt, ops.int4_linear(x, qw, s, o, b, mode, backend="cpu")))
                    for isa, nt, out in outs[1:]:
                        assert torch.equal(out, outs[0][2]), f"{isa} t{nt} differs from {outs[0][0]} t{outs[0][1]}"
    finally:
        torch.set_num_threads(saved)


def test_w4a8_reference_is_w4a16_on_the_quantized_rows():
    gen = torch.Generator().manual_seed(3)
    qw, s, o = weights(20, 128, 32, False, gen)
    x = torch.randn(5, 128, generator=gen)
    qx, sx = quantize_rows_int8(x)
    xh = qx.double() * sx.double().unsqueeze(1)  # exact in float64 (8 x 24 bits)
    a = ops.int4_linear(x, qw, s, o, None, "w4a8", backend="reference")
    w = dequantize_int4(qw, s, o).double()  # the canonical fp32 dequantization, as W4A16's reference
    assert torch.equal(a, (xh @ w.T).float())
    assert not torch.equal(a, ops.int4_linear(x, qw, s, o, None, backend="reference"))
    # per group: each group of 32 quantized on its own
    qg, sg = quantize_rows_int8(x.reshape(5, 4, 32))
    xg = (qg.double() * sg.double().unsqueeze(-1)).reshape(5, 128)
    assert torch.equal(ops.int4_linear(x, qw, s, o, None, "w4a8g", backend="reference"), (xg @ w.T).float())


def test_w4a8g_is_more_exact_with_outlier_channels():
    """What per-group scales are for: one large channel no longer sets the resolution of its whole row."""
    gen = torch.Generator().manual_seed(9)
    w = torch.randn(64, 512, generator=gen)
    q, s, o = ops.quantize_int4(w, 32)
    x = torch.randn(16, 512, generator=gen)
    x[:, 7] *= 50
    w16 = ops.int4_linear(x, q, s, o, None, "w4a16", backend="cpu").double()
    err = {m: (ops.int4_linear(x, q, s, o, None, m, backend="cpu").double() - w16).norm().item() for m in MODES}
    assert err["w4a8g"] < err["w4a8"] / 4, err


@pytest.mark.parametrize("mode", MODES)
def test_w4a8_edge_rows_zero_nan_and_empty(mode):
    gen = torch.Generator().manual_seed(5)
    qw, s, o = weights(17, 64, 32, True, gen)
    b = torch.randn(17, generator=gen)
    x = torch.randn(4, 64, generator=gen)
    x[1] = 0.0
    x[2, 5] = float("nan")
    x[3] = 1e-38  # below 127 / FLT_MAX: the row quantizes to +-127 ("saturate"), as the reference
    out = ops.int4_linear(x, qw, s, o, b, mode, backend="cpu")
    ref = ops.int4_linear(x, qw, s, o, b, mode, backend="reference")
    assert torch.equal(out[1], b)  # a zero row: the bias alone
    assert torch.isnan(out[2]).all() and torch.isnan(ref[2]).all()
    check_close(out[[0, 3]], x[[0, 3]], qw, s, o, b, "edge rows", mode)
    assert ops.int4_linear(x[:0], qw, s, o, b, mode, backend="cpu").shape == (0, 17)


@pytest.mark.parametrize("mode", MODES)
def test_w4a8_noncontiguous_and_batched_x(mode):
    gen = torch.Generator().manual_seed(11)
    qw, s, o = weights(40, 256, 64, True, gen)
    base = torch.randn(3, 5, 512, generator=gen)
    x = base[..., ::2]  # [3, 5, 256], stride 2 along K
    out = ops.int4_linear(x, qw, s, o, None, mode, backend="cpu")
    assert out.shape == (3, 5, 40)
    assert torch.equal(out, ops.int4_linear(x.contiguous(), qw, s, o, None, mode, backend="cpu"))
    check_close(out, x, qw, s, o, None, "strided x", mode)
    xt = torch.randn(256, 6, generator=gen).T  # rows 1 element apart, K stride 6
    check_close(ops.int4_linear(xt, qw, s, o, None, mode, backend="cpu"), xt, qw, s, o, None, "transposed x", mode)


def test_int4linear_w4a8_module():
    torch.manual_seed(0)
    lin = torch.nn.Linear(192, 72)
    m16 = Int4Linear.from_linear(lin)
    m8 = Int4Linear.from_linear(lin, mode="w4a8")
    assert m8.mode == "w4a8" and "mode='w4a8'" in repr(m8)
    assert m8.state_dict().keys() == m16.state_dict().keys()
    x = torch.randn(3, 192, dtype=torch.bfloat16)
    first = m8(x)  # through the op
    again = m8(x)  # the prepared (packed once) call
    assert torch.equal(first, again)
    assert torch.equal(again, ops.int4_linear(x, m8.qweight, m8.scales, m8.offsets, m8.bias, "w4a8", backend="cpu"))
    m8.mode = "w4a16"  # switching the mode drops the prepared call
    assert torch.equal(m8(x), m16(x))
    with pytest.raises(ValueError, match="mode"):
        Int4Linear(64, 8, mode="w8a8")
    with pytest.raises(ValueError, match="mode"):
        ops.int4_linear(x[:, :64], m16.qweight[:8, :32], m16.scales[:8, :2], m16.offsets[:8, :2], None, "int8")
    q = llmkern.nn.quantize_linears(torch.nn.Sequential(torch.nn.Linear(64, 8)), "int4", mode="w4a8")
    assert q[0].mode == "w4a8"
    assert llmkern.nn.set_linear_modes(q, int4="w4a8g", int8="w8a8") == 1 and q[0].mode == "w4a8g"
    with pytest.raises(ValueError, match="int4 must be"):
        llmkern.nn.set_linear_modes(q, int4="w8a8")
    with pytest.raises(ValueError, match="mode for int4"):
        llmkern.nn.quantize_linears(torch.nn.Linear(64, 8), "int4", mode="w8a8")


@pytest.mark.parametrize("G", [32, 64, 128])
@pytest.mark.parametrize("f16", [False, True])
def test_w4a8_pack_writes_the_documented_layout(G, f16):
    """int4_linear_w4a8_pack, byte for byte, against the layout of int4_linear_w4a8_common.h built element by
    element: 16-row blocks (the last zero-padded), per group G/8 chunks of 64 bytes (row r's 4 bytes at 4r:
    byte b = q[k0 + 8c + b] | q[k0 + 8c + 4 + b] << 4), then the 16 scales and the 16 offsets."""
    N, K = 37, 256  # 3 blocks, the last with 5 rows
    qw, s, o = weights(N, K, G, f16, torch.Generator().manual_seed(G + f16))
    E = 2 if f16 else 4
    nbytes = C.int4_linear_w4a8_packed_size(N, K, G, E)
    buf = torch.full((nbytes + 64,), 0xAB, dtype=torch.uint8)  # poisoned: every byte must be written
    off = -buf.data_ptr() % 64
    C.int4_linear_w4a8_pack(qw.data_ptr(), s.data_ptr(), o.data_ptr(), N, K, G, E, buf.data_ptr() + off, nbytes)
    got = buf[off:off + nbytes]
    p = qw.to(torch.int64)
    q = torch.stack([p % 16, p // 16], -1).reshape(N, K)  # [N, K] nibbles, low nibble = even k
    ng, gb = K // G, 8 * G + 32 * E
    want = torch.zeros(nbytes, dtype=torch.uint8)
    sv = (s.half().view(torch.uint8) if f16 else s.view(torch.uint8)).reshape(N, ng, E)  # [N, K/G, E] bytes
    ov = (o.half().view(torch.uint8) if f16 else o.view(torch.uint8)).reshape(N, ng, E)
    for n in range(N):
        blk, r = divmod(n, 16)
        for g in range(ng):
            base = blk * ng * gb + g * gb
            for c in range(G // 8):
                for b in range(4):
                    k = g * G + 8 * c + b
                    want[base + 64 * c + 4 * r + b] = int(q[n, k]) | int(q[n, k + 4]) << 4
            want[base + 8 * G + r * E: base + 8 * G + (r + 1) * E] = sv[n, g]
            want[base + 8 * G + (16 + r) * E: base + 8 * G + (17 + r) * E] = ov[n, g]
    assert torch.equal(got, want)
    assert (buf[off + nbytes:] == 0xAB).all()  # nothing written past the layout


@pytest.mark.parametrize("mode", ["w4a8", "w4a8g"])
def test_w4a8_module_first_call_packs_once(mode, monkeypatch):
    """A W4A8 module's first call checks as the op does, then computes through its prepared call: the weights
    are packed once (the op packs on every call it computes), and every call gives the op's bits."""
    calls = []
    real = C.int4_linear_w4a8_pack
    monkeypatch.setattr(C, "int4_linear_w4a8_pack", lambda *a: calls.append(a[3]) or real(*a))
    torch.manual_seed(0)
    m = Int4Linear.from_linear(torch.nn.Linear(64, 24), mode=mode)
    x = torch.randn(3, 64)
    first, second = m(x), m(x)
    assert calls == [24] and torch.equal(first, second)
    assert torch.equal(first, ops.int4_linear(x, m.qweight, m.scales, m.offsets, m.bias, mode))
    bad = Int4Linear.from_linear(torch.nn.Linear(64, 24), mode=mode)
    for x_bad in (torch.randn(3, 63), torch.randint(0, 3, (3, 64))):
        with pytest.raises((ValueError, TypeError)) as got:
            bad(x_bad)
        with pytest.raises(type(got.value)) as want:
            ops.int4_linear(x_bad, bad.qweight, bad.scales, bad.offsets, None, mode)
        assert str(got.value) == str(want.value)  # the op's own error
    assert not bad._trusted


def test_w4a8_launcher_rejects_bad_arguments():
    gen = torch.Generator().manual_seed(1)
    qw, s, o = weights(16, 64, 32, False, gen)
    nbytes = C.int4_linear_w4a8_packed_size(16, 64, 32, 4)
    buf = torch.empty(nbytes + 128, dtype=torch.uint8)
    p = buf.data_ptr() + (-buf.data_ptr() % 64)
    C.int4_linear_w4a8_pack(qw.data_ptr(), s.data_ptr(), o.data_ptr(), 16, 64, 32, 4, p, nbytes)
    x, out = torch.randn(2, 64), torch.empty(2, 16)
    ws = torch.empty(C.int4_linear_w4a8_workspace_size(2, 64, 32, 1), dtype=torch.uint8)
    assert C.int4_linear_w4a8_workspace_size(2, 64, 32, 2) > ws.numel()  # decode: a copy of the rows per thread
    args = dict(x_ptr=x.data_ptr(), x_dtype=0, x_row_stride=64, M=2, K=64, w_ptr=p, N=16, group_size=32, e=4,
                bias_ptr=0, out_ptr=out.data_ptr(), out_row_stride=16, ws_ptr=ws.data_ptr(), ws_bytes=ws.numel(),
                num_threads=1, isa="")
    C.int4_linear_w4a8(**args)
    check_close(out, x, qw, s, o, None, "launcher")
    for key, value, msg in [("w_ptr", p + 4, "w_ptr is not aligned"), ("ws_bytes", 8, "workspace too small"),
                            ("group_size", 48, "group_size"), ("K", 80, "K must be"), ("e", 3, "e must be"),
                            ("x_dtype", 5, "x_dtype"), ("out_row_stride", 8, "out_row_stride"),
                            ("num_threads", 0, "num_threads"), ("isa", "sse9", "isa")]:
        with pytest.raises(ValueError, match=msg):
            C.int4_linear_w4a8(**{**args, key: value})
    with pytest.raises(ValueError, match="fp16"):
        C.int4_linear_w4a8_pack(qw.data_ptr(), s.data_ptr(), o.data_ptr(), 16, 64, 32, 2, p, nbytes)
    with pytest.raises(ValueError, match="too small"):
        C.int4_linear_w4a8_pack(qw.data_ptr(), s.data_ptr(), o.data_ptr(), 16, 64, 32, 4, p, nbytes - 1)
