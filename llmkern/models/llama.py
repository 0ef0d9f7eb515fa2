"""One readable Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2) built from llmkern.nn modules.

    tokens [B, S] -> embed_tokens -> N x DecoderLayer -> norm -> lm_head -> logits [B, S, V]
    DecoderLayer:  h = h + attn(rms_norm(h));  h = h + mlp(rms_norm(h))
    MLP (SwiGLU):  down_proj(silu(gate_proj(x)) * up_proj(x))

Every linear is an `nn.Linear`, `llmkern.nn.Int8Linear` or `llmkern.nn.Int4Linear`; norms are
`llmkern.nn.RMSNorm` (the residual add is fused into the next norm: norm(x, residual) returns the
normed sum and the sum); attention (rotary, KV-cache append, attention) is `llmkern.nn.Attention`.
So every llmkern backend speeds the model up, and the module names are Hugging Face's
(`layers.3.self_attn.q_proj`), which keeps checkpoint loading a matter of renaming.

All layers share one RotaryEmbedding (one cos/sin table rather than one per layer).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import _backends
from .. import nn as lnn
from ..nn.paged_kv_cache import default_block_size
from .config import ModelConfig
from .decode_plan import DecodePlan, head_logits
from .decode_plan_paged import PagedSteps


class MLP(nn.Module):
    """SwiGLU feed-forward: x [..., H] -> down(silu(gate(x)) * up(x)) [..., H]."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, device=None, dtype=torch.float32):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False, device=device, dtype=dtype)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False, device=device, dtype=dtype)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self._modules.get("gate_up_proj")
        if gate_up is not None:
            # [..., 2I] -> two [..., I] views (fuse_gate_up): one launch for both projections.
            g, u = gate_up(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(g) * u)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def fuse_gate_up(self) -> bool:
        """Replace gate_proj and up_proj by one `gate_up_proj` if they can be joined (same outputs)."""
        if "gate_up_proj" in self._modules:
            return True
        fused = lnn.linear.concat_linears((self.gate_proj, self.up_proj))
        if fused is None:
            return False
        del self.gate_proj, self.up_proj
        self.gate_up_proj = fused
        return True


def window_left(config: ModelConfig, layer: int) -> int:
    """The attention window of `layer` as ops' window_left: -1 (none), or sliding_window - 1 for a layer with a
    sliding window (Mistral: every layer; Qwen2 with use_sliding_window: those transformers makes sliding). A
    query then sees itself and the sliding_window - 1 keys before it, as transformers' sliding-window mask."""
    w = config.extra.get("sliding_window")
    layers = config.extra.get("sliding_layers")
    if not w or (layers is not None and layer not in layers):
        return -1
    return int(w) - 1


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, *, device=None, dtype=torch.float32, backend=None, index: int = 0):
        super().__init__()
        c = config
        self.input_layernorm = lnn.RMSNorm(c.hidden_size, c.rms_eps, device=device, dtype=dtype, backend=backend)
        self.self_attn = lnn.Attention(
            c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, rope_base=c.rope_base,
            # max_positions=1: a one-row table, replaced by the model's shared RotaryEmbedding (set_rotary)
            rope_scaling=c.rope_scaling, max_positions=1, bias=c.attention_bias, window_left=window_left(c, index),
            device=device, dtype=dtype, backend=backend)
        if c.attention_bias and not c.o_bias:  # Qwen2: biases on q/k/v only
            self.self_attn.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False, device=device,
                                              dtype=dtype)
        self.post_attention_layernorm = lnn.RMSNorm(c.hidden_size, c.rms_eps, device=device, dtype=dtype,
                                                    backend=backend)
        self.mlp = MLP(c.hidden_size, c.intermediate_size, device=device, dtype=dtype)

    def forward(self, h, residual, cache=None, seq_ids=None, lengths=None):
        """h [B, S, H]: the previous layer's output (its sublayer output, not yet added to `residual`);
        residual [B, S, H] or None (first layer: h is the embedding). Returns (mlp output, residual)."""
        if residual is None:
            residual = h
            x = self.input_layernorm(h)
        else:
            x, residual = self.input_layernorm(h, residual)      # residual = h + residual
        a = self.self_attn(x, cache, seq_ids=seq_ids, lengths=lengths)
        x, residual = self.post_attention_layernorm(a, residual)  # residual += attention output
        return self.mlp(x), residual


