"""Routing a transformers decoder's attention modules through llmkern: rotary, cache append, attention.

`llmkern.patch(hf_model, attention=True)` replaces, per instance, the forward of every attention module it
recognizes (Llama, Mistral, Qwen2: q/k/v/o projections, NeoX-style "rotate half" rotary over the whole
head dim) with `_routed_forward`, which

1. projects q/k/v with the module's own (possibly quantized) linears, straight into llmkern's
   [B, S, H, D] layout (no transposes);
2. rotates q and k with llmkern: fused into the cache write (`ops.kv_cache_append` with a cos/sin table,
   q rotated in place) when the cache is an `LlmkernCache`, else `ops.rotary_embedding` followed by the
   cache's own `update` (DynamicCache, StaticCache, ...) or no cache at all;
3. attends through the attention function registered for the model (llmkern's, see hf.py), which keeps
   today's rules: masks (padded batches) go to transformers' SDPA, decode steps read the cache in place;
4. applies o_proj.

The cos/sin table (`RotaryTable`) is derived from the model's own rotary module (its `inv_freq` and
`attention_scaling`, whatever rope scaling produced them: llama3, linear, yarn, dynamic...), computed with
the same fp32 expression transformers uses, so the rotation matches transformers' frequencies exactly.
Dynamic rope types (dynamic NTK, longrope) change `inv_freq` between forwards: the table is rebuilt
whenever the module's frequencies or scaling differ from the ones it was built from.

Positions are transformers' `position_ids` ([1 or B, S], e.g. left-padded batches in generate), else
`cache_position` (older transformers), else the cache length + 0..S-1 (what the model itself would use).
Anything the routed path does not take (autograd, position ids of another shape, a module that lost its
projections) runs the module's original forward instead: slower, never wrong. `unpatch` restores the
original forward by removing the instance attribute.
"""
from __future__ import annotations

import types

import torch

from .. import ops
from ..ops._checks import values_vouched
from ..ops.decode_attention import decode_attention_op

# Attention classes whose forward is: q/k/v projections -> apply_rotary_pos_emb (rotate half over the full
# head dim) -> cache.update -> attention interface -> o_proj. Only these are routed: a class with another
# rotary (partial, interleaved, multimodal) keeps transformers' forward.
ROUTABLE_ATTENTION = frozenset({"LlamaAttention", "MistralAttention", "Qwen2Attention"})
# Rotary modules whose forward is cos/sin(position_ids * inv_freq) * attention_scaling.
ROUTABLE_ROTARY = frozenset({"LlamaRotaryEmbedding", "MistralRotaryEmbedding", "Qwen2RotaryEmbedding"})
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
_MIN_ROWS = 256  # smallest table; it doubles as positions grow
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)  # what llmkern's rotary and caches take


class RotaryTable:
    """llmkern's cos|sin table for a transformers rotary module, and the positions of the current forward.

    `cos_sin` float32 [rows, D/2 * 2]: columns 0..D/2-1 cos(p * inv_freq[i]) * attention_scaling, columns
    D/2..D-1 the sines (llmkern/ops/rotary_embedding.py's format, non-interleaved). Rows grow (doubling)
    to cover the largest position seen.
    """

    def __init__(self, rotary_emb):
        self.emb = rotary_emb
        self.rope_type = str(getattr(rotary_emb, "rope_type", "default"))
        # These types rewrite inv_freq inside the rotary module's forward (transformers' dynamic_rope_update):
        # compare values, not only the tensor's identity, before each forward's first layer.
        self.dynamic = "dynamic" in self.rope_type or self.rope_type == "longrope"
        self.cos_sin: torch.Tensor | None = None
        self._src = None        # the inv_freq tensor the table was built from
        self._freqs = None      # a copy of its values (dynamic types)
        self._scaling = None
        self._pos_key = None    # (position_ids tensor, B, S) of the last forward
        self._positions = None  # int64 [B, S], contiguous
        self.first_layer = 0    # layer_idx of the first routed layer: where each forward starts

    def _stale(self) -> bool:
        inv = self.emb.inv_freq
        if inv is not self._src or float(self.emb.attention_scaling) != self._scaling:
            return True
        return self.dynamic and not torch.equal(inv, self._freqs)

    def _build(self, rows: int) -> None:
        inv = self.emb.inv_freq
        scaling = float(self.emb.attention_scaling)
        # transformers: freqs = position_ids.float() * inv_freq.float(); cos/sin in fp32, times the scaling.
        pos = torch.arange(rows, device=inv.device).float()
        freqs = pos[:, None] * inv.float()[None, :]  # [rows, D/2]
        self.cos_sin = torch.cat([freqs.cos() * scaling, freqs.sin() * scaling], dim=1).contiguous()  # [rows, D]
        self._src, self._scaling = inv, scaling
        self._freqs = inv.detach().clone() if self.dynamic else None

    def positions(self, position_ids, B: int, S: int, device, fresh: bool = True) -> torch.Tensor | None:
        """int64 [B, S] positions from transformers' position_ids [1 or B, S] (or cache_position [S]);
        None if it has another shape.

        Computed and checked once per forward: the first layer passes fresh=True (its position_ids may be
        a tensor object reused with new values), later layers reuse the result for the same tensor. That
        is also when the table is checked against the rotary module (whose forward, which may rescale
        inv_freq, ran just before the layers) and grown to cover the positions.
        """
        key = (position_ids, B, S)
        if (not fresh and self._pos_key is not None and self._pos_key[0] is position_ids
                and self._pos_key[1:] == key[1:]):
            return self._positions
        if position_ids.dim() == 1:
            position_ids = position_ids[None]  # cache_position [S] -> [1, S]
        if position_ids.dim() != 2 or position_ids.shape[1] != S or position_ids.shape[0] not in (1, B):
            return None
        pos = position_ids.to(device=device, dtype=torch.int64).expand(B, S).contiguous()  # [B, S]
        lo, hi = (int(pos.min()), int(pos.max())) if pos.numel() else (0, 0)
        if lo < 0:
            raise ValueError(f"llmkern patched attention: position_ids must be >= 0, got a minimum of {lo}")
        rows = self.cos_sin.shape[0] if self.cos_sin is not None else 0
        if self.cos_sin is None or self._stale() or hi >= rows:
            need = max(_MIN_ROWS, rows, hi + 1)
            self._build(1 << (need - 1).bit_length())  # next power of two: amortized growth
        self._pos_key, self._positions = key, pos
        return pos


