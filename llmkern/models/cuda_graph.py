"""The runtime's decode step as one CUDA graph (`GraphedDecodeStep`), for generate() on a GPU.

Why: a decode step of a small model on a GPU is a few hundred kernel launches of microseconds each, issued one by
one from Python (each op: a registry lookup, an adapter, a pybind call; SmolLM2-135M: ~10 per layer, 30 layers);
the GPU idles between them. Captured once, the step is one `graph.replay()`: the same kernels on the same
pointers, launched by the driver back to back. This is what vLLM, SGLang and gpt-fast do for decode.

What makes the step replayable as captured: over contiguous `KVCache`s a one-token step reads and advances only
device state (the next positions and slots `_next`, `seq_lens`: in-place adds, recorded in the graph); its host
bookkeeping (lengths mirror, capacity) is Python, which a replay does not run, so `__call__` checks the capacity
on the host first and advances the mirror after (`KVCache._advance_one(counters=False)`), and the capture's own
Python-side advance is undone. Over `PagedKVCache`s the host builds each step's slots and block table: every
layer's cache is bound (during the capture) to one `PagedSteps`, whose device tensors the captured kernels read
and which `__call__` refreshes before each replay (the CPU step program shares them across layers the same way).
Kernel choices made on the host (split counts, workspaces) depend on the caches' capacity, not on their
lengths, so they hold for every step. Ops skip their value checks while capturing.

Scope: generate()'s own loop, where the model and the caches do not change between steps (the graph holds raw
pointers to every weight, prepared copy and cache; generate() captures again when finished prompts leave a paged
batch); tokens [B, 1] on one GPU; no autograd. Captured after a couple of eager steps (weights prepared,
kernels compiled), with one warm-up step on scratch caches on the capture stream. The logits are a static
buffer that each replay overwrites: __call__ returns a copy.

Off by default (`generate(cuda_graph=True)`, `llmkern generate --cuda-graph`, LLMKERN_CUDA_GRAPH=1): on the first
GPU run (H200, 2026-11-29) generate() with it gave the eager tokens, but one bit-for-bit comparison with eager
steps (contiguous bf16 caches) failed: most likely the eager side's doing (a GPU Int4Linear's first call ran other
kernels than its later ones; fixed in session 16, docs/notes/gpu-run-2026-11-29.md); the next GPU run confirms.
tests/models/test_cuda_generate.py compares it with eager steps there, and the tests here
check its bookkeeping on the CPU with a stand-in graph that replays the step's Python the way a graph replays
its kernels (`graph_factory`).
"""
from __future__ import annotations

import torch

from .. import nn as lnn
from .decode_plan_paged import PagedSteps

# generate()'s graph factory: None for torch.cuda.CUDAGraph (tests set a CPU stand-in: see GraphedDecodeStep)
GRAPH_FACTORY = None


def applies(model, cache, tokens, seq_ids=None) -> bool:
    """The step can be graphed: tokens [B, 1] on a GPU, no autograd, and every layer's cache either a contiguous
    KVCache for B sequences (seq_ids None) or a PagedKVCache holding the B sequences seq_ids with the same
    blocks in every layer (PagedSteps.compatible), on that GPU."""
    if not (tokens.is_cuda and tokens.dim() == 2 and tokens.shape[1] == 1 and isinstance(cache, list)
            and len(cache) == len(model.layers) and cache and not torch.is_grad_enabled()):
        return False
    B = tokens.shape[0]
    if seq_ids is None:
        return all(type(kv) is lnn.KVCache and kv.batch_size == B and kv.device == tokens.device for kv in cache)
    ids = list(seq_ids)
    return len(ids) == B and PagedSteps.compatible(cache, ids, model, tokens.device)


