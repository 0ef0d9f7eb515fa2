"""Valid inputs at the edges of the kernels' reach (found by fuzzing): zero-size operands give the reference's
empty or zero results on the default backend (the cpu kernels have no data pointer to bind and fall back),
a head dim past the cpu append kernel's 256 falls back, and an in-place operand that overlaps itself is
refused instead of being written once per alias."""
import pytest
import torch

from llmkern import ops


def both(fn):
    """fn(backend) on the default backend and on the reference: equal results (tensors or None)."""
    got, want = fn(None), fn("reference")
    if isinstance(want, torch.Tensor):
        assert got.shape == want.shape and torch.equal(got, want)
    return got


def test_zero_size_operands_match_the_reference():
    x = torch.randn(2, 64)
    assert both(lambda b: ops.int8_linear(x, torch.zeros(0, 64, dtype=torch.int8), torch.zeros(0),
                                          backend=b)).shape == (2, 0)
    for mode in ("w4a16", "w4a8", "w4a8g"):
        assert both(lambda b: ops.int4_linear(x, torch.zeros(0, 32, dtype=torch.uint8), torch.zeros(0, 2),
                                              torch.zeros(0, 2), mode=mode, backend=b)).shape == (2, 0)
    lens0 = torch.zeros(2, dtype=torch.int32)
    out = both(lambda b: ops.decode_attention(torch.randn(2, 2, 64), torch.zeros(2, 0, 1, 64),
                                              torch.zeros(2, 0, 1, 64), lens0, backend=b))
    assert torch.all(out == 0)  # (no keys: zeros)
    both(lambda b: ops.decode_attention(torch.randn(2, 0, 64), torch.zeros(2, 4, 1, 64), torch.zeros(2, 4, 1, 64),
                                        torch.ones(2, dtype=torch.int32), backend=b))
    cs = ops.rotary_cos_sin(8, 64)
    q, k = torch.randn(3, 0, 64), torch.randn(3, 1, 64)
    qo, ko = ops.rotary_embedding(q, k, torch.arange(3), cs)
    qr, kr = ops.rotary_embedding(q, k, torch.arange(3), cs, backend="reference")
    assert qo.shape == (3, 0, 64) and torch.equal(ko, kr)
    empty = torch.zeros(0, 8, 2, 64)
    ops.kv_cache_append(torch.randn(1, 1, 2, 64), torch.randn(1, 1, 2, 64), empty, empty.clone(), torch.tensor([[-1]]))


def test_scalar_argument_types():
    """The eager fast path skips the dispatcher's schema parsing: the checks refuse what it would (a string as
    causal ran as True, a float window was truncated)."""
    q = torch.randn(1, 3, 2, 32)
    with pytest.raises(TypeError, match="causal must be a bool, got 'yes'"):
        ops.attention(q, q, q, causal="yes")
    with pytest.raises(TypeError, match="window_left must be an int, got 1.5"):
        ops.attention(q, q, q, window_left=1.5)
    with pytest.raises(TypeError, match="window_right must be an int, got '3'"):
        ops.attention(q, q, q, window_right="3")
    kc = torch.randn(1, 8, 2, 32)
    with pytest.raises(TypeError, match="window_left must be an int, got 2.0"):
        ops.decode_attention(q[:, 0], kc, kc, torch.tensor([5], dtype=torch.int32), window_left=2.0)


def test_append_head_dim_past_the_cpu_kernel():
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 2, 1, 300, generator=g), torch.randn(1, 2, 1, 300, generator=g)
    caches = [torch.zeros(1, 4, 1, 300) for _ in range(4)]
    ops.kv_cache_append(k, v, caches[0], caches[1], torch.tensor([[3, 1]]))
    ops.kv_cache_append(k, v, caches[2], caches[3], torch.tensor([[3, 1]]), backend="reference")
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    assert torch.equal(caches[0][0, 3], k[0, 0])