def find_rotary(hf_model):
    """The model's shared rotary module (`model.rotary_emb`) if it is one llmkern can reproduce, else None."""
    emb = getattr(getattr(hf_model, "model", hf_model), "rotary_emb", None)
    if emb is None or type(emb).__name__ not in ROUTABLE_ROTARY:
        return None
    inv = getattr(emb, "inv_freq", None)
    if not isinstance(inv, torch.Tensor) or inv.dim() != 1 or not hasattr(emb, "attention_scaling"):
        return None
    return emb


def _routable(module, table) -> bool:
    D = getattr(module, "head_dim", None)
    return (type(module).__name__ in ROUTABLE_ATTENTION and isinstance(D, int)
            and all(isinstance(getattr(module, p, None), torch.nn.Module) for p in _PROJECTIONS)
            and isinstance(getattr(module, "layer_idx", None), int) and 2 * table.emb.inv_freq.numel() == D)


def route(hf_model, backend=None, impl: str | None = None) -> list:
    """Replace the forward of each routable attention module; returns the undo list for `unroute`.

    impl: the name under which llmkern's attention function is registered (hf.py); while the model's
    config still names it, one-token decode steps on an LlmkernCache call decode_attention directly.

    Undo entries: (module, the instance's own `forward` attribute before patching or None).
    Returns [] (nothing routed, transformers' forward everywhere) when the rotary module is not one
    llmkern reproduces.
    """
    emb = find_rotary(hf_model)
    if emb is None:
        return []
    table = RotaryTable(emb)  # shared by every layer: positions are computed once per forward
    undo = []
    for module in hf_model.modules():
        if not _routable(module, table):
            continue
        original = module.forward  # bound: the class's forward (or an instance override)
        undo.append((module, module.__dict__.get("forward")))
        module._llmkern_route = (original, table, backend, impl)
        module.forward = types.MethodType(_routed_forward, module)
    if undo:
        table.first_layer = min(m.layer_idx for m, _ in undo)
    return undo


def unroute(undo) -> None:
    """Give every routed module back the forward it had before `route`."""
    for module, own in reversed(undo):
        module.__dict__.pop("forward", None)
        module.__dict__.pop("_llmkern_route", None)
        if own is not None:
            module.forward = own


def _attention_functions():
    """transformers' attention-function registry (imported on first use: transformers is optional)."""
    global _ATTENTION_FUNCTIONS
    if _ATTENTION_FUNCTIONS is None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        _ATTENTION_FUNCTIONS = ALL_ATTENTION_FUNCTIONS
    return _ATTENTION_FUNCTIONS


_ATTENTION_FUNCTIONS = None


def _llmkern_cache_layer(cache, layer_idx):
    """The cache's LlmkernLayer for layer_idx when appends can fuse the rotary (an LlmkernCache), else None."""
    from .hf_cache import cache_classes

    _, cache_cls = cache_classes()
    if type(cache) is not cache_cls or cache.offloading:
        return None
    return cache.layer_for(layer_idx)


