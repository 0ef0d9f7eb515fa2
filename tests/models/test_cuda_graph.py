"""The CUDA-graph decode step's bookkeeping (llmkern/models/cuda_graph.py), on the CPU with a stand-in graph.

A CUDA graph records kernels at capture without running them and replays them without running any Python. The
stand-in does the same to the caches' state: its capture runs the step's Python and then puts every cache tensor
back (nothing ran on the device), its replay runs the step again with the caches' host bookkeeping put back
afterwards (no Python ran) and writes the captured output tensor in place. What the tests check is what the
GraphedDecodeStep adds around that: the capture leaves the caches as they were, each replay advances the host
mirror as an eager step does, a full cache falls back to the eager step (and its error), outputs are copies, and
generate() gives the eager tokens. Paged caches: the caches bound to one PagedSteps while captured, its tensors refreshed before each replay and the
sequences' lengths advanced after. The real capture is tested on a GPU (tests/models/test_cuda_generate.py)."""
from __future__ import annotations

import contextlib

import pytest
import torch

from llmkern.models import cuda_graph
from llmkern.models.cuda_graph import GraphedDecodeStep
from llmkern.models.generate import generate

from test_decode_plan import tiny  # noqa: E402  (a 3-layer random model, quantized and fused)


class FakeGraphs:
    def __init__(self):
        self.captures = self.replays = 0

    def __call__(self):
        return _FakeGraph(self)

    @contextlib.contextmanager
    def capture(self, graph, step):
        saved = [{n: getattr(kv, n).clone() for n in _TENSORS if isinstance(getattr(kv, n, None), torch.Tensor)}
                 for kv in step.cache]
        graph.step = step
        self.captures += 1
        yield
        for kv, tensors in zip(step.cache, saved):  # (a capture runs no kernel)
            for n, t in tensors.items():
                getattr(kv, n).copy_(t)


_TENSORS = ("k", "v", "k_scale", "v_scale", "seq_lens", "_next")


class _FakeGraph:
    def __init__(self, owner):
        self.owner, self.step = owner, None

    def replay(self):
        step = self.step
        host = step._host_state() if step.ids is None else None  # (paged: bound caches do no host work)
        out = step._run(step.cache, step.steps, step.ids)
        if host is not None:
            step._restore_host_state(host)  # (a replay runs no Python)
        step.logits.copy_(out)
        self.owner.replays += 1


def eager_steps(m, prompt, steps, **kw):
    cache = m.new_cache(prompt.shape[0], 12, **kw)
    out = [m(prompt, cache, last_only=True)]
    for _ in range(steps):
        out.append(m(out[-1].argmax(-1).view(-1, 1), cache, last_only=True))
    return out, cache


@pytest.mark.parametrize("kv_int8", [False, True])
def test_graphed_steps_equal_eager_ones(kv_int8):
    m = tiny(quant="int4")
    prompt = torch.randint(0, 101, (2, 4))
    with torch.inference_mode():
        want, want_cache = eager_steps(m, prompt, 8, int8=kv_int8)
        cache = m.new_cache(2, 12, int8=kv_int8)
        got = [m(prompt, cache, last_only=True)]
        got.append(m(got[-1].argmax(-1).view(-1, 1), cache, last_only=True))  # (an eager step first)
        fake = FakeGraphs()
        before = [(kv.seq_lens.clone(), kv._host_max, kv._host().clone()) for kv in cache]
        step = GraphedDecodeStep(m, cache, 2, "cpu", fake).capture()
        for kv, (lens, mx, host) in zip(cache, before):  # the capture changed nothing
            assert torch.equal(kv.seq_lens, lens) and kv._host_max == mx and torch.equal(kv._host(), host)
        for _ in range(7):
            got.append(step(got[-1].argmax(-1)))
        assert fake.replays == 7
        assert got[-1] is not step.logits and got[-2] is not got[-1]  # (copies: the buffer is overwritten)
        for g, w in zip(got, want):
            assert torch.equal(g, w)
        for kv, ref in zip(cache, want_cache):  # caches and their host mirrors as after eager steps
            assert torch.equal(kv.seq_lens, ref.seq_lens) and torch.equal(kv.k, ref.k)
            assert kv._host_max == ref._host_max and torch.equal(kv._host(), ref._host()) and kv._last == ref._last
        # Full (4 + 1 + 7 = 12 tokens): the step declines (None, nothing run) and the eager step raises the
        # cache's own error.
        assert cache[0]._host_max == cache[0].max_seq_len == 12
        assert step(got[-1].argmax(-1)) is None and fake.replays == 7
        with pytest.raises(ValueError, match="KV cache full"):
            m(got[-1].argmax(-1).view(-1, 1), cache, last_only=True)


