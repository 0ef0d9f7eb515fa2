"""`Attention`: Llama-style multi-head attention with GQA, rotary embedding and an optional KV cache.

Paths of forward(x [B, S, hidden], cache, seq_ids, lengths):
- cache None: rotary at positions 0..S-1, then causal ops.attention over the S tokens.
- fresh prefill (S > 1 and every sequence of the batch is empty in the cache): rotary, cache.append,
  then causal ops.attention over the new q/k/v. Right padding (`lengths`) needs no mask there: a real
  query i < lengths[b] only sees keys j <= i, all real. The rotation is not fused into the append on
  this path because ops.attention needs the rotated k as a tensor (the cache may be paged or int8).
- otherwise (decode, chunked prefill): cache.append(..., q=q, rotary=self.rotary) rotates q and k and
  writes k/v in one op, then cache.attend (ops.decode_attention) over each sequence's cache.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .. import ops
from ..ops._checks import values_vouched
from .kv_cache import KVCache
from .norm import RotaryEmbedding
from .linear import concat_linears
from .paged_kv_cache import PagedKVCache


class Attention(nn.Module):
    """Self-attention with `num_heads` query heads and `num_kv_heads` key/value heads (GQA/MQA).

    Submodules q_proj [hidden -> Hq*D], k_proj and v_proj [hidden -> Hk*D], o_proj [Hq*D -> hidden]
    (nn.Linear; swap in Int8Linear/Int4Linear freely; `bias` applies to all four, as in Llama's
    attention_bias), and `rotary` (RotaryEmbedding over the whole head dim). window_left >= 0: a sliding
    window (Mistral's sliding_window W is window_left = W - 1), on every path.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int | None = None, *,
                 rope_base: float = 10000.0, rope_scaling: dict | None = None, max_positions: int = 4096,
                 rope_interleaved: bool = False, bias: bool = False, window_left: int = -1, device=None,
                 dtype=torch.float32, backend=None):
        super().__init__()
        if num_heads <= 0 or num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(f"Attention: num_heads ({num_heads}) must be a positive multiple of num_kv_heads "
                             f"({num_kv_heads})")
        if head_dim is None:
            if hidden_size % num_heads:
                raise ValueError(f"Attention: hidden_size ({hidden_size}) is not divisible by num_heads "
                                 f"({num_heads}); pass head_dim")
            head_dim = hidden_size // num_heads
        if not (32 <= head_dim <= 256 and head_dim % 8 == 0):  # (refused here, not at the first forward)
            raise ValueError(f"Attention: head_dim must be a multiple of 8 in 32..256 (the attention ops' "
                             f"head dims), got {head_dim}")
        self.hidden_size, self.num_heads, self.num_kv_heads = hidden_size, num_heads, num_kv_heads
        if window_left < -1:
            raise ValueError(f"Attention: window_left must be -1 (no window) or >= 0, got {window_left}")
        self.head_dim, self.backend = head_dim, backend
        self.window_left = int(window_left)  # keys a query sees before itself (sliding window - 1); -1: all
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, **kw)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, **kw)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, **kw)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, **kw)
        self.rotary = RotaryEmbedding(head_dim, max_positions, rope_base, scaling=rope_scaling,
                                      interleaved=rope_interleaved, device=device, backend=backend)

    def forward(self, x: torch.Tensor, cache: KVCache | PagedKVCache | None = None, seq_ids=None,
                lengths=None) -> torch.Tensor:
        """x [B, S, hidden] -> [B, S, hidden]; see the module doc for the three paths.

        lengths: [B] real tokens per sequence (right padding); padding rows of the output are unspecified.
        seq_ids: the PagedKVCache sequence of each batch row (required with a PagedKVCache).
        """
        if x.dim() != 3:
            raise ValueError(f"Attention: x must be [B, S, hidden], got shape {tuple(x.shape)}")
        B, S, _ = x.shape
        Hq, Hk, D = self.num_heads, self.num_kv_heads, self.head_dim
        paged = isinstance(cache, PagedKVCache)
        if paged and seq_ids is None:
            raise ValueError("Attention: a PagedKVCache needs seq_ids (one sequence id per batch row)")
        if cache is None and seq_ids is not None:
            raise ValueError("Attention: seq_ids given without a cache")
        qkv_proj = self._modules.get("qkv_proj")
        if qkv_proj is not None:
            # One launch for the three projections (fuse_qkv): [B, S, (Hq + 2 Hk) * D] split into
            # strided views, [B, S, Hq*D] -> [B, S, Hq, D] and [B, S, Hk*D] -> [B, S, Hk, D].
            q, k, v = qkv_proj(x).split((Hq * D, Hk * D, Hk * D), dim=-1)
            q, k, v = q.view(B, S, Hq, D), k.view(B, S, Hk, D), v.view(B, S, Hk, D)
        else:
            q = self.q_proj(x).view(B, S, Hq, D)  # [B, S, Hq*D] -> [B, S, Hq, D]
            k = self.k_proj(x).view(B, S, Hk, D)
            v = self.v_proj(x).view(B, S, Hk, D)

        if cache is None or (S > 1 and cache.is_empty(seq_ids)):
            # Whole sequences from position 0: plain causal attention over the new tokens.
            positions = torch.arange(S, device=x.device).expand(B, S).contiguous()  # [B, S]
            # On a GPU positions 0..S-1, checked against the table here, need no device-to-host read to check.
            vouched = x.is_cuda and S <= self.rotary.cos_sin_cache.shape[0]
            with values_vouched() if vouched else contextlib.nullcontext():
                q, k = self.rotary(q, k, positions)
            if cache is not None:
                if paged:
                    cache.append(seq_ids, k, v, lengths=lengths)
                else:
                    cache.append(k, v, lengths=lengths)
            out = ops.attention(q, k, v, causal=True, window_left=self.window_left, backend=self.backend)
        else:
            # q [B, S, Hq, D] is rotated in place by the fused append (it is a fresh projection output).
            if paged:
                cache.append(seq_ids, k, v, lengths=lengths, q=q, rotary=self.rotary)
            else:
                cache.append(k, v, lengths=lengths, q=q, rotary=self.rotary)
            q_in = q.view(B, Hq, D) if S == 1 else q  # one token: the [B, Hq, D] decode form
            w = self.window_left
            out = cache.attend(q_in, seq_ids, window_left=w) if paged else cache.attend(q_in, window_left=w)
        return self.o_proj(out.reshape(B, S, Hq * D))  # [B, S, Hq, D] -> [B, S, Hq*D] -> [B, S, hidden]

    def fuse_qkv(self) -> bool:
        """Replace q_proj, k_proj and v_proj by one `qkv_proj` (concat_linears) if they can be joined.

        Same outputs, one linear launch instead of three; the state dict then holds `qkv_proj.*`
        instead of the three (load checkpoints before fusing). Returns whether it fused.
        """
        if "qkv_proj" in self._modules:
            return True
        fused = concat_linears((self.q_proj, self.k_proj, self.v_proj))
        if fused is None:
            return False
        del self.q_proj, self.k_proj, self.v_proj
        self.qkv_proj = fused
        return True

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, window_left={self.window_left}, backend={self.backend!r}")
