"""The CUDA-graph decode step's bookkeeping (llmkern/models/cuda_graph.py), on the CPU with a stand-in graph.

A CUDA graph records kernels at capture without running them and replays them without running any Python. The
stand-in does the same to the caches' state: its capture runs the step's Python and then puts every cache tensor
back (nothing ran on the device), its replay runs the step again with the caches' host bookkeeping put back
afterwards (no Python ran) and writes the captured output tensor in place. What the tests check is what the
GraphedDecodeStep adds around that: the capture leaves the caches as they were, each replay advances the host
mirror as an eager step does, a full cache falls back to the eager step (and its error), outputs are copies, and
generate() gives the eager tokens. The real capture is tested on a GPU (tests/models/test_cuda_generate.py)."""
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
        saved = [{n: getattr(kv, n).clone() for n in _TENSORS if getattr(kv, n) is not None} for kv in step.cache]
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
        host = step._host_state()
        out = step.model(step.tokens, step.cache, last_only=True)
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
    # Paged caches (several prompts by default) and cuda_graph off: no capture.
    assert not generate(m, tok, prompts, max_new_tokens=5, chat=False, cuda_graph=True).stats["cuda_graph"]
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