def _routed_forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
    """hidden_states [B, S, hidden] -> (attn_output [B, S, hidden], None), rotary and append via llmkern."""
    original, table, backend, impl = self._llmkern_route
    if cache is None and "past_key_values" in kwargs:  # transformers before the `cache` rename
        cache = kwargs.pop("past_key_values")
    # llmkern's (or another registered) attention function; None for "eager", which is the module's own.
    attend = _attention_functions().get_interface(self.config._attn_implementation, None)
    if (attend is None or hidden_states.dim() != 3 or hidden_states.dtype not in _FLOATS
            or (torch.is_grad_enabled() and hidden_states.requires_grad)):
        # llmkern's ops have no backward (and q is rotated in place): training takes transformers' path.
        return original(hidden_states, position_embeddings, attention_mask, cache, **kwargs)
    B, S, _ = hidden_states.shape
    D = self.head_dim
    pos_ids = kwargs.get("position_ids")
    if pos_ids is None:
        pos_ids = kwargs.get("cache_position")
    if pos_ids is not None:
        positions = table.positions(pos_ids, B, S, hidden_states.device,
                                    fresh=self.layer_idx == table.first_layer)  # int64 [B, S]
    else:  # what the model itself would use: after the cached tokens
        n = cache.get_seq_length(self.layer_idx) if cache is not None else 0
        positions = table.positions(torch.arange(n, n + S, device=hidden_states.device), B, S, hidden_states.device)
    if positions is None:  # e.g. 3-D multimodal position ids
        return original(hidden_states, position_embeddings, attention_mask, cache, **kwargs)

    q = self.q_proj(hidden_states)  # [B, S, Hq * D]
    k = self.k_proj(hidden_states)  # [B, S, Hk * D]
    v = self.v_proj(hidden_states)
    if q.requires_grad or k.requires_grad or v.requires_grad:  # weights that require grad, grad mode on
        return original(hidden_states, position_embeddings, attention_mask, cache, **kwargs)
    q = q.view(B, S, -1, D)  # [B, S, Hq * D] -> [B, S, Hq, D]: llmkern's layout, no copy
    k = k.view(B, S, -1, D)  # [B, S, Hk, D]
    v = v.view(B, S, -1, D)

    layer = _llmkern_cache_layer(cache, self.layer_idx) if cache is not None else None
    kv = None
    if layer is not None:
        # One op: rotate q (in place) and k at `positions`, write k/v into the preallocated buffer.
        kv = layer.append_rotary(q, k, v, positions, table.cos_sin, slots_for=cache.slots_for,
                                 backend=backend)  # (keys, values) [B, n + S, Hk, D], or None
    if kv is None:
        with values_vouched():  # (positions checked against the table once per forward by table.positions)
            q, k = ops.rotary_embedding(q, k, positions, table.cos_sin, backend=backend)  # new tensors, same shapes
        if cache is not None:
            # transformers' caches take [B, Hk, S, D] and return [B, Hk, n + S, D]
            kh, vh = cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx, kwargs=kwargs)
            kv = (kh.transpose(1, 2), vh.transpose(1, 2))  # -> [B, n + S, Hk, D] views
        else:
            kv = (k, v)
    keys, values = kv

    if (layer is not None and S == 1 and attention_mask is None and not self.training and impl is not None
            and self.config._attn_implementation == impl and getattr(self, "is_causal", True)
            and kwargs.get("is_causal") in (None, True) and q.dtype == layer._k.dtype and 32 <= D <= 256
            and D % 8 == 0 and q.shape[2] % k.shape[2] == 0 and keys.data_ptr() == layer._k.data_ptr()):
        # Decode step: what llmkern's attention function would do (decode_attention over the cache), on
        # the whole preallocated buffer [B, cap, Hk, D] (contiguous) with every sequence holding n + 1
        # tokens; the arguments hold by construction, so the op's checks are skipped (nn/_fast.py).
        lens = cache.seq_lens_for(B, keys.shape[1], q.device)  # int32 [B]
        out = decode_attention_op.run_trusted(q.view(B, q.shape[2], D), layer._k, layer._v, lens, None, None,
                                              None, self.scaling, 0.0, -1, backend)  # [B, Hq, D]
        return self.o_proj(out.view(B, 1, -1)), None  # [B, Hq, D] -> [B, 1, Hq * D]

    extra = {}
    if getattr(self, "sliding_window", None) is not None:  # Qwen2's sliding layers
        extra["sliding_window"] = self.sliding_window
    elif type(self).__name__ == "MistralAttention":
        extra["sliding_window"] = getattr(self.config, "sliding_window", None)
    # The interface takes transformers' [B, H, S, D] (transposed views here) and returns [B, S, Hq, D].
    out, weights = attend(self, q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attention_mask,
                          dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling,
                          **extra, **kwargs)
    out = out.reshape(B, S, -1)  # [B, S, Hq, D] -> [B, S, Hq * D]
    return self.o_proj(out), weights
