"""The eager fast path of the hot modules (nn/_fast.py, Op.run_trusted) computes what the op computes,
and never skips a check that a changed module tensor or an unexpected activation needs."""
import importlib

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
    # The same Parameter with new data: checked again (a smaller one was read past its end), new values used.
    n.weight = torch.nn.Parameter(torch.ones(64))
    n(x)
    n.weight.data = torch.full((8,), 2.0)
    with pytest.raises(ValueError, match="weight"):
        n(x)
    n.weight.data = torch.full((64,), 2.0)
    assert torch.equal(n(x), 2 * lnn.RMSNorm(64)(x))


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
    want = ops.int8_linear(x, m.weight, m.weight_scale, m.bias, "w8a8")  # (read first: reading a released weight
    assert torch.equal(m(x), want)                                       # restores it and drops the prepared run)
    assert m._run is not None
    m.to(torch.float32)  # _apply (e.g. .to()/.cuda()) drops it too
    assert m._run is None


def _prepared(kind):
    """A prepared quantized linear (first call done), its op on its own tensors, and a spy counting the
    calls that went through forward (nn.Module.__call__) instead of __call__'s shortcut."""
    torch.manual_seed(4)
    lin = torch.nn.Linear(64, 21)
    if kind == "int4":
        m = lnn.Int4Linear.from_linear(lin, group_size=32)
        op = lambda x, m=m: ops.int4_linear(x, m.qweight, m.scales, m.offsets, m.bias)  # noqa: E731
    else:
        m = lnn.Int8Linear.from_linear(lin)
        op = lambda x, m=m: ops.int8_linear(x, m.weight, m.weight_scale, m.bias)  # noqa: E731
    m(torch.randn(1, 64))
    return m, op


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_module_call_shortcut_honours_hooks_overrides_modes_and_grad(kind, monkeypatch):
    """__call__ skips nn.Module.__call__ -> forward only where nothing could tell: hooks (the module's or
    global), a replaced forward (instance or subclass), Module.compile(), torch function modes and
    tracked activations all take the full call, and their effects show in the result."""
    monkeypatch.setenv("LLMKERN_INT4_ROWS16", "0")  # prepared == op bit for bit
    # (the op reads the module's tensors: a released weight would be restored, the prepared run dropped)
    monkeypatch.setattr(importlib.import_module("llmkern.ops.int8_linear"), "CPU_INT8_RELEASE", False)
    from torch.overrides import TorchFunctionMode

    cls = lnn.Int4Linear if kind == "int4" else lnn.Int8Linear
    slow = []
    real_lean = cls._lean
    monkeypatch.setattr(cls, "_lean", lambda self, x: slow.append(1) or real_lean(self, x))
    m, op = _prepared(kind)
    x = torch.randn(2, 64)
    ref = op(x)
    slow.clear()
    assert torch.equal(m(x), ref) and slow == []  # the shortcut
    assert ops.OPS[f"{kind}_linear"].last_backend == "cpu"

    h = m.register_forward_hook(lambda mod, args, out: out + 1)
    assert torch.equal(m(x), ref + 1) and slow == [1]
    h.remove()
    h = m.register_forward_pre_hook(lambda mod, args: (args[0] * 2,))
    assert torch.equal(m(x), op(2 * x))
    h.remove()
    h = torch.nn.modules.module.register_module_forward_hook(lambda mod, args, out: out * 0)
    assert torch.equal(m(x), torch.zeros_like(ref))
    h.remove()
    slow.clear()
    assert torch.equal(m(x), ref) and slow == []  # hooks gone: the shortcut again

    m.forward = lambda x: torch.full((x.shape[0], 21), 7.0)  # e.g. accelerate's hooks replace forward
    assert torch.equal(m(x), torch.full((2, 21), 7.0))
    del m.forward

    class Doubled(cls):
        def forward(self, x):
            return super().forward(x) * 2

    d = Doubled.from_quantized(*([m.qweight, m.scales, m.offsets] if kind == "int4" else [m.weight, m.weight_scale]),
                               m.bias)
    assert torch.equal(d(x), 2 * ref) and torch.equal(d(x), 2 * ref)  # prepared by the first call

    class Log(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    slow.clear()
    m(x)  # the first call since `del m.forward` takes forward and gives the shortcut back
    assert torch.equal(m(x), ref) and slow == [1]
    slow.clear()
    with Log():
        assert torch.equal(m(x), ref)
    assert slow == [1]
    xg = x.clone().requires_grad_(True)
    with torch.no_grad():
        m(xg)
    assert slow == [1]  # untracked under no_grad: the shortcut
    m(xg)
    assert slow == [1, 1]
    with torch.device("meta"):  # a default-device context: the output still lands on the CPU
        assert torch.equal(m(x), ref)
    m.compile()  # Module.compile(): calls must go to the compiled call (not run here: compiling is slow)
    assert m.__dict__["_fast"] is None


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_prepared_module_copies_and_pickles_prepare_their_own_run(kind, monkeypatch):
    """copy.deepcopy / pickle of a prepared module: the copy does not share the prepared run (raw pointers
    into the original's buffers); it prepares its own at its first call."""
    import copy

    monkeypatch.setenv("LLMKERN_INT4_ROWS16", "0")  # prepared == op bit for bit

    m, op = _prepared(kind)
    x = torch.randn(3, 64)
    ref = m(x)
    for c in (copy.deepcopy(m), torch.load(_saved(m), weights_only=False)):
        assert c.__dict__["_fast"] is None and c.__dict__["_run"] is None
        with torch.no_grad():
            (c.qweight if kind == "int4" else c.weight).zero_()  # in place: the copy's own buffers
        out = c(x)
        assert torch.equal(out, c.bias.expand(3, 21).to(out.dtype)) if kind == "int8" else True
        assert not torch.equal(out, ref) and torch.equal(m(x), ref)
        assert torch.equal(c(x), out)  # prepared now, same result


def _saved(m):
    import io

    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    return buf


def test_bound_linear_workspace_and_argument_errors():
    """llmkern._C.BoundLinear: run() with too small a workspace computes nothing and returns the bytes it
    needs; binding checks the weight arguments with errors naming them."""
    from llmkern import _backends

    mod = _backends.cpu_module()
    torch.manual_seed(5)
    m, op = _prepared("int8")
    run = m.__dict__["_run"].impl
    x = torch.randn(300, 64)
    out = torch.full((300, 21), -1.0)
    need = run.workspace_size(300, 2)
    small = torch.empty(max(need // 2, 1), dtype=torch.uint8)
    got = run.bound.run(x.data_ptr(), 0, 64, 300, out.data_ptr(), small.data_ptr(), small.numel(), 2, "")
    assert got == need and need > 0 and bool((out == -1).all())
    big = torch.empty(need, dtype=torch.uint8)
    assert run.bound.run(x.data_ptr(), 0, 64, 300, out.data_ptr(), big.data_ptr(), need, 2, "") == 0
    torch.testing.assert_close(out, op(x))
    q = torch.zeros(8, 32, dtype=torch.uint8)
    s = torch.ones(8, 1)
    with pytest.raises(ValueError, match="group_size"):
        mod.int4_linear_bind(q.data_ptr(), 8, 64, s.data_ptr(), s.data_ptr(), 48, 0)
    with pytest.raises(ValueError, match="qweight_ptr"):
        mod.int4_linear_bind(0, 8, 64, s.data_ptr(), s.data_ptr(), 64, 0)
    with pytest.raises(ValueError, match="mode"):
        mod.int8_linear_bind(q.data_ptr(), 8, 32, s.data_ptr(), 32, 0, "w4a4")
    with pytest.raises(ValueError, match="w_ptr"):
        mod.int4_linear_w4a8_bind(q.data_ptr() + 1, 8, 64, 32, 4, 0)


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("rotary", [False, True])
def test_paged_cache_fast_path_skips_checks_and_equals_checked_calls(int8, rotary, monkeypatch):
    """PagedKVCache.append / attend with the cache's own slots, positions, lengths and block table skip the ops'
    argument checks (on a GPU they read those back: a sync per layer and step) and compute what the checked
    calls compute: an append given the same positions explicitly (which takes the checks), decode_attention
    called on the same tensors."""
    counts = {"kv_cache_append": 0, "decode_attention": 0}
    for name in counts:  # the full checks, and on the CPU the one-pass `fast_check` that vouches for plain tensors
        op = ops.OPS[name]
        for attr in ("check", "fast_check"):
            fn = getattr(op, attr)
            if fn is not None:
                monkeypatch.setattr(op, attr, lambda *a, _f=fn, _n=name: counts.__setitem__(_n, counts[_n] + 1) or _f(*a))
    torch.manual_seed(3)
    rot = lnn.RotaryEmbedding(32, max_positions=64) if rotary else None
    fast, checked = (lnn.PagedKVCache(16, 4, 2, 32, int8=int8) for _ in range(2))
    ids = [fast.add_sequence() for _ in range(3)]
    assert [checked.add_sequence() for _ in range(3)] == ids
    for S in (5, 1, 1, 3):  # a prefill, two decode steps, a chunk
        k, v = torch.randn(3, S, 2, 32), torch.randn(3, S, 2, 32)
        q = torch.randn(3, S, 4, 32) if rotary else None
        q2 = None if q is None else q.clone()
        pos = fast.seq_lens(ids).to(torch.int64)[:, None] + torch.arange(S)[None, :]  # [3, S]
        before = dict(counts)
        fast.append(ids, k, v, q=q, rotary=rot)
        qa = q if rotary else torch.randn(3, S, 4, 32)
        out = fast.attend(qa if S > 1 else qa[:, 0], ids)
        assert counts == before  # neither op checked its arguments
        checked.append(ids, k, v, q=q2, positions=pos if rotary else None, rotary=rot)
        if rotary:
            assert torch.equal(q, q2)
        for a, b in ((fast.k, checked.k), (fast.v, checked.v), (fast.k_scale, checked.k_scale)):
            assert (a is None and b is None) or torch.equal(a, b)
        want = ops.decode_attention(qa if S > 1 else qa[:, 0], checked.k, checked.v, checked.seq_lens(ids),
                                    block_table=checked.block_table(ids), k_scale=checked.k_scale,
                                    v_scale=checked.v_scale)
        assert torch.equal(out, want)
    # positions past the rotary table still meet the checks (no out-of-bounds read)
    short = lnn.RotaryEmbedding(32, max_positions=4)
    c = lnn.PagedKVCache(8, 4, 2, 32)
    sid = [c.add_sequence()]
    c.append(sid, torch.randn(1, 4, 2, 32), torch.randn(1, 4, 2, 32), q=torch.randn(1, 4, 4, 32), rotary=short)
    with pytest.raises(ValueError, match="positions"):
        c.append(sid, torch.randn(1, 1, 2, 32), torch.randn(1, 1, 2, 32), q=torch.randn(1, 1, 4, 32), rotary=short)
