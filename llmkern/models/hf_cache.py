"""A transformers cache whose appends go through `llmkern.ops.kv_cache_append`: `LlmkernCache`.

transformers' DynamicCache grows each layer's keys and values with `torch.cat` on every step, a copy of
the whole cache per layer and token. `LlmkernLayer` keeps one preallocated buffer per layer in
llmkern's cache layout [B, capacity, Hk, D], writes new tokens with the kv_cache_append kernel (slot
b * capacity + position), doubles the capacity when it runs out (amortized O(1) per token), and
returns transformers' [B, Hk, S, D] layout as a strided view of the filled part, which llmkern's
attention function (`llmkern.patch`) reads in place.

transformers' own layer methods (crop, reorder for beam search, batch selection) operate on
`self.keys` / `self.values`; whenever they leave something that is not a view of the buffer, the next
update re-seeds the buffer from it, so every method of the base class keeps its meaning.

With `llmkern.patch`, the routed attention modules (models/hf_attention.py) call `append_rotary`
instead of `update`: q and k are rotated by llmkern's rotary inside the same kv_cache_append call that
writes k/v, so transformers' apply_rotary_pos_emb never runs.

Written against transformers 5.x's `Cache(layer_class_to_replicate=...)` API (imported lazily).
"""
from __future__ import annotations

import torch

