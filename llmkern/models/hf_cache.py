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

Written against transformers 5.x's `Cache(layer_class_to_replicate=...)` API (imported lazily).
"""
from __future__ import annotations

import torch

from .. import ops


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
            """Make the buffer hold `need` tokens per sequence, keeping the first n of self.keys/values."""
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
            slots = (torch.arange(B, device=key_states.device)[:, None] * cap
                     + torch.arange(n, n + S, device=key_states.device)[None, :])
            ops.kv_cache_append(key_states.transpose(1, 2), value_states.transpose(1, 2), self._k, self._v, slots)
            self.keys = self._k[:, :n + S].transpose(1, 2)  # [B, n+S, Hk, D] -> [B, Hk, n+S, D]
            self.values = self._v[:, :n + S].transpose(1, 2)
            return self.keys, self.values

        def reset(self) -> None:
            super().reset()
            self._k = self._v = None

    class LlmkernCache(Cache):
        """transformers Cache of `LlmkernLayer`s (one per layer, created on first use)."""

        def __init__(self, **kwargs):
            super().__init__(layer_class_to_replicate=LlmkernLayer, **kwargs)

    return LlmkernLayer, LlmkernCache


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
