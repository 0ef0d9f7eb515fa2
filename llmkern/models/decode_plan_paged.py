"""Per-step host bookkeeping of a decode plan over paged KV caches (`PagedSteps`, used by DecodePlan).

A model's PagedKVCaches (one per layer) hold the same sequences with the same lengths and, as long as
they are driven together (Llama.forward, generate), the same block ids: every allocator starts equal and
sees the same calls. One set of step tensors then serves every layer: the new token's position and
slot per sequence, the lengths after it, and the block table. The step program (decode_plan.py) binds
them by pointer; before each step `prepare` allocates the block a sequence's next token starts (in every
layer's cache, checking they stay equal) and refills them; after it `advance` counts the token.

Anything unusual leaves the step to the module path, which has the caches' full logic and errors: a
shared (copy-on-write) last block, a sequence unknown to a cache, a full cache, caches that disagree.
Such a step may change block lists behind the step tensors (copy on write gives each layer a fresh
block), so it also marks the PagedSteps `stale`: the plan is rebuilt, with the full cross-layer check,
before the next step. A block list that changed through the caches' own API is caught the same way
(each step compares layer 0's lists with the rows last written to the table).

On a GPU (caches on CUDA: the CUDA-graph decode step, models/cuda_graph.py) the step tensors are pinned host
tensors, and `dev` their device copies, refreshed by one asynchronous copy each at the end of `prepare` (which
first waits for the previous copies, so that it never rewrites a host tensor still being read). On the CPU
`dev` is the host tensors themselves.
"""
from __future__ import annotations

import contextlib

import torch

from .. import nn as lnn