def test_append_refuses_an_expanded_q():
    """q is rotated in place: an expand()ed q (4 heads sharing one row) would be rotated 4 times."""
    cs = ops.rotary_cos_sin(16, 64)
    q = torch.randn(1, 1, 1, 64).expand(1, 1, 4, 64)
    kc, vc = torch.zeros(1, 4, 1, 64), torch.zeros(1, 4, 1, 64)
    before = q.clone()
    for backend in (None, "cpu", "reference"):
        with pytest.raises(ValueError, match="q is written in place and must not overlap itself"):
            ops.kv_cache_append(torch.randn(1, 1, 1, 64), torch.randn(1, 1, 1, 64), kc, vc, torch.tensor([[0]]),
                                q=q, positions=torch.tensor([[7]]), cos_sin_cache=cs, backend=backend)
    assert torch.equal(q, before) and torch.all(kc == 0)


def test_attention_with_an_infinite_score_is_nan_on_every_backend():
    """A +inf score makes softmax inf / inf: NaN outputs, on the cpu kernel and the reference alike (the reference
    gave +-inf)."""
    q = torch.zeros(1, 1, 1, 32)
    q[..., 0] = 1.0
    k, v = torch.randn(1, 3, 1, 32), torch.randn(1, 3, 1, 32)
    k[0, 1, 0, 0] = float("inf")
    for backend in ("cpu", "reference"):
        assert ops.attention(q, k, v, backend=backend).isnan().all(), backend


def test_values_vouched_skips_gpu_value_reads_only(monkeypatch):
    """values_vouched() is for llmkern's own GPU callers: CPU tensors' values are still checked under it."""
    from llmkern.ops._checks import can_read_values, values_vouched

    import types

    gpu_like = types.SimpleNamespace(device=torch.device("cuda"))  # (what can_read_values looks at)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # (CPU builds of torch raise)
    assert can_read_values(gpu_like)
    cs = ops.rotary_cos_sin(8, 64)
    q, k = torch.randn(3, 2, 64), torch.randn(3, 1, 64)
    with values_vouched():
        assert not can_read_values(gpu_like)
        assert can_read_values(torch.zeros(1))
        with pytest.raises(ValueError, match="positions must be in 0..7"):
            ops.rotary_embedding(q, k, torch.tensor([0, 1, 8]), cs)
        with values_vouched():
            pass
        assert not can_read_values(gpu_like)  # (nested: still vouched)
    assert can_read_values(gpu_like)


@pytest.mark.parametrize("backend", [None, "reference"])
def test_degenerate_cache_shapes_are_named(backend):
    """A paged cache with block size 0 and an append with head dim 0 used to fail deep inside (a C++ value check
    naming no argument; torch.reshape in the reference): now a ValueError names the argument."""
    kc = torch.zeros(6, 0, 2, 64)  # [num_blocks, block_size 0, Hk, D]
    bt = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"paged k_cache's block size .* must be in 1\.\.256, got 0"):
        ops.decode_attention(torch.randn(2, 4, 64), kc, kc.clone(), torch.zeros(2, dtype=torch.int32),
                             block_table=bt, backend=backend)
    k = torch.randn(2, 3, 2, 0)
    with pytest.raises(ValueError, match=r"k needs at least one head and a head dim >= 1, got \[\.\.\., Hk, D\] = \[2, 0\]"):
        ops.kv_cache_append(k, k.clone(), torch.zeros(2, 8, 2, 0), torch.zeros(2, 8, 2, 0),
                            torch.tensor([[0, 1, 2], [8, 9, 10]]), backend=backend)


def test_empty_ranges_are_named_not_printed_as_ranges():
    """Messages that used to print empty ranges ("positions must be in 0..-1", "rotary dim ... in 2..0")."""
    with pytest.raises(ValueError, match=r"cos_sin_cache has no rows \(one per position\), got shape \[0, 64\]"):
        ops.rotary_embedding(torch.randn(5, 4, 64), torch.randn(5, 2, 64), torch.arange(5), torch.zeros(0, 64))
    with pytest.raises(ValueError, match="rotary needs a head dim of at least 2 \\(one pair\\), got 0"):
        ops.rotary_embedding(torch.randn(5, 4, 0), torch.randn(5, 2, 0), torch.arange(5), torch.zeros(16, 2))
    with pytest.raises(ValueError, match=r"k/v heads \(0\), which must be at least 1"):
        ops.attention(torch.randn(2, 5, 0, 64), torch.randn(2, 7, 0, 64), torch.randn(2, 7, 0, 64))
