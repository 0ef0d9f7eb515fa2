"""The eager fast path of the hot modules (nn/_fast.py, Op.run_trusted) computes what the op computes,
and never skips a check that a changed module tensor or an unexpected activation needs."""
import pytest
import torch

from llmkern import nn as lnn
from llmkern import ops


def test_linear_fast_path_equals_op_and_rechecks_replaced_weights():
    torch.manual_seed(0)
    m = lnn.Int8Linear.from_linear(torch.nn.Linear(64, 33))
    x = torch.randn(3, 64)
    first = m(x)          # through the registered op: validates the buffers
    assert m._trusted
    again = m(x)          # trusted path
    assert torch.equal(first, again)
    assert torch.equal(again, ops.int8_linear(x, m.weight, m.weight_scale, m.bias))
    m.weight = torch.zeros(33, 63, dtype=torch.int8)   # a bad replacement must meet the op's checks again
    assert not m._trusted
    with pytest.raises(ValueError, match="x must have shape"):
        m(x)
    with pytest.raises(ValueError, match="x must have shape"):  # a wrong activation never takes the fast path
        lnn.Int8Linear.from_linear(torch.nn.Linear(64, 33))(torch.randn(3, 65))


def test_int4_linear_and_rmsnorm_fast_paths(monkeypatch):
    monkeypatch.setenv("LLMKERN_INT4_ROWS16", "0")  # bitwise prepared == op (rows16: the test below)
    torch.manual_seed(0)
    m = lnn.Int4Linear.from_linear(torch.nn.Linear(64, 17), group_size=32)
    x = torch.randn(2, 64)
    assert torch.equal(m(x), m(x))
    assert torch.equal(m(x), ops.int4_linear(x, m.qweight, m.scales, m.offsets, m.bias))
    n = lnn.RMSNorm(64)
    with torch.no_grad():
        n.weight.normal_()
    r = torch.randn(2, 64)
    y0, h0 = n(x, r)
    y1, h1 = n(x, r)
    assert torch.equal(y0, y1) and torch.equal(h0, h1)
    n.weight = torch.nn.Parameter(torch.ones(63))
    with pytest.raises(ValueError, match="weight"):
        n(x)


def test_kv_cache_fast_path_keeps_rotary_bounds_checked():
    """A cache longer than the rotary table: the position check still fires (no out-of-bounds read)."""
    rot = lnn.RotaryEmbedding(64, max_positions=4)
    cache = lnn.KVCache(1, 16, 2, 64)
    k, v, q = torch.randn(1, 4, 2, 64), torch.randn(1, 4, 2, 64), torch.randn(1, 4, 4, 64)
    cache.append(k, v, q=q, rotary=rot)
    with pytest.raises(ValueError, match="positions"):
        cache.append(k[:, :1], v[:, :1], q=q[:, :1], rotary=rot)


@pytest.mark.parametrize("kind", ["int8-w8a16", "int8-w8a8", "int4"])
def test_prepared_linear_equals_op_for_every_activation_layout(kind, monkeypatch):
    """After the first (checked) call the module runs the op's prepared run(x): same bits as the op
    (for int4 without the rows16 layout, whose sums run in another order: see the next test)."""
    monkeypatch.setenv("LLMKERN_INT4_ROWS16", "0")
    torch.manual_seed(1)
    lin = torch.nn.Linear(96, 37)
    if kind == "int4":
        m = lnn.Int4Linear.from_linear(lin, group_size=32)
        op = lambda x: ops.int4_linear(x, m.qweight, m.scales, m.offsets, m.bias)  # noqa: E731
    else:
        m = lnn.Int8Linear.from_linear(lin, mode=kind.split("-")[1])
        op = lambda x: ops.int8_linear(x, m.weight, m.weight_scale, m.bias, m.mode)  # noqa: E731
    m(torch.randn(1, 96))
    name = "int4_linear" if kind == "int4" else "int8_linear"
    assert m._run is not None and m._run.backend == ops.OPS[name].backends_here()[0]
    for x in (torch.randn(5, 96), torch.randn(2, 3, 96), torch.randn(4, 192)[:, ::2], torch.randn(96, 6).t(),
              torch.randn(3, 96).to(torch.bfloat16)):
        out = m(x)
        assert out.shape == x.shape[:-1] + (37,) and out.dtype == x.dtype
        assert torch.equal(out, op(x)), x.shape


def test_prepared_int4_with_rows16_close_to_op(monkeypatch):
    """With the rows16 layout (the default on AVX-512) prepared calls of 2..8 fp32 / 2..16 bf16 rows read
    it: equal to the op up to fp32 rounding (bf16 outputs: a rounding step), the same bits call to call."""
    monkeypatch.setenv("LLMKERN_INT4_ROWS16", "1")
    torch.manual_seed(3)
    m = lnn.Int4Linear.from_linear(torch.nn.Linear(96, 37), group_size=32)
    m(torch.randn(1, 96))
    for x, tol in ((torch.randn(5, 96), 1e-5), (torch.randn(2, 3, 96), 1e-5), (torch.randn(4, 192)[:, ::2], 1e-5),
                   (torch.randn(3, 96).to(torch.bfloat16), 1e-2)):
        out, ref = m(x), ops.int4_linear(x, m.qweight, m.scales, m.offsets, m.bias)
        assert torch.equal(out, m(x))
        assert ((out.double() - ref.double()).norm() / ref.double().norm()).item() <= tol, x.shape


def test_prepared_linear_follows_backend_changes(monkeypatch):
    torch.manual_seed(2)
    m = lnn.Int8Linear.from_linear(torch.nn.Linear(64, 9), mode="w8a16")
    x = torch.randn(2, 64)
    m(x)
    first = m._run
    assert first is not None and first.backend == ops.OPS["int8_linear"].backends_here()[0]
    monkeypatch.setenv("LLMKERN_BACKEND", "reference")  # no preparer: the op (reference) runs
    out = m(x)
    assert ops.OPS["int8_linear"].last_backend == "reference"
    assert torch.allclose(out, ops.int8_linear(x, m.weight, m.weight_scale, m.bias, backend="reference"))
    monkeypatch.delenv("LLMKERN_BACKEND")
    m.mode = "w8a8"  # a settings change drops the prepared run
    assert m._run is None
    assert torch.equal(m(x), ops.int8_linear(x, m.weight, m.weight_scale, m.bias, "w8a8"))
    assert m._run is not None
    m.to(torch.float32)  # _apply (e.g. .to()/.cuda()) drops it too
    assert m._run is None
