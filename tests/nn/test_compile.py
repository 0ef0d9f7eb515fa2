"""torch.compile(fullgraph=True) through the modules: Int8Linear, and an Attention decode step with a
KVCache (q/k/v projections, the fused rotary + in-place cache append, decode attention, o_proj), each
compared with eager.

Both use the inductor backend, the real compile path: it also runs the functionalization and
re-inplacing of the mutating kv_cache_append op. Cold, the two compiles take about 3 s and 10-20 s on
the shared 2-core machine (less with a warm inductor cache), within the test budget.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from llmkern import ops
from llmkern.nn import Attention, Int4Linear, Int8Linear, KVCache


@torch.no_grad()
def test_int8_linear_compiles_fullgraph():
    torch.manual_seed(0)
    m = Int8Linear.from_linear(nn.Linear(64, 33), group_size=32)
    cm = torch.compile(m, fullgraph=True, backend="inductor")
    for shape in [(3, 64), (2, 5, 64)]:
        x = torch.randn(shape)
        assert torch.equal(cm(x), m(x))


@pytest.mark.parametrize("kind", ["int8", "int4", "w4a8g"])
def test_released_module_compiles_fullgraph(kind):
    """A module whose eager calls let go of its canonical tensors (nn/linear.py _Releasable: int8 with the packed
    CPU layout, int4 with rows16 on AVX-512 BF16 or in a W4A8 mode with its layout) still compiles with fullgraph:
    the traced graph unpacks them itself (torch ops, ops/_unpack.py) and the module stays released. The compiled
    call is the op on those tensors."""
    torch.manual_seed(2)
    lin = nn.Linear(64, 33)
    m = (Int8Linear.from_linear(lin, group_size=32) if kind == "int8"
         else Int4Linear.from_linear(lin, mode="w4a16" if kind == "int4" else kind))
    x = torch.randn(3, 64)
    m(x)
    released = m._released is not None
    if not released:
        pytest.skip("nothing released on this CPU (no packed layout / no AVX-512 BF16)")
    canon = {k: v for k, v in m.state_dict().items() if k != "bias"}  # (unpacked into the result only)
    cm = torch.compile(m, fullgraph=True, backend="inductor")
    out = cm(x)
    assert m._released is not None
    if kind == "int8":
        want = ops.int8_linear(x, canon["weight"], canon["weight_scale"], m.bias)
    else:
        want = ops.int4_linear(x, canon["qweight"], canon["scales"], canon["offsets"], m.bias, m.mode)
    assert torch.equal(out, want)


@pytest.mark.parametrize("kind", ["int8", "w4a8g"])
def test_keep_canonical_gives_compile_the_buffers(kind):
    """keep_canonical() on a released module (llmkern.nn.keep_canonical on a model) rebuilds its canonical buffers
    and keeps them: the traced graph then reads them instead of unpacking a packed layout (no unpack op in it), with
    the same output; keep_canonical(False) lets the next eager call release them again."""
    from llmkern.nn import keep_canonical

    torch.manual_seed(3)
    lin = nn.Linear(64, 33)
    m = Int8Linear.from_linear(lin, group_size=32) if kind == "int8" else Int4Linear.from_linear(lin, mode=kind)
    x = torch.randn(3, 64)
    want = m(x)
    if m._released is None:
        pytest.skip("nothing released on this CPU (no packed layout)")
    graphs = []

    def backend(gm, inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    assert torch.equal(torch.compile(m, fullgraph=True, backend=backend)(x), want)
    assert "unpack" in graphs[-1] and m._released is not None
    assert keep_canonical(nn.Sequential(m)) == 1
    assert m._released is None and m._keep_canonical
    torch._dynamo.reset()
    assert torch.equal(torch.compile(m, fullgraph=True, backend=backend)(x), want)
    assert "unpack" not in graphs[-1] and m._released is None
    m(x)
    assert m._released is None  # (kept: eager calls no longer release)
    m.keep_canonical(False)
    assert torch.equal(m(x), want) and m._released is not None


@torch.no_grad()
def test_attention_decode_step_with_kv_cache_compiles_fullgraph():
    torch.manual_seed(1)
    att = Attention(80, 6, 2, 32, max_positions=64)
    B, Smax = 2, 10
    eager_cache, compiled_cache = KVCache(B, Smax, 2, 32), KVCache(B, Smax, 2, 32)
    prompt = torch.randn(B, 5, 80)
    att(prompt, eager_cache)
    att(prompt, compiled_cache)
    step = torch.compile(lambda x, cache: att(x, cache), fullgraph=True, backend="inductor")
    for _ in range(4):
        x = torch.randn(B, 1, 80)
        out_c, out_e = step(x, compiled_cache), att(x, eager_cache)
        assert torch.equal(out_c, out_e)
        assert torch.equal(compiled_cache.k, eager_cache.k) and torch.equal(compiled_cache.v, eager_cache.v)
        assert torch.equal(compiled_cache.seq_lens, eager_cache.seq_lens)
    # The capacity check cannot run inside the graph; back in eager it sees the compiled steps (9 + 2 > 10).
    assert compiled_cache.seq_lens.tolist() == [9, 9]
    with pytest.raises(ValueError, match="sequence 0 holds 9 tokens"):
        compiled_cache.append(torch.randn(B, 2, 2, 32), torch.randn(B, 2, 2, 32))
