"""The runtime's decode step as one CUDA graph (`GraphedDecodeStep`), for generate() on a GPU.

Why: a decode step of a small model on a GPU is a few hundred kernel launches of microseconds each, issued one by
one from Python (each op: a registry lookup, an adapter, a pybind call; SmolLM2-135M: ~10 per layer, 30 layers);
the GPU idles between them. Captured once, the step is one `graph.replay()`: the same kernels on the same
pointers, launched by the driver back to back. This is what vLLM, SGLang and gpt-fast do for decode.

What makes the step replayable as captured: over contiguous `KVCache`s a one-token step reads and advances only
device state (the next positions and slots `_next`, `seq_lens`: in-place adds, recorded in the graph); its host
bookkeeping (lengths mirror, capacity) is Python, which a replay does not run, so `__call__` checks the capacity
on the host first and advances the mirror after (`KVCache._advance_one(counters=False)`), and the capture's own
Python-side advance is undone. Kernel choices made on the host (split counts, workspaces) depend on the caches'
capacity, not on their lengths, so they hold for every step. Ops skip their value checks while capturing.

Scope: generate()'s own loop, where the model and the caches do not change between steps (the graph holds raw
pointers to every weight, prepared copy and cache); contiguous caches (one prompt, or a batch with paged=False);
tokens [B, 1] on one GPU; no autograd. Captured after a couple of eager steps (weights prepared, kernels compiled),
with one warm-up step on scratch caches on the capture stream. The logits are a static buffer that each replay
overwrites: __call__ returns a copy.

Never run on a GPU yet: off by default (`generate(cuda_graph=True)`, `llmkern generate --cuda-graph`,
LLMKERN_CUDA_GRAPH=1); tests/models/test_cuda_generate.py compares it with eager steps there, and the tests here
check its bookkeeping on the CPU with a stand-in graph that replays the step's Python the way a graph replays
its kernels (`graph_factory`).
"""
from __future__ import annotations

import torch

from .. import nn as lnn

# generate()'s graph factory: None for torch.cuda.CUDAGraph (tests set a CPU stand-in: see GraphedDecodeStep)
GRAPH_FACTORY = None


def applies(model, cache, tokens) -> bool:
    """The step can be graphed: tokens [B, 1] on a GPU, every layer's cache a contiguous KVCache for B sequences
    on that GPU, no autograd."""
    return (tokens.is_cuda and tokens.dim() == 2 and tokens.shape[1] == 1 and isinstance(cache, list)
            and len(cache) == len(model.layers)
            and all(type(kv) is lnn.KVCache and kv.batch_size == tokens.shape[0] and kv.device == tokens.device
                    for kv in cache)
            and not torch.is_grad_enabled())


class GraphedDecodeStep:
    """`model(tokens [B, 1], cache, last_only=True)` captured once (`capture`), replayed by `__call__`.

    graph_factory: None for torch.cuda.CUDAGraph; tests pass a stand-in: `factory()` -> a graph with `.replay()`,
    `factory.capture(graph, step)` -> its capture context (given this object, to replay its step).
    """

    def __init__(self, model, cache: list, batch: int, device, graph_factory=None):
        self.model, self.cache, self.batch, self.device = model, cache, batch, torch.device(device)
        self.factory = graph_factory
        self.tokens = torch.zeros((batch, 1), dtype=torch.long, device=self.device)  # the graph's input
        self.logits = None  # its output (a buffer of the graph's memory pool)
        self.graph = None
        self.rows = model.rotary.cos_sin_cache.shape[0]  # positions the rotary table holds

    # ------------------------------------------------------------------ capture

    def _host_state(self) -> list:
        return [(kv._host_lens, kv._host_add, kv._host_max, kv._last) for kv in self.cache]

    def _restore_host_state(self, state) -> None:
        for kv, (lens, add, mx, last) in zip(self.cache, state):
            kv._host_lens, kv._host_add, kv._host_max, kv._last = lens, add, mx, last

    def capture(self) -> "GraphedDecodeStep":
        """Warm up on scratch caches (same batch, on the capture stream), then capture the step over the real
        caches. Nothing of the real caches changes: the capture records the kernels without running them,
        and the Python-side bookkeeping it did is undone. Raises what the capture raised."""
        if not self.room():
            raise RuntimeError("GraphedDecodeStep: a cache has no room for another token")
        model, real = self.model, self._host_state()
        scratch = model.new_cache(self.batch, 2, device=self.device)
        try:
            if self.factory is None:
                with torch.cuda.device(self.device):
                    stream = torch.cuda.Stream()
                    stream.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(stream):  # (lazy set-up on the capture stream, outside the capture)
                        model(self.tokens, scratch, last_only=True)
                    torch.cuda.current_stream().wait_stream(stream)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, stream=stream):
                        self.logits = model(self.tokens, self.cache, last_only=True)  # [B, V]
            else:
                model(self.tokens, scratch, last_only=True)
                graph = self.factory()
                with self.factory.capture(graph, self):
                    self.logits = model(self.tokens, self.cache, last_only=True)
        finally:
            self._restore_host_state(real)
        self.graph = graph
        return self

    # ------------------------------------------------------------------ replay

    def room(self) -> bool:
        """Every cache has room for one more token within its capacity and the rotary table (else the caller
        takes the module path, which raises the cache's own error)."""
        for kv in self.cache:
            if kv._host_lens is None:
                kv._host()  # (only after a compiled call: then re-read once)
            if kv._host_max + 1 > kv.max_seq_len or kv._host_max + 1 > self.rows:
                return False
        return True

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """Logits [B, V] (a new tensor) of one decode step of `tokens` [B, 1] (or [B]), or None when a cache
        is full (nothing was run)."""
        if not self.room():
            return None
        self.tokens.copy_(tokens.view(self.batch, 1))
        self.graph.replay()
        for kv in self.cache:
            kv._advance_one(counters=False)  # (the replay advanced seq_lens and _next on the device)
        return self.logits.clone()