class GraphedDecodeStep:
    """`model(tokens [B, 1], cache, seq_ids=seq_ids, last_only=True)` captured once (`capture`), replayed by
    `__call__`. Contiguous KVCaches (seq_ids None), or PagedKVCaches: then the step's slots, positions, lengths
    and block table are the device tensors of one PagedSteps (models/decode_plan_paged.py) that every layer's
    cache reads while bound to it (PagedKVCache._bound); before each replay its `prepare` allocates the blocks
    the new tokens start and refreshes them (one asynchronous copy each), after it `advance` counts the token.

    graph_factory: None for torch.cuda.CUDAGraph; tests pass a stand-in: `factory()` -> a graph with `.replay()`,
    `factory.capture(graph, step)` -> its capture context (given this object, to replay its step).
    """

    def __init__(self, model, cache: list, batch: int, device, graph_factory=None, seq_ids=None):
        self.model, self.cache, self.batch, self.device = model, cache, batch, torch.device(device)
        self.ids = None if seq_ids is None else list(seq_ids)
        self.factory = graph_factory
        self.tokens = torch.zeros((batch, 1), dtype=torch.long, device=self.device)  # the graph's input
        self.device = self.tokens.device  # "cuda" -> "cuda:<current>", as the caches' devices are
        self.logits = None  # its output (a buffer of the graph's memory pool)
        self.graph = None
        self.steps = None  # paged: the PagedSteps the caches read while bound
        self.dead = False  # a step it could not take (paged: not prepared; a weight or cache changed) ends it
        self._watch = []  # (dict, key, object) slots the graph depends on, checked by identity before a replay
        self.rows = model.rotary.cos_sin_cache.shape[0]  # positions the rotary table holds

    # ------------------------------------------------------------------ capture

    def _host_state(self) -> list:
        return [(kv._host_lens, kv._host_add, kv._host_max, kv._last) for kv in self.cache]

    def _restore_host_state(self, state) -> None:
        for kv, (lens, add, mx, last) in zip(self.cache, state):
            kv._host_lens, kv._host_add, kv._host_max, kv._last = lens, add, mx, last

    def _run(self, cache, steps, ids):
        """The step over `cache` (bound to `steps` when paged), as captured."""
        if steps is None:
            return self.model(self.tokens, cache, last_only=True)  # [B, V]
        with steps.bound():
            return self.model(self.tokens, cache, seq_ids=ids, last_only=True)

    def _scratch(self):
        """(caches, PagedSteps or None, ids) of the same kind and batch, for the warm-up step."""
        if self.ids is None:
            return self.model.new_cache(self.batch, 2, int8=self.cache[0].int8, device=self.device), None, None
        c0 = self.cache[0]
        scratch = self.model.new_cache(paged=True, block_size=c0.block_size, num_blocks=self.batch, int8=c0.int8,
                                       device=self.device)
        ids = [[c.add_sequence() for _ in range(self.batch)] for c in scratch][0]
        steps = PagedSteps(scratch, ids)
        steps.prepare(self.rows)
        return scratch, steps, ids

    def capture(self) -> "GraphedDecodeStep":
        """Warm up on scratch caches (same kind and batch, on the capture stream), then capture the step over the
        real caches. Nothing of the real caches changes: the capture records the kernels without running them,
        the Python-side bookkeeping it did is undone (contiguous) or never done (paged: bound), and the blocks
        PagedSteps.prepare allocates are the ones the next step needs anyway. Raises what the capture raised."""
        if self.ids is not None:
            self.steps = PagedSteps(self.cache, self.ids)
            if not self.steps.prepare(self.rows):
                raise RuntimeError("GraphedDecodeStep: the paged caches cannot take the next step's tokens "
                                   "(full, a shared block or disagreeing layers)")
        elif not self.room():
            raise RuntimeError("GraphedDecodeStep: a cache has no room for another token")
        real = self._host_state() if self.ids is None else None
        scratch = self._scratch()
        try:
            if self.factory is None:
                with torch.cuda.device(self.device):
                    stream = torch.cuda.Stream()
                    stream.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(stream):  # (lazy set-up on the capture stream, outside the capture)
                        self._run(*scratch)
                    torch.cuda.current_stream().wait_stream(stream)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, stream=stream):
                        self.logits = self._run(self.cache, self.steps, self.ids)  # [B, V]
            else:
                self._run(*scratch)
                graph = self.factory()
                with self.factory.capture(graph, self):
                    self.logits = self._run(self.cache, self.steps, self.ids)
        finally:
            if real is not None:
                self._restore_host_state(real)
        self.graph = graph
        self._watch = self._watched()
        return self

    def _watched(self) -> list:
        """What the captured kernels' pointers come from: each quantized linear's prepared run (its packed or bound
        copies: any change of its buffers drops it), the parameters and buffers of every other module, each
        cache's tensors. A weight assigned, loaded or moved, a released Int4Linear's buffers read back or a cache
        replaced puts another object in one of these slots: the graph is not replayed after that (a stale graph
        would read freed memory). SmolLM2 (30 layers): 364 slots, 20 us of dict lookups a step on the 2-core CPU."""
        slots = []
        for m in self.model.modules():
            if "_run" in m.__dict__:  # (a quantized linear)
                slots.append((m.__dict__, "_run", m.__dict__["_run"]))
                continue
            for d in (m._parameters, m._buffers):
                slots.extend((d, k, v) for k, v in d.items())
        for kv in self.cache:
            slots.extend((kv.__dict__, n, kv.__dict__[n]) for n in ("k", "v", "k_scale", "v_scale", "seq_lens", "_next")
                         if n in kv.__dict__)
        return slots

    # ------------------------------------------------------------------ replay

    def room(self) -> bool:
        """Contiguous: every cache has room for one more token within its capacity and the rotary table (else
        the caller takes the module path, which raises the cache's own error)."""
        for kv in self.cache:
            if kv._host_lens is None:
                kv._host()  # (only after a compiled call: then re-read once)
            if kv._host_max + 1 > kv.max_seq_len or kv._host_max + 1 > self.rows:
                return False
        return True

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """Logits [B, V] (a new tensor) of one decode step of `tokens` [B, 1] (or [B]), or None when the caches
        cannot take it this way (full; paged: also a shared block, ...): nothing was run, the caller's module
        path handles it (and raises the cache's error)."""
        if self.dead or any(d.get(k) is not v for d, k, v in self._watch):
            self.dead = True
            return None
        if self.steps is not None:
            if not self.steps.prepare(self.rows):
                self.dead = True  # (the module path may now change block lists behind the step tensors)
                return None
        elif not self.room():
            return None
        self.tokens.copy_(tokens.view(self.batch, 1))
        self.graph.replay()
        if self.steps is not None:
            self.steps.advance()
        else:
            for kv in self.cache:
                kv._advance_one(counters=False)  # (the replay advanced seq_lens and _next on the device)
        return self.logits.clone()