from .. import ops
from ..ops._checks import values_vouched
from ..ops.kv_cache_append import kv_cache_append_op

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _classes():
    from transformers.cache_utils import Cache, DynamicLayer

    class LlmkernLayer(DynamicLayer):
        """One layer's cache: buffers k/v [B, capacity, Hk, D]; keys/values are [B, Hk, S, D] views."""

        MIN_CAPACITY = 256

        def lazy_initialization(self, key_states, value_states):
            super().lazy_initialization(key_states, value_states)
            self._k = self._v = None

        def _buffer_holds_keys(self) -> bool:
            k = self.keys
            return (self._k is not None and k is not None and k.dim() == 4 and k.numel() > 0
                    and k.data_ptr() == self._k.data_ptr() and k.shape[0] == self._k.shape[0]
                    and k.stride() == self._k.transpose(1, 2).stride())

        def _reserve(self, key_states, need: int, n: int) -> None:
            """Make the buffer hold `need` tokens per sequence, keeping the first n of self.keys/values.

            key_states: [B, Hk, S, D] (only its shape, dtype and device are used)."""
            B, Hk, _, D = key_states.shape
            if self._k is not None and n > 0 and not self._buffer_holds_keys():
                self._k = self._v = None  # keys were replaced by a base-class method: re-seed from them
            if self._k is not None and self._k.shape[0] == B and need <= self._k.shape[1]:
                return
            cap = max(self.MIN_CAPACITY, 2 * need)
            k = torch.empty(B, cap, Hk, D, dtype=key_states.dtype, device=key_states.device)
            v = torch.empty_like(k)
            if n:
                k[:, :n].copy_(self.keys.transpose(1, 2))  # [B, Hk, n, D] -> [B, n, Hk, D]
                v[:, :n].copy_(self.values.transpose(1, 2))
            self._k, self._v = k, v

        def update(self, key_states, value_states, *args, **kwargs):
            """key_states/value_states [B, Hk, S, D] -> (keys, values) [B, Hk, n + S, D] views of the buffer."""
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            if key_states.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                return super().update(key_states, value_states, *args, **kwargs)
            B, Hk, S, D = key_states.shape
            n = self.get_seq_length()
            self._reserve(key_states, n + S, n)
            cap = self._k.shape[1]
            # slot of token s of sequence b: b * capacity + n + s  ([B, S] int64)
            slots = _slots(B, cap, n, S, key_states.device)
            with values_vouched():  # (our slots into our buffer: no read back from a GPU to check them)
                ops.kv_cache_append(key_states.transpose(1, 2), value_states.transpose(1, 2), self._k, self._v, slots)
            self.keys = self._k[:, :n + S].transpose(1, 2)  # [B, n+S, Hk, D] -> [B, Hk, n+S, D]
            self.values = self._v[:, :n + S].transpose(1, 2)
            return self.keys, self.values

        def append_rotary(self, q, k, v, positions, cos_sin, slots_for=None, backend=None):
            """Rotate q (in place) and k at `positions`, append k/v: one kv_cache_append call.

            q [B, S, Hq, D], k/v [B, S, Hk, D] (llmkern's layout), positions int64 [B, S] (contiguous, in
            0..cos_sin.shape[0]-1: the caller checked them), cos_sin float32 [rows, D] (non-interleaved).
            Returns (keys, values) [B, n + S, Hk, D], views of the buffer; self.keys/values get the same
            tokens in transformers' [B, Hk, n + S, D] layout. None (nothing done) for dtypes the fused
            kernel does not take: the caller then rotates and calls `update`.
            slots_for: optional memo (B, cap, n, S, device) -> slots [B, S] shared by a cache's layers.
            """
            if k.dtype not in _FLOATS or q.dtype not in _FLOATS or v.dtype != k.dtype:
                return None
            B, S, Hk, D = k.shape
            key_hf = k.transpose(1, 2)  # [B, S, Hk, D] -> [B, Hk, S, D] view: transformers' layout
            if not self.is_initialized:
                self.lazy_initialization(key_hf, v.transpose(1, 2))
            if self.keys.numel() and self.keys.dtype != k.dtype:
                return None  # a cache seeded in another dtype: `update` keeps transformers' rules
            n = self.get_seq_length()
            self._reserve(key_hf, n + S, n)
            cap = self._k.shape[1]
            slots = slots_for(B, cap, n, S, k.device) if slots_for is not None else _slots(B, cap, n, S, k.device)
            if (type(q) is torch.Tensor and type(k) is torch.Tensor and type(v) is torch.Tensor
                    and q.stride(-1) == 1 and q.shape[:2] == k.shape[:2] and q.shape[-1] == D
                    and q.device == k.device == v.device == self._k.device == positions.device == cos_sin.device
                    and not torch.compiler.is_compiling()):
                # Everything kv_cache_append checks holds by construction (our slots and buffer, positions
                # checked by the caller, shapes just now): skip the op's argument checks (nn/_fast.py).
                kv_cache_append_op.run_trusted(k, v, self._k, self._v, slots, None, None, q, positions, cos_sin,
                                               False, backend)
            else:
                with values_vouched():  # (slots ours, positions checked by the caller)
                    ops.kv_cache_append(k, v, self._k, self._v, slots, q=q, positions=positions,
                                        cos_sin_cache=cos_sin, backend=backend)
            keys, values = self._k[:, :n + S], self._v[:, :n + S]  # [B, n + S, Hk, D]
            self.keys, self.values = keys.transpose(1, 2), values.transpose(1, 2)  # [B, Hk, n + S, D]
            return keys, values

        def reset(self) -> None:
            super().reset()
            self._k = self._v = None

    class LlmkernCache(Cache):
        """transformers Cache of `LlmkernLayer`s (one per layer, created on first use)."""

        def __init__(self, **kwargs):
            super().__init__(layer_class_to_replicate=LlmkernLayer, **kwargs)
            self._slot_memo = self._lens_memo = None

        def layer_for(self, layer_idx: int):
            """The LlmkernLayer of layer_idx, created like `Cache.update` creates it."""
            while len(self.layers) <= layer_idx:
                self.layers.append(self.layer_class_to_replicate())
            layer = self.layers[layer_idx]
            return layer if isinstance(layer, LlmkernLayer) else None

        def slots_for(self, B: int, cap: int, n: int, S: int, device):
            """int64 [B, S] slots b * cap + n + s, made once per step for all layers (same B, cap, n, S)."""
            key = (B, cap, n, S, device)
            memo = self._slot_memo
            if memo is None or memo[0] != key:
                memo = self._slot_memo = (key, _slots(B, cap, n, S, device))
            return memo[1]

        def seq_lens_for(self, B: int, length: int, device):
            """int32 [B] filled with `length` (decode_attention's seq_lens), made once per step for all layers."""
            key = (B, length, device)
            memo = self._lens_memo
            if memo is None or memo[0] != key:
                memo = self._lens_memo = (key, torch.full((B,), length, dtype=torch.int32, device=device))
            return memo[1]

    return LlmkernLayer, LlmkernCache


def _slots(B: int, cap: int, n: int, S: int, device) -> torch.Tensor:
    """int64 [B, S]: slot of token s of sequence b in a [B, cap, Hk, D] buffer holding n tokens each."""
    return (torch.arange(B, device=device)[:, None] * cap + torch.arange(n, n + S, device=device)[None, :])


_CLASSES = None


def cache_classes():
    """(LlmkernLayer, LlmkernCache), built on first use (transformers is imported only then)."""
    global _CLASSES
    if _CLASSES is None:
        _CLASSES = _classes()
    return _CLASSES


def new_cache():
    """An empty LlmkernCache, to pass as `cache=` / `past_key_values=` to a transformers model."""
    return cache_classes()[1]()
