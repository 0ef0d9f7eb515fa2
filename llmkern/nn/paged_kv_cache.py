"""`PagedKVCache`: a KV cache of fixed-size blocks shared by any number of sequences (vLLM-style).

Memory: `k`, `v` [num_blocks, block_size, Hk, D] (int8 + float32 scales [num_blocks, block_size, Hk]
when int8=True). Token p of a sequence lives in block blocks[p // block_size] at offset
p % block_size, i.e. in slot block * block_size + offset of the cache seen as [num_slots, Hk, D].

Bookkeeping is on the host (`BlockAllocator`: a free list and a reference count per block; one list
of block ids and a length per sequence), as in vLLM's scheduler: allocation decisions never read the
GPU. `fork` shares every block of a sequence; a shared block is only ever written after it has been
copied (copy on write), so sequences never see each other's new tokens.
"""
from __future__ import annotations

import collections
import operator

import torch

from .. import ops
from ..ops._checks import attn_scalars_ok
from ..ops.decode_attention import decode_attention_op
from ..ops.kv_cache_append import kv_cache_append_op
from ._fast import FLOATS
from .kv_cache import _rotary_args, check_lengths, plain_kv

# Appends of at most this many rows (B * S) compute their slots in Python (see append).
_HOST_SLOTS_MAX = 1024


