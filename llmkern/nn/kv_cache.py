"""`KVCache`: a contiguous key/value cache [B, Smax, Hk, D] for a fixed batch of sequences.

Writes go through ops.kv_cache_append (optionally with the rotary embedding fused in), reads through
ops.decode_attention. Sequence b's token p lives at row b, column p; the cache seen as
[B * Smax, Hk, D] has it in slot b * Smax + p (the slot mapping of kv_cache_append).

The capacity check needs each sequence's length on the host. Reading `seq_lens` back from a GPU would
synchronize every decode step, so a host mirror (`_host_lens`, plus a pending uniform offset
`_host_add` so that a decode step costs no tensor op on the host) is kept next to the device tensor.
Under torch.compile a check cannot raise from inside a graph: the check is skipped (the caller keeps
within max_seq_len, e.g. by checking before compiled steps), writes past a row's end are dropped
(slot -1) instead of landing in the next sequence, and the mirror is marked unknown, to be re-read
from the device on the next eager call. `lengths` needs host values, so it is for eager calls.
"""
from __future__ import annotations

import torch

from .. import ops
from ..ops._checks import attn_scalars_ok
from ..ops.decode_attention import decode_attention_op
from ..ops.kv_cache_append import kv_cache_append_op
from ._fast import FLOATS

def _rotary_args(rotary, q, positions, pos_default):
    """kwargs of kv_cache_append for the optional fused rotary; q/positions only make sense with it."""
    if rotary is None:
        if q is not None or positions is not None:
            raise ValueError("append: q and positions are only used with rotary= (the fused rotary embedding)")
        return {}
    # q.detach() shares q's storage, so the in-place rotation still lands in the caller's q.
    return dict(q=None if q is None else q.detach(), positions=pos_default if positions is None else positions,
                cos_sin_cache=rotary.cos_sin_cache, rotary_interleaved=rotary.interleaved)


def plain_kv(k, v, q, k_cache) -> bool:
    """k, v [B, S, Hk, D] (and q [B, S, Hq, D]) are plain float tensors that fit k_cache [.., .., Hk, D] and
    sit on its device: with a cache's own slots and positions, the append's argument checks can be skipped."""
    dev = k_cache.device
    ok = (type(k) is torch.Tensor and type(v) is torch.Tensor and k.dtype in FLOATS and v.dtype == k.dtype
          and k.dim() == 4 and k.shape[2:] == k_cache.shape[2:] and v.shape == k.shape and k.device == dev
          and v.device == dev)
    if ok and q is not None:
        ok = (type(q) is torch.Tensor and q.dtype in FLOATS and q.dim() == 4 and q.shape[:2] == k.shape[:2]
              and q.shape[-1] == k.shape[-1] and q.device == dev)
    return ok


def check_lengths(cls: str, lengths, B: int, S: int) -> torch.Tensor:
    """`lengths` (tensor or sequence of ints, [B]) as a CPU int64 tensor, each in 0..S."""
    raw = lengths if isinstance(lengths, torch.Tensor) else torch.as_tensor(lengths)
    if raw.is_floating_point() or raw.is_complex() or raw.dtype == torch.bool:
        raise TypeError(f"{cls}.append: lengths must be integers, got {raw.dtype}")  # (1.7 would truncate to 1)
    host = raw.detach().to("cpu", torch.int64)
    if host.shape != (B,):
        raise ValueError(f"{cls}.append: lengths must have shape [{B}] (one per sequence), got {list(host.shape)}")
    if B and (int(host.min()) < 0 or int(host.max()) > S):
        raise ValueError(f"{cls}.append: lengths must be in 0..{S} (the new tokens per sequence), got {host.tolist()}")
    return host