class PagedSteps:
    """Step tensors of `ids` (the batch's sequence ids, in row order) over `caches` (see the module doc)."""

    def __init__(self, caches: list, ids: list):
        self.caches, self.ids = caches, ids
        c0 = caches[0]
        self.bs, B = c0.block_size, len(ids)
        # Rows are num_blocks wide: no sequence can hold more blocks, so the table never grows (the
        # attention kernel reads only the blocks a sequence's length covers).
        self.width = c0.num_blocks
        gpu = c0.device.type == "cuda"
        new = lambda *shape, dtype: torch.zeros(shape, dtype=dtype, pin_memory=gpu)  # noqa: E731
        self.pos = new(B, 1, dtype=torch.int64)              # [B, 1] position of the new token
        self.slot = new(B, 1, dtype=torch.int64)             # [B, 1] its slot: block * block_size + offset
        self.lens = new(B, dtype=torch.int32)                # [B] lengths including it
        self.table = new(B, self.width, dtype=torch.int32)   # [B, num_blocks] block ids, 0 beyond
        self.rows = [list(c0._seqs[i].blocks) for i in ids]  # what the table rows hold (host mirror)
        for b, blocks in enumerate(self.rows):
            self.table[b, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        self.capacity = self.width * self.bs
        self.stale = False  # set when a step went to the module path: the plan must be rebuilt
        host = (self.pos, self.slot, self.lens, self.table)
        # (pos, slot, lens, table) as the kernels read them; from pinned memory without waiting for the stream
        self.dev = tuple(t.to(c0.device, non_blocking=True) for t in host) if gpu else host
        self._uploaded = None  # CUDA event of the last copies to `dev` (the host tensors are rewritten after it)
        if gpu:
            self._uploaded = torch.cuda.Event()
            self._uploaded.record(torch.cuda.current_stream(c0.device))

    @staticmethod
    def compatible(caches: list, ids: list, model, device="cpu") -> bool:
        """Every cache is an unbound PagedKVCache on `device` for `model` (its dtype, KV heads and head dim: the
        step tensors' users skip the per-call checks that would refuse others) with the same geometry, holding
        every id with the same length and blocks as the first."""
        c0, cfg = caches[0], model.config
        device = torch.device(device)
        if not all(type(c) is lnn.PagedKVCache and c.device == device and c.dtype == model.dtype and c._bound is None
                   and c.num_kv_heads == cfg.num_kv_heads and c.head_dim == cfg.head_dim
                   and c.block_size == c0.block_size and c.num_blocks == c0.num_blocks for c in caches):
            return False
        if len(set(ids)) != len(ids) or not all(i in c0._seqs for i in ids):
            return False
        for c in caches[1:]:
            for i in ids:
                s, s0 = c._seqs.get(i), c0._seqs[i]
                if s is None or s.length != s0.length or s.blocks != s0.blocks:
                    return False
        return True

    def prepare(self, max_positions: int) -> bool:
        """Make room for one token per sequence and fill the step tensors; False (nothing changed, or only
        block allocations the module path would make too) leaves this step to the module path and marks
        these step tensors stale."""
        ok = self._prepare(max_positions)
        self.stale = not ok
        return ok

    def _prepare(self, max_positions: int) -> bool:
        caches, bs, c0 = self.caches, self.bs, self.caches[0]
        if self._uploaded is not None:
            self._uploaded.synchronize()  # (the last step's copies read the host tensors rewritten below)
        lengths, grow = [], []
        for b, i in enumerate(self.ids):
            s = c0._seqs.get(i)
            if s is None:
                return False
            n = s.length
            if s.blocks != self.rows[b]:
                return False            # changed behind the table (a fork's copy on write, ...)
            for c in caches[1:]:  # the caches still agree (a few int compares per layer)
                t = c._seqs.get(i)
                if t is None or t.length != n or len(t.blocks) != len(s.blocks):
                    return False
            if n + 1 > max_positions or n + 1 > self.capacity:
                return False
            j = n // bs                 # the block the new token goes to
            if j == len(s.blocks):
                grow.append(b)          # it starts a block
            elif j > len(s.blocks) or c0.allocator.refcount[s.blocks[j]] > 1:
                return False            # a shared block: copy on write is the module path's
            lengths.append(n)
        if grow:
            if any(c.allocator.num_free < len(grow) for c in caches):
                return False            # full: the module path raises the cache's error
            for b in grow:
                i = self.ids[b]
                got = [c.allocator.allocate() for c in caches]
                for c, blk in zip(caches, got):
                    c._seqs[i].blocks.append(blk)
                if any(blk != got[0] for blk in got):
                    return False        # allocators diverged: each cache's own tables from now on
                self.table[b, len(c0._seqs[i].blocks) - 1] = got[0]
                self.rows[b].append(got[0])
        slots = [c0._seqs[i].blocks[n // bs] * bs + n % bs for i, n in zip(self.ids, lengths)]
        self.pos.copy_(torch.tensor(lengths, dtype=torch.int64).view(-1, 1))   # [B] -> [B, 1]
        self.slot.copy_(torch.tensor(slots, dtype=torch.int64).view(-1, 1))    # [B] -> [B, 1]
        self.lens.copy_(torch.tensor(lengths, dtype=torch.int32) + 1)
        if self.dev[0] is not self.pos:  # on a GPU: one asynchronous copy each from the pinned host tensors
            for d, h in zip(self.dev, (self.pos, self.slot, self.lens, self.table)):
                d.copy_(h, non_blocking=True)
            self._uploaded.record(torch.cuda.current_stream(self.dev[0].device))  # (the copies' stream)
        return True

    @contextlib.contextmanager
    def bound(self):
        """Within: every cache reads these step tensors for the step's one token per sequence and does no host
        work of its own (PagedKVCache._bound): the module path of one prepared step, run once for all layers."""
        for c in self.caches:
            c._bound = self
        try:
            yield
        finally:
            for c in self.caches:
                c._bound = None

    def advance(self) -> None:
        """Count the token the step wrote in every cache (host state: lengths; no stale append tables)."""
        for c in self.caches:
            seqs = c._seqs
            for i in self.ids:
                seqs[i].length += 1
            c._last = None