class Llama(nn.Module):
    """The decoder. forward(tokens [B, S], cache=None, ...) -> float32 logits [B, S, V] (or [B, V] with last_only).

    cache: None (plain causal self-attention over `tokens`, positions 0..S-1), or what `new_cache`
    returns: a list of one KVCache / PagedKVCache per layer; positions then continue each sequence's
    cached length.
    """

    def __init__(self, config: ModelConfig, *, device=None, dtype=torch.float32, backend=None):
        super().__init__()
        self.config, self.dtype, self.backend = config, dtype, backend
        c = config
        # On the meta device (loaders), skip the random init: it would import torch's decompositions (seconds).
        skip = torch.empty(c.vocab_size, c.hidden_size, device="meta", dtype=dtype) if str(device) == "meta" else None
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size, device=device, dtype=dtype, _weight=skip)
        self.layers = nn.ModuleList(
            DecoderLayer(c, device=device, dtype=dtype, backend=backend, index=i) for i in range(c.num_layers))
        self.norm = lnn.RMSNorm(c.hidden_size, c.rms_eps, device=device, dtype=dtype, backend=backend)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False, device=device, dtype=dtype)
        if c.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.set_rotary(device=None if str(device) == "meta" else device)

    def __getstate__(self):
        # (copies and pickles leave out the per-cache step state: the decode plan and shared paged step tensors
        # hold one call's caches, and the plan a native program)
        state = super().__getstate__()
        state.pop("_decode_plan", None)
        state.pop("_steps", None)
        return state

    def _apply(self, fn, recurse=True):
        # .to(torch.bfloat16) / .half() / .float(): `dtype` (the activations' and new caches' dtype) follows the
        # embedding's, so that new_cache / generate keep matching the model.
        super()._apply(fn, recurse)
        emb = self.embed_tokens
        if isinstance(emb, lnn.QuantizedEmbedding):  # (its buffers keep their dtypes; it tracks the output's)
            self.dtype = emb.dtype
        elif emb.weight.is_floating_point() and not emb.weight.is_meta:
            self.dtype = emb.weight.dtype
        return self

    @property
    def device(self) -> torch.device:
        """The device of the model's weights (its embedding table's)."""
        emb = self.embed_tokens
        return emb.device if isinstance(emb, lnn.QuantizedEmbedding) else emb.weight.device

    def set_rotary(self, device=None) -> None:
        """(Re)build the rotary table shared by every layer (e.g. after constructing on the meta device)."""
        c = self.config
        self.rotary = lnn.RotaryEmbedding(c.head_dim, c.max_positions, c.rope_base, scaling=c.rope_scaling,
                                          device=device, backend=self.backend)
        for layer in self.layers:
            layer.self_attn.rotary = self.rotary

    # ------------------------------------------------------------------ forward

    def forward(self, tokens: torch.Tensor, cache=None, *, seq_ids=None, lengths=None,
                last_only: bool = False) -> torch.Tensor:
        """tokens int [B, S]; lengths int [B] (right padding: real tokens per row), seq_ids for a paged cache.

        last_only: compute logits only at each row's last real token (lengths[b] - 1, else S - 1),
        returning [B, V]; a prefill needs nothing else, and the lm_head is the largest matmul.
        """
        if tokens.dim() != 2:
            raise ValueError(f"Llama.forward: tokens must be [B, S], got shape {tuple(tokens.shape)}")
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(f"Llama.forward: cache has {len(cache)} layers, the model {len(self.layers)}")
        if (last_only and cache is not None and lengths is None and tokens.shape[-1] == 1
                and not torch.compiler.is_compiling()
                and not (torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()))):
            # Decode step: the flat kernel list (models/decode_plan.py) when it applies; same logits. (Not when
            # autograd would track the step: the modules' path, whose ops' backward raises.)
            plan = self.__dict__.get("_decode_plan")
            if plan is None or not plan.matches(self, cache, tokens, seq_ids):
                plan = DecodePlan.build(self, cache, tokens, seq_ids)
                self.__dict__["_decode_plan"] = plan
            if plan is not None and plan.ready():
                return plan.step(tokens)
            if seq_ids is not None:
                steps = self._paged_steps(cache, seq_ids)
                if steps is not None:  # one set of step tensors for every layer's paged cache
                    with steps.bound():
                        out = self._forward_modules(tokens, cache, seq_ids, None, True)
                    steps.advance()
                    return out
        return self._forward_modules(tokens, cache, seq_ids, lengths, last_only)

    def _paged_steps(self, cache, seq_ids):
        """A decode step over paged caches that the decode plan did not take (a GPU; the CPU without the step
        program): one PagedSteps (decode_plan_paged.py) prepared for it, whose tensors every layer's cache reads
        while bound (PagedKVCache._bound), instead of each layer building the same slots and block table (on a
        GPU: three host-to-device copies per layer). None: the caches' own per-layer path (PagedSteps would not
        take this step: sequences that differ between layers, a shared block, a full cache...).
        LLMKERN_PAGED_STEPS=0 turns it off (its GPU tests passed on the first GPU run, 2026-11-29; untimed)."""
        if _backends.env("LLMKERN_PAGED_STEPS") == "0":
            return None
        ids = seq_ids.tolist() if isinstance(seq_ids, torch.Tensor) else list(seq_ids)
        steps = self.__dict__.get("_steps")
        if steps is None or steps.caches is not cache or steps.ids != ids or steps.stale:
            steps = None
            if all(isinstance(i, int) for i in ids) and cache and type(cache[0]) is lnn.PagedKVCache \
                    and PagedSteps.compatible(cache, ids, self, cache[0].device):
                steps = PagedSteps(cache, ids)
            self.__dict__["_steps"] = steps
        if steps is None or not steps.prepare(self.rotary.cos_sin_cache.shape[0]):
            return None
        return steps

    def _forward_modules(self, tokens, cache, seq_ids, lengths, last_only):
        """forward through the modules (embedding, layers, norm, head)."""
        V = self.config.vocab_size
        if tokens.is_cpu and tokens.numel() and not (0 <= int(tokens.min()) and int(tokens.max()) < V):
            # (cheap on the CPU; on a GPU it would wait for the stream, and nn.Embedding asserts there anyway)
            raise ValueError(f"Llama.forward: tokens must be in 0..{V - 1} (the vocabulary), got "
                             f"{int(tokens.min())}..{int(tokens.max())}")
        if last_only and lengths is not None:
            host = torch.as_tensor(lengths).cpu()
            if host.numel() and int(host.min()) < 1:
                raise ValueError(f"Llama.forward: last_only needs every length >= 1 (a last token per row), got "
                                 f"{host.tolist()}")
        h = self.embed_tokens(tokens)  # [B, S, H]
        residual = None
        for i, layer in enumerate(self.layers):
            h, residual = layer(h, residual, None if cache is None else cache[i], seq_ids, lengths)
        if last_only:
            B, S = tokens.shape
            if lengths is None:
                h, residual = h[:, -1], residual[:, -1]  # [B, H]
            else:
                idx = (torch.as_tensor(lengths, device=h.device).long() - 1).view(B, 1, 1).expand(B, 1, h.shape[-1])
                h, residual = h.gather(1, idx)[:, 0], residual.gather(1, idx)[:, 0]  # [B, H]
        h, _ = self.norm(h, residual)
        head = self.lm_head
        # float32 logits (see head_logits), from fp32 x where the head is quantized and on the CPU
        return head_logits(head, h, h.is_cpu and isinstance(head, (lnn.Int8Linear, lnn.Int4Linear)))

    # ------------------------------------------------------------------ caches

    def new_cache(self, batch_size: int = 1, max_seq_len: int | None = None, *, paged: bool = False,
                  block_size: int | None = None, num_blocks: int | None = None, int8: bool = False, device=None):
        """One KV cache per layer: KVCache(batch_size, max_seq_len) or PagedKVCache(num_blocks, block_size)
        (block_size default: `llmkern.nn.paged_kv_cache.default_block_size(device)`, 64 on the CPU and 16
        on GPUs; num_blocks default: enough for batch_size sequences of max_seq_len)."""
        c = self.config
        max_seq_len = max_seq_len or c.max_positions
        if max_seq_len > c.max_positions:
            raise ValueError(f"new_cache: max_seq_len {max_seq_len} exceeds the model's max_positions {c.max_positions}")
        device = device if device is not None else self.device
        if paged:
            if block_size is None:
                block_size = default_block_size(device)
            if num_blocks is None:
                num_blocks = batch_size * -(-max_seq_len // block_size)
            return [lnn.PagedKVCache(num_blocks, block_size, c.num_kv_heads, c.head_dim, dtype=self.dtype,
                                     device=device, int8=int8, backend=self.backend) for _ in self.layers]
        return [lnn.KVCache(batch_size, max_seq_len, c.num_kv_heads, c.head_dim, dtype=self.dtype, device=device,
                            int8=int8, backend=self.backend) for _ in self.layers]

    # ------------------------------------------------------------------ sizes

    def weight_bytes_per_token(self, packed: bool = True) -> int:
        """Bytes of weights a decode step reads: every layer, the final norm and the lm_head (each
        tensor once, shared ones counted once); of the embedding only one row per token. A linear whose
        prepared runner decodes from a packed copy (int4 on AVX-512, int8 on AVX-512 or AVX2) counts that copy instead of
        its canonical tensors (int4: the rows16 layout once packed, else the packed one), so the figure
        changes after the first calls prepare the layers. packed=False: the canonical tensors throughout (a
        released Int4Linear's as unpacked: K/2 + 8 K/G bytes per output row; a released Int8Linear's weight:
        K), the weights as stored."""
        seen, total, stored = set(), 0, not packed
        for mod in (self.layers, self.norm, self.lm_head):
            for sub in mod.modules():
                if stored:
                    if isinstance(sub, lnn.Int4Linear) and sub.__dict__.get("_released") is not None:
                        N, K, G = sub.out_features, sub.in_features, sub.group_size
                        total += N * K // 2 + 8 * N * (K // G)  # (its bias is among its buffers, below)
                    elif isinstance(sub, lnn.Int8Linear) and sub.__dict__.get("_released") is not None:
                        total += sub.out_features * sub.in_features  # (the int8 weight; its scales are buffers)
                    continue
                impl = getattr(sub.__dict__.get("_run"), "impl", None)
                packed = getattr(impl, "rows16", None)
                if packed is None:
                    packed = getattr(impl, "packed", None)
                if packed is not None:  # decode reads the packed stream (+ the bias), not the canonical tensors
                    # (the CUDA run's `packed` is (weights, scales, scale16): its tensors)
                    parts = packed if isinstance(packed, tuple) else (packed,)
                    total += sum(t.numel() * t.element_size() for t in parts if isinstance(t, torch.Tensor))
                    seen.update(t.data_ptr() for n, t in sub.named_buffers() if n != "bias")
        for mod in (self.layers, self.norm, self.lm_head):
            for t in list(mod.parameters()) + list(mod.buffers()):
                if t is self.rotary.cos_sin_cache or t.data_ptr() in seen:
                    continue
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        emb = self.embed_tokens
        if isinstance(emb, lnn.QuantizedEmbedding):  # (a row, also where a tied lm_head holds the same tensors)
            total += emb.row_bytes()
        elif emb.weight.data_ptr() not in seen:
            total += emb.weight.shape[1] * emb.weight.element_size()
        return total

    def fuse_projections(self) -> int:
        """Join each layer's q/k/v and gate/up projections into one linear each (same outputs, fewer
        launches: a decode step of SmolLM2-135M goes from 211 to 121 linear calls). Call after the
        weights are loaded: the state dict then names `qkv_proj` / `gate_up_proj`. Returns the number of
        fused groups."""
        n = 0
        for layer in self.layers:
            n += layer.self_attn.fuse_qkv()
            n += layer.mlp.fuse_gate_up()
        return n

    def set_backend(self, backend) -> None:
        """Point every llmkern module at `backend` (None: the default dispatch)."""
        self.backend = backend
        for m in self.modules():
            if hasattr(m, "backend") and m is not self:
                m.backend = backend
