"""Decode steps over paged caches that the decode plan does not take (every GPU step; the CPU without the step
program) share one PagedSteps across layers (Llama._paged_steps: caches bound to it, PagedKVCache._bound): bit
for bit the per-layer path (each cache building its own slots and tables), with the same block lists; a step
PagedSteps will not prepare (a forked sequence's shared block, a full cache) is the per-layer path's, with its
copy on write and its error."""
import pytest
import torch

from llmkern.models import Llama
from test_decode_plan import tiny  # noqa: E402  (a 3-layer random model, quantized and fused)


def run(m, shared: bool, steps: int = 9):
    caches = m.new_cache(paged=True, block_size=4, num_blocks=9)
    a = [c.add_sequence() for c in caches][0]
    m.__dict__.pop("_steps", None)
    m(torch.tensor([[5, 9, 13, 2, 7, 30]]), caches, seq_ids=[a], last_only=True)  # a: 6 tokens, blocks 0, 1
    b = [c.fork(a) for c in caches][0]  # shares a's half-full block 1: the first step copies it (per-layer path)
    nxt, out, used = torch.tensor([[3], [9]]), [], []
    with pytest.MonkeyPatch.context() as mp:
        if not shared:
            mp.setattr(Llama, "_paged_steps", lambda self, cache, ids: None)
        for _ in range(steps):
            out.append(m(nxt, caches, seq_ids=[a, b], last_only=True))
            st = m.__dict__.get("_steps")
            used.append(st is not None and not st.stale)  # (this step ran on the shared step tensors)
            nxt = out[-1].argmax(-1, keepdim=True)
    return torch.stack(out), caches, (a, b), used


def test_shared_step_tensors_equal_the_per_layer_path(monkeypatch):
    monkeypatch.setenv("LLMKERN_DECODE_PROGRAM", "0")  # (no step program: the plan leaves paged steps alone)
    m = tiny(quant="int4")
    with torch.inference_mode():
        got, caches, (a, b), used = run(m, True)
        want, ref, _, _ = run(m, False)
        assert used[0] is False and all(used[1:])  # (the copy-on-write step went to the per-layer path)
        monkeypatch.setenv("LLMKERN_PAGED_STEPS", "0")  # the switch: the per-layer path throughout
        off, _, _, used_off = run(m, True)
        assert not any(used_off) and torch.equal(off, want)
        assert torch.equal(got, want)
        for c, r in zip(caches, ref):
            assert [(c._seqs[i].length, c._seqs[i].blocks) for i in (a, b)] == \
                   [(r._seqs[i].length, r._seqs[i].blocks) for i in (a, b)]
            assert torch.equal(c.k, r.k) and torch.equal(c.v, r.v) and c._bound is None
        # Steps until the 9 blocks run out: the shared path declines (prepare) and the per-layer path raises
        # its error with nothing changed.
        with pytest.raises(ValueError, match="PagedKVCache full"):
            for _ in range(12):
                n = caches[0]._seqs[a].length
                m(torch.tensor([[1], [2]]), caches, seq_ids=[a, b], last_only=True)
        assert all(c.num_free_blocks < 2 and c._seqs[a].length == n == c._seqs[b].length and c._bound is None
                   for c in caches)


def test_a_copy_of_the_model_leaves_its_step_state_behind():
    import copy

    m = tiny(quant="int4")
    with torch.inference_mode():
        caches = m.new_cache(paged=True, block_size=4, num_blocks=4)
        a = [c.add_sequence() for c in caches][0]
        m(torch.tensor([[5, 9]]), caches, seq_ids=[a], last_only=True)
        m(torch.tensor([[3]]), caches, seq_ids=[a], last_only=True)
        assert m.__dict__.get("_decode_plan") is not None or m.__dict__.get("_steps") is not None
        c = copy.deepcopy(m)
        assert "_decode_plan" not in c.__dict__ and "_steps" not in c.__dict__
        x = torch.tensor([[5, 9, 3]])
        assert torch.equal(c(x), m(x))


def test_caches_of_another_dtype_or_geometry_take_the_checked_path(monkeypatch):
    """Bound caches skip the per-call checks, so the shared step tensors are only used for caches of the model's
    dtype and geometry: others get the per-layer path's errors (they computed garbage, reading a bf16 cache as
    fp32 or writing 2 heads into 1-head slots)."""
    from llmkern.nn import PagedKVCache

    monkeypatch.setenv("LLMKERN_DECODE_PROGRAM", "0")
    m = tiny(quant="int4")
    c = m.config
    with torch.inference_mode():
        for kw, err in ((dict(dtype=torch.bfloat16), "dtype"), (dict(num_kv_heads=1), "shape")):
            heads = kw.pop("num_kv_heads", c.num_kv_heads)
            caches = [PagedKVCache(8, 4, heads, c.head_dim, **kw) for _ in m.layers]
            a = [cc.add_sequence() for cc in caches][0]
            with pytest.raises((TypeError, ValueError), match=err):
                m(torch.tensor([[5, 9, 13]]), caches, seq_ids=[a], last_only=True)
                m(torch.tensor([[3]]), caches, seq_ids=[a], last_only=True)
            assert all(cc._bound is None for cc in caches)


def test_a_failed_step_then_a_fork_copies_the_block_allocated_ahead(monkeypatch):
    """A step whose block PagedSteps allocated ahead (the next token starts a block) and then raised (a token out
    of the vocabulary) leaves that empty block to the sequence; a fork then shares it, and the next append must
    copy it on write (it wrote both sequences' tokens into one block)."""
    monkeypatch.setenv("LLMKERN_DECODE_PROGRAM", "0")
    m = tiny(quant="int4")

    def run(fail):
        caches = m.new_cache(paged=True, block_size=4, num_blocks=12)
        a = [cc.add_sequence() for cc in caches][0]
        m.__dict__.pop("_steps", None)
        m(torch.tensor([[5, 9, 13, 2]]), caches, seq_ids=[a], last_only=True)  # one full block
        if fail:
            with pytest.raises(ValueError, match="tokens must be in"):
                m(torch.tensor([[10 ** 6]]), caches, seq_ids=[a], last_only=True)
            assert len(caches[0]._seqs[a].blocks) == 2 and caches[0]._seqs[a].length == 4  # (the block ahead)
        b = [cc.fork(a) for cc in caches][0]
        outs, nxt = [], torch.tensor([[3], [60]])
        for _ in range(3):
            outs.append(m(nxt, caches, seq_ids=[a, b], last_only=True))
            nxt = torch.tensor([[7], [11]])
        assert caches[0]._seqs[a].blocks[1] != caches[0]._seqs[b].blocks[1]
        return torch.stack(outs)

    with torch.inference_mode():
        assert torch.equal(run(True), run(False))


def test_weight_bytes_count_the_cuda_runs_packed_tensors():
    """A GPU Int4Linear's prepared run lists its packed copies as a (weights, scales, scale16) tuple: the decode
    bytes count those tensors (it raised AttributeError at the end of every GPU generate())."""
    import types

    from llmkern.nn import Int4Linear

    m = tiny(quant="int4")
    lin = next(mod for mod in m.modules() if isinstance(mod, Int4Linear))
    before = m.weight_bytes_per_token()
    canonical = sum(t.numel() * t.element_size() for n, t in lin.named_buffers() if n != "bias")
    qp, sp = torch.zeros(1000, dtype=torch.uint8), torch.zeros(96, dtype=torch.uint8)
    lin.__dict__["_run"] = types.SimpleNamespace(impl=types.SimpleNamespace(packed=(qp, sp, True)))
    assert m.weight_bytes_per_token() == before - canonical + 1096
