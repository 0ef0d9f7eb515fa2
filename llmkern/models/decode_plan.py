"""The decode step as a flat list of CPU kernel launches: `DecodePlan`.

A decode step of SmolLM2-135M is ~300 small calls (norms, linears, cache appends, attention) whose
kernels take a few microseconds each; through nn.Module.__call__, the modules' own argument handling
(KVCache.append computes slots and checks capacity, Attention.forward branches on the cache kind...)
and the op adapters, the Python around them cost more than the kernels. A plan binds, once per
(model, cache list, batch size), everything that does not change between steps: each layer's norm
weights, the prepared runners of its linears (`Op.prepare`), its cache tensors and the rotary table.
Then a step is, per layer, eight launches and two torch elementwise ops, with the same kernels and
the same arguments as the module path, so the logits are bit for bit the module path's.

Scope (else `DecodePlan.build` returns None and the model runs its modules): eager mode, CPU tensors,
the cpu backend (model backend None or "cpu", LLMKERN_BACKEND unset or "cpu"), one new token per
sequence (tokens [B, 1]) into a list of contiguous `KVCache`s without `lengths`, layers with fused
projections (`Llama.fuse_projections`) whose linears have prepared cpu runners.

Validity: the plan holds tensors, not modules, so `Llama.forward` checks `plan.matches(...)` before
each step: the same cache list, and the same objects in every slot the plan read (modules, weights,
eps, cache tensors, and each quantized linear's prepared runner, which the module drops whenever a
buffer changes).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import _backends
from .. import nn as lnn
from ..ops.decode_attention import decode_attention_op
from ..ops.kv_cache_append import kv_cache_append_op
from ..ops.rms_norm import rms_norm_op


def _runner(mod):
    """The prepared cpu run(x) of a quantized linear (preparing it if needed), or None."""
    if not isinstance(mod, (lnn.Int8Linear, lnn.Int4Linear)):
        return None
    run = mod.__dict__.get("_run")
    if run is None:
        return None  # not called yet through the op (its first call checks and prepares it)
    return run if run.backend == "cpu" else None


def _cpu_backend_selected(model) -> bool:
    if model.backend not in (None, "cpu"):
        return False
    return _backends.env_backend() in (None, "cpu")


class _Layer:
    __slots__ = ("ln1", "ln2", "eps1", "eps2", "qkv", "o", "gate_up", "down", "cache", "split")


class DecodePlan:
    """One decode step of `model` over `cache` for `batch` sequences; see the module doc."""

    def __init__(self, model, cache, batch: int, layers: list, head_runner, checks: list):
        self.model_id, self.cache, self.batch = id(model), cache, batch
        self.layers, self.head, self._checks = layers, head_runner, checks
        c = model.config
        self.Hq, self.Hk, self.D, self.H = c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size
        self.final_norm, self.final_eps = model.norm.weight, model.norm.eps
        self.embed = model.embed_tokens.weight
        self.rotary = model.rotary.cos_sin_cache
        self.interleaved = model.rotary.interleaved

    # ------------------------------------------------------------------ build / validity

    @staticmethod
    def _watch(model, cache) -> list:
        """(dict, key) slots that hold everything the plan binds: checked by identity before each step.

        A module that replaces a weight, is moved (.to) or loaded (load_state_dict) puts a new object in
        one of these slots (quantized linears drop their prepared runner `_run`), so a stale plan is
        never used. Plain dict lookups: ~250 of them cost ~20 us, against the milliseconds saved.
        """
        slots = [(model._modules, "embed_tokens"), (model.embed_tokens._parameters, "weight"),
                 (model._modules, "norm"), (model.norm._parameters, "weight"), (model.norm.__dict__, "eps"),
                 (model.__dict__, "rotary"), (model.rotary._buffers, "cos_sin_cache"),
                 (model._modules, "lm_head"), (model._modules, "layers")]
        head = model.lm_head
        slots.append((head._parameters, "weight") if isinstance(head, nn.Linear) else (head.__dict__, "_run"))
        for i, (layer, kv) in enumerate(zip(model.layers, cache)):
            a, m = layer.self_attn, layer.mlp
            slots += [(model.layers._modules, str(i)), (layer._modules, "self_attn"), (layer._modules, "mlp"),
                      (layer._modules, "input_layernorm"), (layer._modules, "post_attention_layernorm"),
                      (layer.input_layernorm._parameters, "weight"), (layer.input_layernorm.__dict__, "eps"),
                      (layer.post_attention_layernorm._parameters, "weight"),
                      (layer.post_attention_layernorm.__dict__, "eps"),
                      (a._modules, "qkv_proj"), (a._modules, "o_proj"), (a.__dict__, "rotary"),
                      (m._modules, "gate_up_proj"), (m._modules, "down_proj"),
                      (kv.__dict__, "k"), (kv.__dict__, "v"), (kv.__dict__, "k_scale"), (kv.__dict__, "v_scale")]
            for lin in (a._modules.get("qkv_proj"), a._modules.get("o_proj"), m._modules.get("gate_up_proj"),
                        m._modules.get("down_proj")):
                if lin is not None:
                    slots.append((lin.__dict__, "_run"))
        return slots

    @classmethod
    def build(cls, model, cache, tokens):
        """A plan for this step's inputs, or None when the step is outside the plan's scope."""
        if (torch.compiler.is_compiling() or not isinstance(cache, list) or tokens.device.type != "cpu"
                or tokens.dim() != 2 or tokens.shape[1] != 1 or not _cpu_backend_selected(model)):
            return None
        B = tokens.shape[0]
        if len(cache) != len(model.layers) or not all(type(kv) is lnn.KVCache and kv.batch_size == B
                                                     and kv.device.type == "cpu" and kv.dtype == model.dtype
                                                     for kv in cache):
            return None
        if not isinstance(model.norm, lnn.RMSNorm) or model.rotary.cos_sin_cache.device.type != "cpu":
            return None
        layers = []
        for layer, kv in zip(model.layers, cache):
            a, m = layer.self_attn, layer.mlp
            qkv, gate_up = a._modules.get("qkv_proj"), m._modules.get("gate_up_proj")
            if qkv is None or gate_up is None or a.rotary is not model.rotary:
                return None
            L = _Layer()
            L.qkv, L.o, L.gate_up, L.down = (_runner(qkv), _runner(a.o_proj), _runner(gate_up), _runner(m.down_proj))
            if None in (L.qkv, L.o, L.gate_up, L.down):
                return None
            if not (isinstance(layer.input_layernorm, lnn.RMSNorm) and isinstance(layer.post_attention_layernorm,
                                                                                  lnn.RMSNorm)):
                return None
            L.ln1, L.eps1 = layer.input_layernorm.weight.detach(), layer.input_layernorm.eps
            L.ln2, L.eps2 = layer.post_attention_layernorm.weight.detach(), layer.post_attention_layernorm.eps
            L.cache = kv
            Hq, Hk, D = a.num_heads, a.num_kv_heads, a.head_dim
            L.split = (Hq * D, Hk * D, Hk * D)
            layers.append(L)
        head = model.lm_head
        if isinstance(head, nn.Linear):
            if head.bias is not None:
                return None
            head_runner = head.weight.detach()
        else:
            head_runner = _runner(head)
            if head_runner is None:
                return None
        checks = [(d, k, d.get(k)) for d, k in cls._watch(model, cache)]
        return cls(model, cache, B, layers, head_runner, checks)

    def matches(self, model, cache, tokens) -> bool:
        """This plan still describes `model` and `cache` (see `_watch`) for a batch of tokens' size."""
        if id(model) != self.model_id or cache is not self.cache or tokens.shape[0] != self.batch:
            return False
        if not _cpu_backend_selected(model) or len(cache) != len(self.layers):
            return False
        for d, k, v in self._checks:
            if d.get(k) is not v:
                return False
        return True

    # ------------------------------------------------------------------ the step

    def ready(self) -> bool:
        """Every cache has room for one more token, within the rotary table (else the module path
        raises the cache's own error)."""
        n = self.rotary.shape[0]
        for L in self.layers:
            kv = L.cache
            if kv._host_lens is None or kv._host_max + 1 > kv.max_seq_len or kv._host_max + 1 > n:
                return False
        return True

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens int [B, 1] -> logits [B, V] of the new tokens (as model(tokens, cache, last_only=True))."""
        B, H, Hq, Hk, D = self.batch, self.H, self.Hq, self.Hk, self.D
        rms = rms_norm_op.impls["cpu"]
        append = kv_cache_append_op.impls["cpu"]
        attend = decode_attention_op.impls["cpu"]
        rot, inter = self.rotary, self.interleaved
        h = F.embedding(tokens.view(B, 1), self.embed).view(B, H)  # [B, 1] -> [B, 1, H] -> [B, H]
        residual = None
        for L in self.layers:
            if residual is None:
                x, _ = rms(h, L.ln1, L.eps1, None)
                residual = h
            else:
                x, residual = rms(h, L.ln1, L.eps1, residual)          # residual = h + residual
            q, k, v = L.qkv(x).split(L.split, dim=-1)                   # [B, (Hq + 2 Hk) D] -> 3 views
            q, k, v = q.view(B, 1, Hq, D), k.view(B, 1, Hk, D), v.view(B, 1, Hk, D)
            kv = L.cache
            pos, slot = kv._next_views                                  # [B, 1] each
            append(k, v, kv.k, kv.v, slot, kv.k_scale, kv.v_scale, q, pos, rot, inter)  # rotates q in place
            kv._advance_one()
            a = attend(q.view(B, Hq, D), kv.k, kv.v, kv.seq_lens, None, kv.k_scale, kv.v_scale, None, 0.0, -1)
            a = L.o(a.view(B, Hq * D))                                   # [B, Hq, D] -> [B, Hq*D] -> [B, H]
            x, residual = rms(a, L.ln2, L.eps2, residual)               # residual += attention output
            g, u = L.gate_up(x).chunk(2, dim=-1)                        # [B, 2I] -> two [B, I] views
            h = L.down(F.silu(g) * u)
        x, _ = rms(h, self.final_norm, self.final_eps, residual)
        if isinstance(self.head, torch.Tensor):
            return F.linear(x, self.head)
        return self.head(x)