class KVCache:
    """Contiguous KV cache for `batch_size` sequences of up to `max_seq_len` tokens each.

    Tensors: `k`, `v` [B, Smax, Hk, D] (`dtype`, or int8 with float32 `k_scale`, `v_scale` [B, Smax, Hk]
    when int8=True); `seq_lens` int32 [B], the tokens cached per sequence.
    """

    def __init__(self, batch_size: int, max_seq_len: int, num_kv_heads: int, head_dim: int, *,
                 dtype=torch.float32, device=None, int8: bool = False, backend=None):
        sizes = (batch_size, max_seq_len, num_kv_heads, head_dim)
        if not all(hasattr(n, "__index__") and not isinstance(n, bool) for n in sizes):
            raise TypeError(f"KVCache: batch_size, max_seq_len, num_kv_heads and head_dim must be ints, got "
                            f"{tuple(type(n).__name__ for n in sizes)}")
        if batch_size <= 0 or max_seq_len <= 0 or num_kv_heads <= 0 or head_dim <= 0:
            raise ValueError(f"KVCache: batch_size, max_seq_len, num_kv_heads and head_dim must be > 0, got "
                             f"({batch_size}, {max_seq_len}, {num_kv_heads}, {head_dim})")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"KVCache: dtype must be float32, float16 or bfloat16, got {dtype}")
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.dtype, self.int8, self.backend = dtype, bool(int8), backend
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        shape = (batch_size, max_seq_len, num_kv_heads, head_dim)
        store = torch.int8 if int8 else dtype
        self.k = torch.zeros(shape, dtype=store, device=self.device)
        self.v = torch.zeros(shape, dtype=store, device=self.device)
        # The tensors' own device: "cuda" becomes "cuda:0" (the current GPU), which a q on that GPU compares
        # equal to (the fast paths' device checks are ==).
        self.device = self.k.device
        self.k_scale = torch.zeros(shape[:3], dtype=torch.float32, device=self.device) if int8 else None
        self.v_scale = torch.zeros(shape[:3], dtype=torch.float32, device=self.device) if int8 else None
        self.seq_lens = torch.zeros(batch_size, dtype=torch.int32, device=self.device)
        # Precomputed for the slot mapping: column numbers [Smax] and row starts b * Smax [B], int64.
        self._cols = torch.arange(max_seq_len, dtype=torch.int64, device=self.device)
        self._row_base = torch.arange(batch_size, dtype=torch.int64, device=self.device) * max_seq_len
        # int64 [2, B] kept in step with seq_lens: row 0 = next position (seq_lens), row 1 = next slot
        # (b * Smax + seq_lens). A one-token step then needs no arithmetic to build its slots and
        # positions (views of this), and one add_ to advance both.
        self._next = torch.stack([torch.zeros_like(self._row_base), self._row_base.clone()])
        self._next_views = (self._next[0, :, None], self._next[1, :, None])  # [B, 1] each, made once
        self._host_lens: torch.Tensor | None = torch.zeros(batch_size, dtype=torch.int64)
        self._host_add = 0  # pending uniform offset of _host_lens (folded in lazily)
        self._host_max = 0  # max of the true host lengths
        # What attend() needs from the last append: (S, per-row lengths on the host or None, the
        # "virtual" lengths old + S used when rows were padded, or None).
        self._last = None

    # ------------------------------------------------------------------ host mirror

    def _host(self) -> torch.Tensor:
        """Exact host copy of seq_lens (int64 [B]); re-read from the device when unknown."""
        if self._host_lens is None:
            self._host_lens = self.seq_lens.to("cpu", torch.int64)
            self._host_add = 0
            self._host_max = int(self._host_lens.max())
        elif self._host_add:
            self._host_lens = self._host_lens + self._host_add
            self._host_add = 0
        return self._host_lens

    def is_empty(self, seq_ids=None) -> bool:
        """True when no sequence holds a token (a fresh prefill). seq_ids must be None (no ids here)."""
        if seq_ids is not None:
            raise ValueError("KVCache: seq_ids are only for PagedKVCache; a KVCache holds batch rows 0..B-1")
        if self._host_lens is None:
            self._host()
        return self._host_max == 0

    @property
    def nbytes(self) -> int:
        """Bytes of the cache tensors (k, v and, for int8, their scales)."""
        ts = [self.k, self.v] + ([self.k_scale, self.v_scale] if self.int8 else [])
        return sum(t.numel() * t.element_size() for t in ts)

    # ------------------------------------------------------------------ write

    def _full(self, old: torch.Tensor, add: torch.Tensor) -> ValueError:
        b = int(torch.argmax(old + add))
        return ValueError(
            f"KV cache full: sequence {b} holds {int(old[b])} tokens and appending {int(add[b])} new tokens "
            f"would exceed the capacity max_seq_len={self.max_seq_len}")

    def append(self, k: torch.Tensor, v: torch.Tensor, *, lengths=None, q: torch.Tensor | None = None,
               positions: torch.Tensor | None = None, rotary=None) -> None:
        """Write k/v [B, S, Hk, D] after each sequence's cached tokens and advance seq_lens.

        lengths: [B] ints, the real rows of each sequence (right padding; the rest is not written).
        rotary: a RotaryEmbedding; then k (before it is written) and q [B, S, Hq, D] (in place) are rotated
        at positions seq_lens[b] + s (or `positions` [B, S] when given), in the same op.
        """
        if not isinstance(k, torch.Tensor) or k.dim() != 4:
            raise ValueError(f"KVCache.append: k must be [B, S, Hk, D], got {tuple(getattr(k, 'shape', ()))}")
        B, S = k.shape[0], k.shape[1]
        if B != self.batch_size:
            raise ValueError(f"KVCache.append: k has batch {B} but the cache holds {self.batch_size} sequences")
        compiling = torch.compiler.is_compiling()
        host_len = None
        if lengths is not None:
            host_len = check_lengths("KVCache", lengths, B, S)
            lengths = torch.as_tensor(lengths, device=self.device).to(torch.int32)
        if not compiling:
            if host_len is None:
                if self._host_lens is None:
                    self._host()
                if self._host_max + S > self.max_seq_len:
                    raise self._full(self._host(), torch.full((B,), S, dtype=torch.int64))
            else:
                old = self._host()
                if B and int((old + host_len).max()) > self.max_seq_len:
                    raise self._full(old, host_len)

        # Slot mapping [B, S] int64: b * Smax + seq_lens[b] + s; -1 for padding rows.
        if S == 1:
            pos, slot = self._next_views  # [B, 1] each
        else:
            cols = self._cols[:S]                      # [S]
            nxt = self._next[:, :, None] + cols        # [2, B, S]
            pos, slot = nxt[0], nxt[1]                 # [B, S] positions / slots of the new tokens
        if lengths is not None:
            real = self._cols[None, :S] < lengths[:, None]  # [B, S]
            slot = torch.where(real, slot, -1)
            pos = torch.where(real, pos, 0)            # padding rows: any valid rotary position
        if compiling:
            slot = torch.where(pos < self.max_seq_len, slot, -1)  # no check possible: never spill over a row
        # Detached: the cache is inference state. Writing tensors that require grad would chain every
        # step's activations into one autograd graph through the cache (and the ops have no backward).
        rot = _rotary_args(rotary, q, positions, pos)
        if (not compiling and positions is None and self._plain_kv(k, v, rot.get("q"))
                and (rotary is None or self._host_max + S <= rotary.cos_sin_cache.shape[0])):
            # Eager fast path (nn/_fast.py): slots and positions are the cache's own, k/v/q were checked
            # just now, so the op's argument checks (which read the slots back) are skipped.
            kv_cache_append_op.run_trusted(
                k.detach(), v.detach(), self.k, self.v, slot, self.k_scale, self.v_scale, rot.get("q"),
                rot.get("positions"), rot.get("cos_sin_cache"), rot.get("rotary_interleaved", False),
                self.backend)
        else:
            ops.kv_cache_append(k.detach(), v.detach(), self.k, self.v, slot, k_scale=self.k_scale,
                                v_scale=self.v_scale, backend=self.backend, **rot)

        if lengths is None:
            self.seq_lens += S
            self._next += S
            self._last = (S, None, None)
        else:
            # Padded rows: query s of sequence b sits at old + s, i.e. at (old + S) - S + s, which is
            # what decode_attention computes from "virtual" lengths old + S.
            self._last = (S, host_len, self.seq_lens + S)
            self.seq_lens += lengths
            self._next += lengths.to(torch.int64)
        if compiling:
            self._host_lens = None
        elif host_len is None:
            self._host_add += S
            self._host_max += S
        else:
            self._host_lens = self._host_lens + host_len
            self._host_max = int(self._host_lens.max())

    def _advance_one(self, counters: bool = True) -> None:
        """Bookkeeping of append() after one token per sequence without `lengths`, for callers that
        wrote it through the op themselves (models/decode_plan.py), having checked the capacity.
        counters=False: the caller already advanced seq_lens and the next (position, slot) table in
        place (the decode-step program does); only the host-side state is updated."""
        if not counters:
            self._last = (1, None, None)
            self._host_add += 1
            self._host_max += 1
            return
        ones = self.__dict__.get("_ones")
        if ones is None:
            # 0-dim ones of each counter's dtype: `t += 1` wraps the Python int in a tensor of another
            # dtype and converts it on every call (~3x the time of adding a ready tensor).
            ones = self._ones = (torch.ones((), dtype=self.seq_lens.dtype, device=self.device),
                                 torch.ones((), dtype=self._next.dtype, device=self.device))
        self.seq_lens.add_(ones[0])
        self._next.add_(ones[1])
        self._last = (1, None, None)
        self._host_add += 1
        self._host_max += 1

    def _plain_kv(self, k, v, q) -> bool:
        return plain_kv(k, v, q, self.k)

    # ------------------------------------------------------------------ read

    def attend(self, q: torch.Tensor, *, scale: float | None = None, softcap: float = 0.0,
               window_left: int = -1) -> torch.Tensor:
        """decode_attention of q [B, Hq, D] or [B, Sq, Hq, D] (the newest tokens) over the cache.

        Call after append(). After an append with `lengths`, q must have that append's S rows; padding
        rows of the output are unspecified.
        """
        kw = dict(k_scale=self.k_scale, v_scale=self.v_scale, scale=scale, softcap=softcap,
                  window_left=window_left, backend=self.backend)
        last = self._last
        if last is None or last[2] is None:
            if (not torch.compiler.is_compiling() and type(q) is torch.Tensor and q.dim() in (3, 4)
                    and q.shape[0] == self.batch_size and q.shape[-1] == self.head_dim
                    and q.shape[-2] % self.num_kv_heads == 0 and q.device == self.device
                    and (q.dtype == self.dtype if not self.int8 else q.dtype in FLOATS)
                    and (q.dim() == 3 or (last is not None and q.shape[1] == last[0]))
                    and attn_scalars_ok(scale, softcap, window_left)):
                # Eager fast path: the cache's own tensors and lengths, q checked just now.
                return decode_attention_op.run_trusted(q, self.k, self.v, self.seq_lens, None, self.k_scale,
                                                       self.v_scale, scale, softcap, window_left, self.backend)
            return ops.decode_attention(q, self.k, self.v, self.seq_lens, **kw)
        S, host_len, virtual = last
        Sq = 1 if q.dim() == 3 else q.shape[1]
        if Sq != S:
            raise ValueError(f"KVCache.attend: the last append had {S} rows per sequence (with lengths), "
                             f"q has {Sq}")
        old = self._host() - host_len
        if int((old + S).max()) <= self.max_seq_len:
            return ops.decode_attention(q, self.k, self.v, virtual, **kw)
        # Rare: a padded chunk near the end of the cache, where old + S exceeds the capacity. Attend
        # each sequence's real rows on their own.
        out = torch.zeros_like(q)
        for b in range(q.shape[0]):
            n = int(host_len[b])
            if n:
                sl = slice(b, b + 1)
                qb = q[sl, :n] if q.dim() == 4 else q[sl]
                kv = [None if t is None else t[sl] for t in (self.k_scale, self.v_scale)]
                kwb = dict(kw, k_scale=kv[0], v_scale=kv[1])
                o = ops.decode_attention(qb, self.k[sl], self.v[sl], self.seq_lens[sl], **kwb)
                if q.dim() == 4:
                    out[sl, :n] = o
                else:
                    out[sl] = o
        return out

    def reset(self, batch_index: int | None = None) -> None:
        """Empty every sequence, or only row `batch_index` (its memory is reused, not cleared)."""
        if batch_index is None:
            self.seq_lens.zero_()
            self._next[0].zero_()
            self._next[1].copy_(self._row_base)
            self._host_lens = torch.zeros(self.batch_size, dtype=torch.int64)
            self._host_add = self._host_max = 0
        else:
            if not 0 <= batch_index < self.batch_size:
                raise ValueError(f"KVCache.reset: batch_index must be in 0..{self.batch_size - 1}, got {batch_index}")
            self.seq_lens[batch_index] = 0
            self._next[0, batch_index] = 0
            self._next[1, batch_index] = batch_index * self.max_seq_len
            host = self._host().clone()
            host[batch_index] = 0
            self._host_lens, self._host_max = host, int(host.max())
        self._last = None

    def __repr__(self) -> str:
        return (f"KVCache(batch_size={self.batch_size}, max_seq_len={self.max_seq_len}, num_kv_heads="
                f"{self.num_kv_heads}, head_dim={self.head_dim}, dtype={self.dtype}, int8={self.int8}, "
                f"device={self.device})")
