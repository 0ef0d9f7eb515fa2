"""llmkern's ops have no backward: with inputs autograd tracks, every functional op's outputs are tracked and
backpropagating raises a clear error (torch's fallback warned and dropped the gradient: silently wrong
gradients in a model); the modules' prepared fast paths take the op then, and no-grad use is unchanged."""
import pytest
import torch

from llmkern import nn as lnn
from llmkern import ops

NO_BACKWARD = "has no backward"


def assert_no_backward(y):
    assert y.requires_grad
    with pytest.raises(RuntimeError, match=NO_BACKWARD):
        y.float().sum().backward()


def test_functional_ops_raise_on_backward():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 64, generator=g, requires_grad=True)
    q8, s8 = ops.quantize_int8(torch.randn(16, 64, generator=g))
    assert_no_backward(ops.int8_linear(x, q8, s8))
    q4, s4, o4 = ops.quantize_int4(torch.randn(16, 64, generator=g), 32)
    assert_no_backward(ops.int4_linear(x, q4, s4, o4))
    w = torch.nn.Parameter(torch.ones(64))
    assert_no_backward(ops.rms_norm(torch.randn(3, 64, generator=g), w))
    q = torch.randn(1, 5, 2, 32, generator=g, requires_grad=True)
    k = torch.randn(1, 5, 1, 32, generator=g)
    assert_no_backward(ops.attention(q, k, k, causal=True))
    qr, _ = ops.rotary_embedding(q, k, torch.arange(5).view(1, 5), ops.rotary_cos_sin(8, 32))
    assert_no_backward(qr)
    assert_no_backward(ops.decode_attention(q[:, 0], k, k, torch.tensor([5], dtype=torch.int32)))
    with torch.no_grad():
        assert not ops.int8_linear(x, q8, s8).requires_grad


@pytest.mark.parametrize("kind", ["int8", "int4", "rmsnorm"])
def test_modules_track_after_their_first_call(kind):
    """The first call prepares; later tracked calls must not take the prepared (untracked) run."""
    torch.manual_seed(1)
    lin = torch.nn.Linear(64, 24)
    m = (lnn.Int8Linear.from_linear(lin) if kind == "int8" else lnn.Int4Linear.from_linear(lin) if kind == "int4"
         else lnn.RMSNorm(64))
    if kind == "rmsnorm":
        m.weight.requires_grad_(False)
    x = torch.randn(2, 64)
    with torch.no_grad():
        want = m(x)
        m(x)  # (prepared / trusted now)
    for _ in range(2):
        xg = x.clone().requires_grad_(True)
        y = m(xg)
        assert torch.allclose(y, want, rtol=1e-5, atol=1e-6)
        assert_no_backward(y)
    if kind != "rmsnorm":
        prepared = m._run
        m(x.clone().requires_grad_(True))
        assert m._run is prepared  # (tracked calls do not re-prepare the weights)
    assert not m(x).requires_grad


def test_llama_decode_with_trainable_parameters_is_tracked():
    """The decode plan (a C++ step program, no autograd) steps aside while autograd would track the step."""
    from llmkern.models import Llama, ModelConfig
    from llmkern.nn import quantize_linears

    cfg = ModelConfig(vocab_size=50, hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                      intermediate_size=96, max_positions=32)
    torch.manual_seed(2)
    m = Llama(cfg).eval()
    quantize_linears(m, "int4")
    m.fuse_projections()
    tokens = torch.randint(0, 50, (1, 4))
    cache = m.new_cache(1, 16)
    with torch.no_grad():
        m(tokens, cache)
        for t in range(2):
            m(tokens[:, t:t + 1], cache, last_only=True)
    assert m.__dict__["_decode_plan"] is not None  # (it runs these steps without grad)
    assert m.embed_tokens.weight.requires_grad
    for t in range(2, 4):
        assert_no_backward(m(tokens[:, t:t + 1], cache, last_only=True))