def test_generate_with_a_graph_gives_the_eager_tokens(monkeypatch):
    from _tiny_gguf import MERGES, tiny_vocab
    from llmkern.models import Tokenizer

    tokens, types = tiny_vocab()
    tok = Tokenizer(tokens, MERGES, types, pre="smollm", bos_id=0, eos_id=2)
    m = tiny(quant="int4")
    prompts = [[5, 70, 9, 33], [41, 7]]
    eager = generate(m, tok, prompts, max_new_tokens=9, chat=False, paged=False, stop_ids=[])
    assert not eager.stats["cuda_graph"]
    fake = FakeGraphs()
    monkeypatch.setattr(cuda_graph, "GRAPH_FACTORY", fake)
    graphed = generate(m, tok, prompts, max_new_tokens=9, chat=False, paged=False, cuda_graph=True, stop_ids=[])
    assert graphed.stats["cuda_graph"] and fake.captures == 1 and fake.replays == 9 - 1 - 2  # (2 eager steps)
    assert graphed.tokens == eager.tokens
    assert "CUDA graph" in graphed.summary()
    # cuda_graph off (the default without LLMKERN_CUDA_GRAPH=1): no capture.
    assert not generate(m, tok, prompts, max_new_tokens=5, chat=False, paged=False).stats["cuda_graph"]
    assert fake.captures == 1


def test_a_failed_capture_decodes_eagerly(monkeypatch, caplog):
    from _tiny_gguf import MERGES, tiny_vocab
    from llmkern.models import Tokenizer

    class Broken(FakeGraphs):
        def capture(self, graph, step):
            raise RuntimeError("operation not permitted when stream is capturing")

    tokens, types = tiny_vocab()
    tok = Tokenizer(tokens, MERGES, types, pre="smollm", bos_id=0, eos_id=2)
    m = tiny(quant="int4")
    eager = generate(m, tok, [[5, 70, 9]], max_new_tokens=6, chat=False, stop_ids=[])
    monkeypatch.setattr(cuda_graph, "GRAPH_FACTORY", Broken())
    with caplog.at_level("WARNING", logger="llmkern"):
        res = generate(m, tok, [[5, 70, 9]], max_new_tokens=6, chat=False, cuda_graph=True, stop_ids=[])
    assert not res.stats["cuda_graph"] and res.tokens == eager.tokens
    assert "could not be captured (RuntimeError: operation not permitted" in caplog.text


def test_applies_only_to_gpu_contiguous_no_grad():
    m = tiny(quant="int4")
    cache = m.new_cache(2, 8)
    with torch.inference_mode():
        assert not cuda_graph.applies(m, cache, torch.zeros(2, 1, dtype=torch.long))  # (CPU tokens)


def paged_caches(m, prompts):
    """Paged caches of 4-token blocks holding `prompts` (lists of ids, prefilled one by one) and their ids."""
    caches = m.new_cache(paged=True, block_size=4, num_blocks=16)
    ids = [[c.add_sequence() for _ in prompts] for c in caches][0]
    first = []
    for sid, p in zip(ids, prompts):
        first.append(m(torch.tensor([p]), caches, seq_ids=[sid], last_only=True))
    return caches, ids, torch.cat(first)