class BlockAllocator:
    """Free list + reference counts over block ids 0..num_blocks-1."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        # Popped from the end: block 0 is handed out first, a freed block is the next one reused.
        self._free = list(range(num_blocks - 1, -1, -1))
        self.refcount = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("BlockAllocator: no free block (callers check num_free first)")
        b = self._free.pop()
        self.refcount[b] = 1
        return b

    def share(self, block: int) -> None:
        self.refcount[block] += 1

    def release(self, block: int) -> None:
        """Drop one reference; the block goes back to the free list when none is left."""
        if self.refcount[block] <= 0:
            raise RuntimeError(f"BlockAllocator: block {block} released more often than allocated")
        self.refcount[block] -= 1
        if self.refcount[block] == 0:
            self._free.append(block)


class _Seq:
    __slots__ = ("blocks", "length")

    def __init__(self, blocks: list[int], length: int):
        self.blocks, self.length = blocks, length


def default_block_size(device) -> int:
    """The block size llmkern's runtime picks for a paged cache on `device`: 64 tokens on the CPU, 16 on GPUs.

    On the CPU, decode attention over randomly placed 16-token blocks measured 11-18% slower than over a
    contiguous cache (SmolLM2 heads, L=1024, 2 threads), 32-token blocks ~4% and 64-token blocks at
    parity, while an identity block table runs at the contiguous speed: the cost is the memory system's
    (short streams at scattered addresses), not the block-table walk (docs/notes/cpu-paged-blocks.md).
    GPUs keep 16 (vLLM's and FlashInfer's usual size; less memory lost to partly filled blocks)."""
    return 64 if torch.device(device if device is not None else "cpu").type == "cpu" else 16


class PagedKVCache:
    """Paged KV cache: `num_blocks` blocks of `block_size` tokens (any size 1..256), shared by sequences.

    Sequences are created with add_sequence() / fork() and named by the integer ids they return.
    """

    def __init__(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, *,
                 dtype=torch.float32, device=None, int8: bool = False, backend=None):
        if not isinstance(block_size, int) or not 1 <= block_size <= 256:
            raise ValueError(f"PagedKVCache: block_size must be an int in 1..256, got {block_size!r}")
        if num_blocks <= 0 or num_kv_heads <= 0 or head_dim <= 0:
            raise ValueError(f"PagedKVCache: num_blocks, num_kv_heads and head_dim must be > 0, got "
                             f"({num_blocks}, {num_kv_heads}, {head_dim})")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"PagedKVCache: dtype must be float32, float16 or bfloat16, got {dtype}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.dtype, self.int8, self.backend = dtype, bool(int8), backend
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        store = torch.int8 if int8 else dtype
        self.k = torch.zeros(shape, dtype=store, device=self.device)
        self.v = torch.zeros(shape, dtype=store, device=self.device)
        # The tensors' own device: "cuda" becomes "cuda:0" (the current GPU), which a q on that GPU compares
        # equal to (the fast paths' device checks are ==).
        self.device = self.k.device
        self.k_scale = torch.zeros(shape[:3], dtype=torch.float32, device=self.device) if int8 else None
        self.v_scale = torch.zeros(shape[:3], dtype=torch.float32, device=self.device) if int8 else None
        self.allocator = BlockAllocator(num_blocks)
        self._seqs: dict[int, _Seq] = {}
        self._next_id = 0
        # What attend() reuses from the last append: (seq_ids, S, block_table, lengths for attention,
        # whether rows were padded).
        self._last = None
        # A decode step's tensors bound by the CUDA-graph step (models/cuda_graph.py: a PagedSteps shared by
        # every layer's cache): while set, append / attend of those sequences' one new token read them and do
        # no host work (`_bound_append`). None otherwise.
        self._bound = None

    # ------------------------------------------------------------------ sequences

    def _seq(self, seq_id) -> _Seq:
        s = self._seqs.get(seq_id)
        if s is None:
            raise ValueError(f"PagedKVCache: unknown sequence id {seq_id!r} (live ids: {sorted(self._seqs)[:16]})")
        return s

    def add_sequence(self) -> int:
        """A new, empty sequence; returns its id."""
        sid = self._next_id
        self._next_id += 1
        self._seqs[sid] = _Seq([], 0)
        return sid

    def free_sequence(self, seq_id: int) -> None:
        """Forget a sequence; blocks no other sequence shares go back to the free list."""
        s = self._seq(seq_id)
        for b in s.blocks:
            self.allocator.release(b)
        del self._seqs[seq_id]
        self._last = None

    def fork(self, seq_id: int) -> int:
        """A new sequence with the same tokens, sharing all of `seq_id`'s blocks (copied on write)."""
        s = self._seq(seq_id)
        for b in s.blocks:
            self.allocator.share(b)
        sid = self._next_id
        self._next_id += 1
        self._seqs[sid] = _Seq(list(s.blocks), s.length)
        return sid

    def seq_len(self, seq_id: int) -> int:
        return self._seq(seq_id).length

    def is_empty(self, seq_ids) -> bool:
        """True when none of `seq_ids` holds a token (a fresh prefill)."""
        return all(self._seq(i).length == 0 for i in self._ids(seq_ids))

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    @property
    def nbytes(self) -> int:
        """Bytes of the cache tensors (k, v and, for int8, their scales)."""
        ts = [self.k, self.v] + ([self.k_scale, self.v_scale] if self.int8 else [])
        return sum(t.numel() * t.element_size() for t in ts)

    def _ids(self, seq_ids) -> list[int]:
        if isinstance(seq_ids, torch.Tensor):
            seq_ids = seq_ids.tolist()
        try:
            ids = [operator.index(i) for i in seq_ids]  # (int(1.7) would silently pick sequence 1)
        except TypeError:
            bad = next(i for i in seq_ids if not hasattr(i, "__index__"))
            raise TypeError(f"PagedKVCache: seq_ids must be integers, got {bad!r} ({type(bad).__name__})") from None
        if len(set(ids)) != len(ids):
            raise ValueError(f"PagedKVCache: seq_ids must be distinct, got {ids}")
        for i in ids:
            self._seq(i)
        return ids

    # ------------------------------------------------------------------ tables

    def _table(self, ids: list[int], min_blocks: int = 1) -> torch.Tensor:
        """int32 [B, max_blocks] block table on the device, 0 beyond each sequence's blocks."""
        width = max([min_blocks] + [len(self._seqs[i].blocks) for i in ids])
        rows = [self._seqs[i].blocks + [0] * (width - len(self._seqs[i].blocks)) for i in ids]
        return self._to_device(torch.tensor(rows, dtype=torch.int32).reshape(len(ids), width))

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A small host tensor of bookkeeping on the cache's device. On a GPU from pinned memory, without
        waiting: torch's plain copy from pageable memory synchronizes the stream (the host buffer may be
        freed right after), which every append (slots, table, lengths) of every layer and step would do."""
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    def block_table(self, seq_ids) -> torch.Tensor:
        """int32 [B, max_blocks]: row b lists sequence seq_ids[b]'s blocks in order, padded with 0."""
        return self._table(self._ids(seq_ids))

    def seq_lens(self, seq_ids) -> torch.Tensor:
        """int32 [B]: tokens cached per sequence."""
        ids = self._ids(seq_ids)
        return self._to_device(torch.tensor([self._seqs[i].length for i in ids], dtype=torch.int32))

    # ------------------------------------------------------------------ write

    def _copy_block(self, src: int, dst: int) -> None:
        for t in (self.k, self.v, self.k_scale, self.v_scale):
            if t is not None:
                t[dst] = t[src]

    def append(self, seq_ids, k: torch.Tensor, v: torch.Tensor, *, lengths=None, q: torch.Tensor | None = None,
               positions: torch.Tensor | None = None, rotary=None) -> None:
        """Write k/v [B, S, Hk, D] after the cached tokens of seq_ids[b]; like KVCache.append.

        Allocates blocks as needed (all or nothing: on ValueError "PagedKVCache full" nothing changed).
        """
        if self._bound is not None:
            return self._bound_append(seq_ids, k, v, lengths, q, positions, rotary)
        ids = self._ids(seq_ids)
        if not isinstance(k, torch.Tensor) or k.dim() != 4:
            raise ValueError(f"PagedKVCache.append: k must be [B, S, Hk, D], got {tuple(getattr(k, 'shape', ()))}")
        B, S = k.shape[0], k.shape[1]
        if B != len(ids):
            raise ValueError(f"PagedKVCache.append: k has batch {B} but {len(ids)} seq_ids were given")
        host_len = None if lengths is None else check_lengths("PagedKVCache", lengths, B, S)
        adds = [S] * B if host_len is None else host_len.tolist()
        bs = self.block_size

        # Plan first (host only), so that running out of blocks changes nothing.
        need, cow = [], []  # new blocks for the new tokens; whether the last block is shared
        for i, n in zip(ids, adds):
            s = self._seqs[i]
            # Copy on write when the block the first new token lands in is shared: a partly filled one (a fork), or
            # an empty one a decode step allocated ahead (PagedSteps.prepare) before a fork. It is the last block.
            cow.append(n > 0 and s.length // bs < len(s.blocks) and self.allocator.refcount[s.blocks[-1]] > 1)
            need.append(-(-(s.length + n) // bs) - len(s.blocks))
        # Copies: a shared block appended to by c of its r holders is copied c times, or r - 1 times
        # when all of them append now (the last one keeps the original).
        sharers = collections.Counter(self._seqs[i].blocks[-1] for i, c in zip(ids, cow) if c)
        copies = sum(c if c < self.allocator.refcount[b] else c - 1 for b, c in sharers.items())
        total = sum(need) + copies
        if total > self.allocator.num_free:
            detail = ", ".join(f"sequence {i}: {self._seqs[i].length} + {n} tokens needs {m + c} new block(s)"
                               for i, n, m, c in zip(ids, adds, need, cow) if m + c)
            raise ValueError(
                f"PagedKVCache full: appending needs {total} more blocks but only {self.allocator.num_free} of "
                f"{self.num_blocks} are free (block_size={bs}; {detail})")
        old = []
        for i, m, c in zip(ids, need, cow):
            s = self._seqs[i]
            old.append(s.length)
            if c:
                # Copy on write: this sequence gets its own copy of the shared, partially filled block,
                # unless the other holders already took theirs in this batch (then it is ours alone).
                if self.allocator.refcount[s.blocks[-1]] > 1:
                    fresh = self.allocator.allocate()
                    self._copy_block(s.blocks[-1], fresh)
                    self.allocator.release(s.blocks[-1])
                    s.blocks[-1] = fresh
            s.blocks.extend(self.allocator.allocate() for _ in range(m))

        # Device tensors: positions [B, S] of the new tokens, their slots (-1 for padding rows).
        # The table covers old + S tokens (padding beyond a sequence's blocks reads block 0) so that the
        # "virtual" lengths old + S used by attend() for padded rows stay within it.
        table = self._table(ids, min_blocks=-(-(max(old) + S) // bs) if B else 1)     # [B, W] int32
        if B * S <= _HOST_SLOTS_MAX:
            # Few tokens (decode steps): plain Python on the block lists, then one host-to-device copy,
            # cheaper than a dozen small tensor ops.
            pos_l, slot_l = [], []
            for i, o, n in zip(ids, old, adds):
                blocks = self._seqs[i].blocks
                for p in range(o, o + n):
                    pos_l.append(p)
                    slot_l.append(blocks[p // bs] * bs + p % bs)
                pos_l.extend([0] * (S - n))  # padding rows: any valid rotary position, slot -1
                slot_l.extend([-1] * (S - n))
            both = self._to_device(torch.tensor([pos_l, slot_l], dtype=torch.int64).view(2, B, S))
            pos, slot = both[0], both[1]                                               # [B, S] each
        else:
            old_t = torch.tensor(old, dtype=torch.int64).to(self.device)               # [B]
            cols = torch.arange(S, dtype=torch.int64, device=self.device)              # [S]
            pos = old_t[:, None] + cols[None, :]                                       # [B, S]
            if host_len is not None:
                real = cols[None, :] < host_len.to(self.device)[:, None]               # [B, S]
                pos = torch.where(real, pos, 0)
            blk = table.to(torch.int64).gather(1, pos // bs)                           # [B, S]
            slot = blk * bs + pos % bs
            if host_len is not None:
                slot = torch.where(real, slot, -1)
        # Detached: the cache is inference state, never part of an autograd graph (see KVCache.append).
        rot = _rotary_args(rotary, q, positions, pos)
        if (positions is None and not torch.compiler.is_compiling() and plain_kv(k, v, rot.get("q"), self.k)
                and (rotary is None or max(old, default=0) + S <= rotary.cos_sin_cache.shape[0])):
            # Eager fast path (as KVCache.append): the slots and positions are this cache's own, made from its
            # block lists just now, and k/v/q were checked: the op's argument checks, which read the slots
            # back (a device-to-host copy and a stream sync on a GPU, every layer of every step), are skipped.
            kv_cache_append_op.run_trusted(
                k.detach(), v.detach(), self.k, self.v, slot, self.k_scale, self.v_scale, rot.get("q"),
                rot.get("positions"), rot.get("cos_sin_cache"), rot.get("rotary_interleaved", False), self.backend)
        else:
            ops.kv_cache_append(k.detach(), v.detach(), self.k, self.v, slot, k_scale=self.k_scale,
                                v_scale=self.v_scale, backend=self.backend, **rot)

        for i, n in zip(ids, adds):
            self._seqs[i].length += n
        # Lengths for attention: the real ones, or old + S for padded rows (see KVCache.append).
        attn = [self._seqs[i].length for i in ids] if host_len is None else [o + S for o in old]
        self._last = (ids, S, table, self._to_device(torch.tensor(attn, dtype=torch.int32)), host_len is not None)

    def _plain_q(self, q, scale, softcap, window_left) -> bool:
        """q is a plain tensor [..., Hq, D] this cache's decode attention takes (Hq a multiple of its KV heads, its
        dtype and device), with valid scalars: what the op would check besides the batch and the lengths."""
        return (type(q) is torch.Tensor and q.shape[-1] == self.head_dim and q.shape[-2] % self.num_kv_heads == 0
                and q.device == self.device and (q.dtype == self.dtype if not self.int8 else q.dtype in FLOATS)
                and attn_scalars_ok(scale, softcap, window_left))

    def _bound_for(self, seq_ids, B: int, S: int, what: str):
        """The bound step tensors, for a call that must be their step: the same sequences, one token each."""
        b = self._bound
        ids = seq_ids.tolist() if isinstance(seq_ids, torch.Tensor) else list(seq_ids)
        if ids != b.ids or B != len(ids) or S != 1:
            raise RuntimeError(f"PagedKVCache.{what}: bound to a graphed decode step of sequences {b.ids} (one "
                               f"token each), got sequences {ids} with {S} token(s)")
        return b

    def _bound_append(self, seq_ids, k, v, lengths, q, positions, rotary) -> None:
        """append() of one token per bound sequence: the slots and positions the bound PagedSteps prepared (its
        `prepare` allocated the blocks; its `advance` counts the token afterwards), no host work, so that a
        CUDA graph can capture it."""
        b = self._bound_for(seq_ids, k.shape[0], k.shape[1], "append")
        if lengths is not None or positions is not None:
            raise RuntimeError("PagedKVCache.append: a bound decode step takes neither lengths nor positions")
        if not (plain_kv(k, v, q, self.k) and (self.int8 or k.dtype == self.dtype)):
            raise ValueError(f"PagedKVCache.append: k / v / q must be [B, 1, {self.num_kv_heads} (q: a multiple), "
                             f"{self.head_dim}] {self.dtype if not self.int8 else 'float'} tensors on {self.device} "
                             f"for this cache, got k {tuple(k.shape)} {k.dtype} on {k.device}")
        pos, slot, _, _ = b.dev
        rot = _rotary_args(rotary, q, None, pos)
        kv_cache_append_op.run_trusted(
            k.detach(), v.detach(), self.k, self.v, slot, self.k_scale, self.v_scale, rot.get("q"),
            rot.get("positions"), rot.get("cos_sin_cache"), rot.get("rotary_interleaved", False), self.backend)

    # ------------------------------------------------------------------ read

    def attend(self, q: torch.Tensor, seq_ids, *, scale: float | None = None, softcap: float = 0.0,
               window_left: int = -1) -> torch.Tensor:
        """decode_attention of q [B, Hq, D] or [B, Sq, Hq, D] over the cached tokens of seq_ids.

        Right after append(seq_ids, ...) the tables built there are reused (and padded rows of an
        append with `lengths` are handled as in KVCache.attend); otherwise they are built here.
        """
        if self._bound is not None:
            b = self._bound_for(seq_ids, q.shape[0], 1 if q.dim() == 3 else q.shape[1], "attend")
            if not self._plain_q(q, scale, softcap, window_left):
                raise ValueError(f"PagedKVCache.attend: q must be [B, Hq, {self.head_dim}] with Hq a multiple of "
                                 f"{self.num_kv_heads}, {self.dtype} on {self.device}, with valid scale / softcap / "
                                 f"window, got {tuple(q.shape)} {q.dtype}")
            _, _, lens, table = b.dev
            return decode_attention_op.run_trusted(q, self.k, self.v, lens, table, self.k_scale, self.v_scale, scale,
                                                   softcap, window_left, self.backend)
        ids = self._ids(seq_ids)
        last = self._last
        S = None  # rows of the append whose tables are reused
        if last is not None and last[0] == ids:
            _, S, table, lens, padded = last
            Sq = 1 if q.dim() == 3 else q.shape[1]
            if padded and Sq != S:
                raise ValueError(f"PagedKVCache.attend: the last append had {S} rows per sequence (with "
                                 f"lengths), q has {Sq}")
        else:
            table, lens = self._table(ids), self.seq_lens(ids)
        if (not torch.compiler.is_compiling() and self._plain_q(q, scale, softcap, window_left)
                and q.shape[0] == len(ids) and (q.dim() == 3 or (q.dim() == 4 and q.shape[1] == S))):
            # Eager fast path (as KVCache.attend): lengths and block table are this cache's own (every length
            # within the table, at least the S rows just appended), q checked just now: the op's checks, which
            # read both back from the device, are skipped.
            return decode_attention_op.run_trusted(q, self.k, self.v, lens, table, self.k_scale, self.v_scale, scale,
                                                   softcap, window_left, self.backend)
        return ops.decode_attention(q, self.k, self.v, lens, block_table=table, k_scale=self.k_scale,
                                    v_scale=self.v_scale, scale=scale, softcap=softcap,
                                    window_left=window_left, backend=self.backend)

    def __repr__(self) -> str:
        return (f"PagedKVCache(num_blocks={self.num_blocks}, block_size={self.block_size}, num_kv_heads="
                f"{self.num_kv_heads}, head_dim={self.head_dim}, dtype={self.dtype}, int8={self.int8}, "
                f"free_blocks={self.num_free_blocks}, sequences={len(self._seqs)}, device={self.device})")