def test_paged_graphed_steps_equal_eager_ones(monkeypatch):
    """B = 2 sequences of different lengths over 4-token blocks: steps that start new blocks (allocated by
    PagedSteps.prepare before each replay) and fill old ones; the same logits, blocks and lengths as eager steps
    (the module path's: on the CPU the eager steps would otherwise run the step program, whose silu rounds
    differently; on a GPU there is no step program)."""
    monkeypatch.setenv("LLMKERN_DECODE_PROGRAM", "0")
    m = tiny(quant="int4")
    prompts = [[5, 9, 13, 2, 7], [41, 3]]
    with torch.inference_mode():
        want_c, ids, out = paged_caches(m, prompts)
        want = [out]
        for _ in range(9):
            want.append(m(want[-1].argmax(-1).view(-1, 1), want_c, seq_ids=ids, last_only=True))
        caches, ids2, out = paged_caches(m, prompts)
        assert ids2 == ids
        got = [out, m(out.argmax(-1).view(-1, 1), caches, seq_ids=ids, last_only=True)]
        fake = FakeGraphs()
        before = [c.k.clone() for c in caches]
        step = GraphedDecodeStep(m, caches, 2, "cpu", fake, seq_ids=ids).capture()
        assert all(torch.equal(c.k, b) for c, b in zip(caches, before)) and all(c._bound is None for c in caches)
        assert [caches[0]._seqs[i].length for i in ids] == [6, 3]  # (the capture counted no token)
        for _ in range(8):
            got.append(step(got[-1].argmax(-1)))
        for g, w in zip(got, want):
            assert torch.equal(g, w)
        for c, w in zip(caches, want_c):
            assert [c._seqs[i].length for i in ids] == [w._seqs[i].length for i in ids] == [14, 11]
            assert [c._seqs[i].blocks for i in ids] == [w._seqs[i].blocks for i in ids]
            assert torch.equal(c.k, w.k) and torch.equal(c.v, w.v)
        # A call that is not the bound step's is refused while bound (the capture binds, then unbinds).
        caches[0]._bound = step.steps
        with pytest.raises(RuntimeError, match="bound to a graphed decode step"):
            caches[0].append([ids[0]], torch.randn(1, 1, 2, 32), torch.randn(1, 1, 2, 32))
        caches[0]._bound = None


def test_paged_generate_with_a_graph_recaptures_when_the_batch_shrinks(monkeypatch):
    """generate()'s default for several prompts (paged caches): graphed steps give the eager tokens; when a
    prompt finishes and leaves the batch the graph (of the old batch) is dropped and, after two eager steps,
    the smaller batch is captured again."""
    from _tiny_gguf import MERGES, tiny_vocab
    from llmkern.models import Tokenizer

    monkeypatch.setenv("LLMKERN_DECODE_PROGRAM", "0")  # (eager steps on the module path, as on a GPU: same bits)
    tokens, types = tiny_vocab()
    tok = Tokenizer(tokens, MERGES, types, pre="smollm", bos_id=0, eos_id=2)
    m = tiny(quant="int4")
    prompts = [[5, 70, 9, 33], [41, 7]]
    free = generate(m, tok, prompts, max_new_tokens=16, chat=False, stop_ids=[])
    # a token that first ends prompt 1 after its graph was captured (3 steps in), and never appears in prompt 0's
    stop = next(t for t in free.tokens[1][3:8] if t not in free.tokens[0] and t not in free.tokens[1][:3])
    eager = generate(m, tok, prompts, max_new_tokens=16, chat=False, stop_ids=[stop])
    assert eager.finish_reasons == ["length", "stop"]
    fake = FakeGraphs()
    monkeypatch.setattr(cuda_graph, "GRAPH_FACTORY", fake)
    graphed = generate(m, tok, prompts, max_new_tokens=16, chat=False, stop_ids=[stop], cuda_graph=True)
    assert graphed.stats["paged"] and graphed.tokens == eager.tokens and graphed.finish_reasons == eager.finish_reasons
    assert fake.captures == 2 and graphed.stats["cuda_graph_steps"] == fake.replays > 0


def test_a_changed_weight_ends_the_graph():
    """The graph holds the pointers of every weight, prepared copy and cache tensor it captured: after one of
    them is replaced (a parameter assigned, a quantized linear's prepared run dropped by .to() / a read of a
    released GPU Int4Linear's buffers) it is not replayed again (None: the caller's eager step runs)."""
    m = tiny(quant="int4")
    prompt = torch.randint(0, 101, (1, 4))
    with torch.inference_mode():
        cache = m.new_cache(1, 12)
        out = m(prompt, cache, last_only=True)
        step = GraphedDecodeStep(m, cache, 1, "cpu", FakeGraphs()).capture()
        assert step(out.argmax(-1)) is not None
        m.norm.weight = torch.nn.Parameter(m.norm.weight.detach().clone())
        assert step(out.argmax(-1)) is None and step.dead
        step2 = GraphedDecodeStep(m, cache, 1, "cpu", FakeGraphs()).capture()
        assert step2(out.argmax(-1)) is not None
        m.layers[0].mlp.down_proj._invalidate_packed()  # (what .to(), load_state_dict or a buffer read do)
        assert step2(out.argmax(-1)) is None
