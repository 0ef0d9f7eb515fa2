"""Hugging Face interop.

- `from_hf(src, quant=...)`: a transformers Llama/Mistral/Qwen2 model object, or a local directory with
  config.json and *.safetensors, -> llmkern's `Llama` (quantized on load: "none", "int8", "int4").
- `tokenizer_from_hf_dir(path)`: llmkern's `Tokenizer` from tokenizer.json (+ tokenizer_config.json).
- `patch(hf_model, quant=..., attention=True)` / `unpatch(hf_model)`: swap, in place, a transformers
  model's decoder `nn.Linear`s for Int8Linear/Int4Linear, its RMSNorms for llmkern's, and route its
  attention through `llmkern.ops.attention` (transformers' attention-function registry), so
  `hf_model.generate` keeps working on llmkern's kernels. Llama/Mistral/Qwen2 attention modules also
  get llmkern's rotary, fused into the append of an `LlmkernCache` (hf_attention.py, hf_cache.py);
  attention with a padding mask falls back to transformers' SDPA path.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

from .. import nn as lnn
from .. import ops
from ..ops._checks import values_vouched
from .config import ModelConfig
from .llama import Llama
from .tokenizer import TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_USER_DEFINED, Tokenizer

QUANTS = ("none", "int8", "int4")
_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


# ------------------------------------------------------------------ loading


def load_safetensors_dir(path) -> tuple[dict, dict]:
    """(config.json dict, {name: tensor}) of a local Hugging Face checkpoint directory."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model directory)")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files")
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ImportError("loading safetensors needs the `safetensors` package: pip install safetensors") from None
    state = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as e:  # truncated / corrupt files: name the file
            raise ValueError(f"{f}: cannot read safetensors file: {e}") from e
    return json.loads((path / "config.json").read_text()), state


def from_hf(src, *, quant: str = "none", group_size: int | None = None, mode: str | None = None, dtype=torch.float32,
            backend=None, progress: bool = False, fuse: bool = True) -> Llama:
    """A transformers model (LlamaForCausalLM & co.) or a checkpoint directory -> llmkern Llama.

    quant: "none" (float linears in `dtype`), "int8" (per channel, or per group of group_size; mode
    "w8a16" (default) or "w8a8") or "int4" (group_size default 32; mode "w4a16" (default), "w4a8" or
    "w4a8g"; `Int4Linear.from_linear`: fp16-valued scales), applied to every linear including lm_head.
    fuse: join q/k/v and gate/up per layer (`Llama.fuse_projections`); False keeps HF's module names.
    """
    if quant not in QUANTS:
        raise ValueError(f"from_hf: quant must be one of {QUANTS}, got {quant!r}")
    if isinstance(src, (str, Path)):
        cfg_dict, state = load_safetensors_dir(src)
    elif isinstance(src, nn.Module) and hasattr(src, "config"):
        cfg_dict, state = src.config.to_dict(), src.state_dict()
    else:
        raise TypeError(f"from_hf: src must be a transformers model or a directory path, got {type(src).__name__}")
    config = ModelConfig.from_hf_config(cfg_dict)
    # "model.layers.0..." (CausalLM) -> "layers.0..."
    state = {k[len("model."):] if k.startswith("model.") else k: v for k, v in state.items()}

    def take(name, shape):
        t = state.get(name)
        if t is None:
            raise ValueError(f"from_hf: tensor {name!r} is missing from the checkpoint")
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"from_hf: tensor {name!r} has shape {list(t.shape)}, expected {list(shape)}")
        return t.detach().to(dtype)

    def linear(name, out_f, in_f, bias):
        lin = nn.Linear(in_f, out_f, bias=bias, device="meta", dtype=dtype)
        lin.weight = nn.Parameter(take(name + ".weight", (out_f, in_f)), requires_grad=False)
        if bias:
            lin.bias = nn.Parameter(take(name + ".bias", (out_f,)), requires_grad=False)
        if quant == "int8":
            return lnn.Int8Linear.from_linear(lin, mode=mode or "w8a16", group_size=group_size or 0, backend=backend)
        if quant == "int4":
            return lnn.Int4Linear.from_linear(lin, group_size=group_size or 32, mode=mode or "w4a16", backend=backend)
        return lin

    c = config
    model = Llama(c, device="meta", dtype=dtype, backend=backend)
    model.set_rotary(device="cpu")
    H, D, I = c.hidden_size, c.head_dim, c.intermediate_size
    model.embed_tokens.weight = nn.Parameter(take("embed_tokens.weight", (c.vocab_size, H)), requires_grad=False)
    shapes = {"self_attn.q_proj": (c.num_heads * D, H), "self_attn.k_proj": (c.num_kv_heads * D, H),
              "self_attn.v_proj": (c.num_kv_heads * D, H), "self_attn.o_proj": (H, c.num_heads * D),
              "mlp.gate_proj": (I, H), "mlp.up_proj": (I, H), "mlp.down_proj": (H, I)}
    for i, layer in enumerate(model.layers):
        if progress:
            sys.stderr.write(f"\rllmkern: converting layer {i + 1}/{c.num_layers}")
        p = f"layers.{i}."
        for name, (out_f, in_f) in shapes.items():
            bias = (c.attention_bias and name in _LINEARS[:3]) or (c.o_bias and name == "self_attn.o_proj")
            parent, _, attr = name.partition(".")
            setattr(getattr(layer, parent), attr, linear(p + name, out_f, in_f, bias))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            getattr(layer, norm).weight = nn.Parameter(take(p + norm + ".weight", (H,)), requires_grad=False)
    model.norm.weight = nn.Parameter(take("norm.weight", (H,)), requires_grad=False)
    if c.tie_embeddings and quant == "none":
        model.lm_head = nn.Linear(H, c.vocab_size, bias=False, device="meta", dtype=dtype)
        model.lm_head.weight = model.embed_tokens.weight
    else:
        if c.tie_embeddings:
            state.setdefault("lm_head.weight", state["embed_tokens.weight"])
        model.lm_head = linear("lm_head", c.vocab_size, H, False)
    if progress:
        sys.stderr.write("\n")
    model.requires_grad_(False)
    if fuse:
        model.fuse_projections()
    model.eval()
    return model


def tokenizer_from_hf_dir(path) -> Tokenizer:
    """llmkern Tokenizer from a directory's tokenizer.json (byte-level BPE) and tokenizer_config.json."""
    path = Path(path)
    try:
        data = json.loads((path / "tokenizer.json").read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no tokenizer.json") from None
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"{path}/tokenizer.json: model type {model.get('type')!r} is not supported (BPE)")
    vocab = dict(model["vocab"])
    types = {}
    for t in data.get("added_tokens", []):
        vocab[t["content"]] = t["id"]
        types[t["id"]] = TOKEN_CONTROL if t.get("special") else TOKEN_USER_DEFINED
    tokens = [""] * (max(vocab.values()) + 1)
    for tok, i in vocab.items():
        tokens[i] = tok
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    pre = _detect_pretokenizer(data.get("pre_tokenizer"))
    cfg = {}
    if (path / "tokenizer_config.json").is_file():
        cfg = json.loads((path / "tokenizer_config.json").read_text())

    def token_id(key):
        t = cfg.get(key)
        t = t.get("content") if isinstance(t, dict) else t
        return vocab.get(t) if t is not None else None

    return Tokenizer(tokens, merges, [types.get(i, TOKEN_NORMAL) for i in range(len(tokens))], pre=pre,
                     bos_id=token_id("bos_token"), eos_id=token_id("eos_token"), unk_id=token_id("unk_token"),
                     add_bos=bool(cfg.get("add_bos_token", False)), chat_template=cfg.get("chat_template"),
                     name=str(path / "tokenizer.json"))


def _detect_pretokenizer(pt) -> str:
    """tokenizer.json's pre_tokenizer -> the name of llmkern's matching scanner."""
    parts = pt.get("pretokenizers", []) if pt and pt.get("type") == "Sequence" else [pt] if pt else []
    kinds = [p.get("type") for p in parts]
    if "Digits" in kinds and "ByteLevel" in kinds:
        return "smollm"
    for p in parts:
        if p.get("type") == "Split":
            pattern = p.get("pattern", {}).get("Regex", "")
            if "\\p{N}{1,3}" in pattern:
                return "llama3"
            if "\\p{N}" in pattern and "[^\\r\\n\\p{L}\\p{N}]?\\p{L}+" in pattern:
                return "qwen2"
    if kinds == ["ByteLevel"]:
        return "gpt2"
    raise ValueError(f"unsupported pre_tokenizer in tokenizer.json: {kinds}")


# ------------------------------------------------------------------ patching a transformers model


# Keyword arguments transformers passes to attention functions that change nothing here: positions (rotary is
# already applied), cache bookkeeping, and the sliding window (enforced through the mask, which sends the call
# to the fallback whenever the window cuts into the keys). Any other non-None keyword (attention sinks
# `s_aux`, packed-sequence `cu_seq_lens_*`, a position bias, ...) changes the result: such calls go to the
# model's own eager attention rather than being computed without it.
_NEUTRAL_ATTENTION_KWARGS = frozenset({"position_ids", "use_cache", "cache_position", "sliding_window",
                                       "output_attentions", "past_key_values", "past_key_value"})


def _model_eager_attention(module):
    """The eager attention function of `module`'s transformers model file (each defines one, with its own
    extras such as softcap or sinks), or None."""
    import sys

    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)


def _additive_mask(attention_mask, query, key, causal):
    """The mask registered for llmkern's attention is SDPA's (boolean, True = visible, or None where SDPA's
    own causal flag suffices); eager attention functions add a float mask to the scores and apply no causal
    mask themselves. Returns that float mask [.., Sq, Sk] (0 visible, dtype's min hidden), or None. A None
    mask with Sq > 1 means SDPA's is_causal, which is top-left aligned (query i sees keys 0..i; transformers
    drops the mask only where that is right); with Sq == 1 every key is visible, as in SDPA's adapter."""
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        return attention_mask  # already additive
    Sq, Sk = query.shape[-2], key.shape[-2]
    if attention_mask is None:
        if not (causal and Sq > 1):
            return None
        i = torch.arange(Sq, device=query.device)
        attention_mask = torch.arange(Sk, device=query.device)[None, :] <= i[:, None]  # [Sq, Sk] top-left
    hidden = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device)
    return hidden.masked_fill_(~attention_mask, torch.finfo(query.dtype).min)


def _attention_fn(backend):
    def llmkern_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                          **kwargs):
        """query [B, Hq, Sq, D], key/value [B, Hk, Sk, D] (rotated, cache updated) -> ([B, Sq, Hq, D], None)."""
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        D = query.shape[-1]
        softcap = kwargs.get("softcap")  # Gemma 2's attn_logit_softcapping: cap * tanh(s / cap)
        extra = sorted(k for k, v in kwargs.items() if v is not None and k not in _NEUTRAL_ATTENTION_KWARGS
                       and k != "softcap")
        if extra or attention_mask is not None or dropout or not causal or D % 8 or not 32 <= D <= 256:
            if extra or softcap is not None:  # SDPA takes neither: the model's eager attention does
                eager = _model_eager_attention(module)
                if eager is None:
                    raise NotImplementedError(
                        f"llmkern attention: {type(module).__name__} passes {extra or ['softcap']}, which neither "
                        "llmkern nor SDPA computes, and its model file has no eager_attention_forward: "
                        "patch(..., attention=False)")
                mask = _additive_mask(attention_mask, query, key, causal)
                return eager(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
            from transformers.integrations.sdpa_attention import sdpa_attention_forward
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, is_causal=is_causal, **kwargs)
        cap = float(softcap) if softcap is not None else 0.0
        B, Hq, Sq, _ = query.shape
        if Sq == 1:
            # Decode: the cache [B, Hk, Sk, D] read in place as a [B, Sk, Hk, D] view (no copy of the
            # growing cache per step), every sequence holding all Sk keys; [B, Hq, 1, D] -> [B, Hq, D].
            Sk = key.shape[2]
            lens = torch.full((B,), Sk, dtype=torch.int32, device=query.device)
            with values_vouched():  # (every length is the cache's Sk: nothing to read back from a GPU to check)
                out = ops.decode_attention(query.view(B, Hq, D), key.transpose(1, 2), value.transpose(1, 2), lens,
                                           scale=scaling, softcap=cap, backend=backend)
            return out.view(B, 1, Hq, D), None  # [B, Hq, D] -> [B, 1, Hq, D]
        if key.shape[2] > Sq:
            # transformers drops the mask (Sq > 1) only where SDPA's is_causal, aligned top-left, is right:
            # Sk == Sq, or a static cache's first prefill, whose keys past Sq are unwritten padding. Top-left
            # causal sees keys 0..Sq-1 only, so those are the keys (then bottom-right == top-left).
            key, value = key[:, :, :Sq], value[:, :, :Sq]  # [B, Hk, Sq, D]
        # [B, H, S, D] -> [B, S, H, D]
        q, k, v = (t.transpose(1, 2).contiguous() for t in (query, key, value))
        return ops.attention(q, k, v, causal=True, scale=scaling, softcap=cap, backend=backend), None
    return llmkern_attention


def _set_attn_impl(hf_model, name):
    if hasattr(hf_model, "set_attn_implementation"):
        try:
            hf_model.set_attn_implementation(name)
            return
        except (ValueError, TypeError, AttributeError):
            pass
    for m in hf_model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = name


def patch(hf_model, *, quant: str | None = None, group_size: int | None = None, mode: str | None = None,
          norms: bool = True, attention: bool = True, cache: bool = True, skip=(), keep_float: bool = False,
          backend=None):
    """Put llmkern's kernels into a transformers decoder in place; returns the model. `unpatch` undoes it.

    quant None/"none": keep the float linears; "int8"/"int4": quantize every nn.Linear except `skip`
    (names or last name components), the lm_head included: it is the largest matrix a decode step reads
    (SmolLM2-135M: 49152 x 576, a third of the model), and llama.cpp-style files store it quantized too.
    A tied lm_head gets its own quantized copy; the embedding keeps its float weights. A quantized lm_head
    of a bf16/fp16 model on the CPU computes float32 logits from the upcast hidden state (a forward
    pre-hook; same speed, as the head streams its weights): 16-bit logits tie often enough to change
    greedy answers (see llmkern.models.decode_plan.head_logits). mode: int8
    "w8a16" (default) / "w8a8", int4 "w4a16" (default) / "w4a8" / "w4a8g" (see llmkern.ops).
    norms: RMSNorm modules -> llmkern.nn.RMSNorm (sharing the weight), each only after it computed the same
    as the module it replaces on a probe input (Gemma-style x_hat * (1 + w) norms stay as they are).
    attention: attention through llmkern.ops.attention (prefill) and llmkern.ops.decode_attention (decode steps, reading the cache in
    place) for causal, unpadded batches (others: transformers' SDPA). cache: `hf_model.generate` uses an
    `LlmkernCache` (llmkern/models/hf_cache.py: preallocated, appends through ops.kv_cache_append)
    unless the caller passes a cache. With attention=True the forward of each Llama/Mistral/Qwen2
    attention module is replaced too (llmkern/models/hf_attention.py): q/k/v projections in llmkern's
    layout, rotary by llmkern from the model's own frequencies (fused into the LlmkernCache append, else
    ops.rotary_embedding), then the attention above. Models whose rotary llmkern cannot reproduce keep
    transformers' attention forward (and its rotary).
    keep_float: with quant, whether the model keeps the float nn.Linear modules it quantized (for `unpatch`
    to put back exactly). False (default): they are released, so quantizing saves their memory, and
    `unpatch` puts back nn.Linear modules holding the dequantized weights.
    """
    if getattr(hf_model, "_llmkern_undo", None) is not None:
        raise ValueError("patch: this model is already patched (call llmkern unpatch first)")
    if quant not in (None, "none", "int8", "int4"):
        raise ValueError(f"patch: quant must be None, 'none', 'int8' or 'int4', got {quant!r}")
    undo = []  # (parent, attribute, original module)
    skip = {skip} if isinstance(skip, str) else set(skip)
    for name, mod in list(hf_model.named_modules()):
        parent_name, _, attr = name.rpartition(".")
        if not attr:
            continue
        parent = hf_model.get_submodule(parent_name) if parent_name else hf_model
        new = None
        if isinstance(mod, nn.Linear) and quant in ("int8", "int4") and attr not in skip and name not in skip:
            try:
                new = (lnn.Int8Linear.from_linear(mod, mode=mode or "w8a16", group_size=group_size or 0,
                                                  backend=backend)
                       if quant == "int8" else
                       lnn.Int4Linear.from_linear(mod, group_size=group_size or 32, mode=mode or "w4a16",
                                                  backend=backend))
            except ValueError as e:  # (nothing is replaced yet: the model is left as it was)
                raise ValueError(f"patch: cannot quantize {name} ({mod.in_features} -> {mod.out_features}) to "
                                 f"{quant} with group_size={group_size}: {e}") from e
        elif norms and type(mod).__name__.endswith("RMSNorm") and getattr(mod, "weight", None) is not None:
            eps = getattr(mod, "variance_epsilon", getattr(mod, "eps", None))
            if eps is not None and mod.weight.dim() == 1 and type(mod).forward.__code__.co_argcount == 2:
                new = lnn.RMSNorm(mod.weight.shape[0], eps, device="meta", dtype=mod.weight.dtype, backend=backend)
                new.weight = mod.weight  # shared, not copied
                if not _same_norm(mod, new):
                    new = None  # another formula under the same name (Gemma's x * (1 + w), ...): left alone
        if new is not None:
            undo.append((parent, attr, mod, new))
    # Replace only once every new module was built: a layer that cannot be quantized leaves the model as it was.
    for parent, attr, mod, new in undo:
        setattr(parent, attr, new)
    # (parent, attribute, original module); None for a quantized linear whose float weights are released
    undo = [(p, a, None if isinstance(n, (lnn.Int8Linear, lnn.Int4Linear)) and not keep_float else m)
            for p, a, m, n in undo]
    old_impl = None
    routed = []
    if attention:
        try:
            from transformers import AttentionInterface
            from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
        except ImportError as e:
            raise ImportError(f"patch(attention=True) needs a transformers version with AttentionInterface: {e}") from e
        impl = "llmkern" if backend is None else f"llmkern_{backend}"
        AttentionInterface.register(impl, _attention_fn(backend))
        ALL_MASK_ATTENTION_FUNCTIONS.register(impl, sdpa_mask)  # same masks as SDPA (None when causal suffices)
        old_impl = hf_model.config._attn_implementation
        _set_attn_impl(hf_model, impl)
        from .hf_attention import route

        routed = route(hf_model, backend, impl)
    if cache and hasattr(hf_model, "generate"):
        _route_cache(hf_model)
    hooks = []
    head = hf_model.get_output_embeddings() if hasattr(hf_model, "get_output_embeddings") else None
    if isinstance(head, (lnn.Int8Linear, lnn.Int4Linear)):
        hooks.append(head.register_forward_pre_hook(_fp32_head_input))
    # (the model's dtype now: unpatch converts the kept float linears only if a model.to(...) changed it since)
    hf_model._llmkern_undo = (undo, old_impl, routed, hooks, getattr(hf_model, "dtype", None))
    return hf_model


def _dequantized_linear(q, dtype) -> nn.Linear:
    """An nn.Linear (on q's device, in `dtype`) holding the dequantized weights and the bias of Int8Linear /
    Int4Linear `q`: what `unpatch` puts back for a quantized linear whose float weights patch released."""
    if isinstance(q, lnn.Int8Linear):
        w = ops.dequantize_int8(q.weight, q.weight_scale)  # float32 [N, K]
    else:
        w = ops.dequantize_int4(q.qweight, q.scales, q.offsets)  # float32 [N, K]
    lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device="meta")
    lin.weight = nn.Parameter(w.to(dtype))
    if q.bias is not None:
        lin.bias = nn.Parameter(q.bias.detach().to(device=w.device, dtype=dtype))
    return lin


def _same_norm(mod, new) -> bool:
    """Whether the llmkern RMSNorm `new` (x * rsqrt(mean(x^2) + eps) * w, sharing mod's weight) computes what
    transformers' `mod` does. Many architectures name other formulas "RMSNorm" (Gemma's and a dozen others'
    x_hat * (1 + w), norms with a bias or without eps inside the root), so the class name alone would swap
    them silently: both run on one random input (8 rows, a fixed seed) and must agree within the op's tolerance
    (fp32 1e-5, 16-bit 1e-2, relative); the first call also proves `new` can take the weight's device/dtype."""
    w = mod.weight
    if w.device.type == "meta":
        return False
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, w.shape[0], generator=g).to(device=w.device, dtype=w.dtype)
    try:
        with torch.no_grad():
            want, got = mod(x), new(x)
    except (RuntimeError, TypeError, ValueError, NotImplementedError):
        return False
    if not isinstance(want, torch.Tensor) or want.shape != got.shape or want.dtype != got.dtype:
        return False
    tol = 1e-5 if w.dtype == torch.float32 else 1e-2
    want, got = want.double(), got.double()
    return bool(torch.isfinite(got).all()) and float((got - want).norm()) <= tol * float(want.norm())


def _fp32_head_input(module, args):
    """Forward pre-hook of a patched model's quantized lm_head: a 16-bit CPU hidden state is upcast, so the
    head computes float32 logits (16-bit logits tie; see `patch`)."""
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.is_cpu and x.dtype in (torch.bfloat16, torch.float16):
        return (x.float(),) + tuple(args[1:])
    return None


def _route_cache(hf_model) -> None:
    """`hf_model.generate` gets an llmkern cache (models/hf_cache.py) unless the caller passes one. The wrapper
    is bound to the model (types.MethodType), so `copy.deepcopy` rebinds it to the copy."""
    import types

    hf_model.generate = types.MethodType(_generate_with_llmkern_cache, hf_model)


def _generate_with_llmkern_cache(self, *args, **kwargs):
    """transformers' generate (the class's) with an `LlmkernCache` as the cache, unless the call passes a cache,
    names a cache_implementation (transformers refuses one together with a cache object), or turns the cache off
    (`use_cache=False` as an argument, else in the generation config passed or the model's)."""
    import inspect

    from .hf_cache import new_cache

    gen_cfg = kwargs.get("generation_config") or getattr(self, "generation_config", None)
    chosen = kwargs.get("cache_implementation") or getattr(gen_cfg, "cache_implementation", None)
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = getattr(gen_cfg, "use_cache", True)
    if (kwargs.get("cache") is None and kwargs.get("past_key_values") is None and use_cache is not False
            and chosen is None):
        key = "cache" if "cache" in inspect.signature(self.forward).parameters else "past_key_values"
        kwargs[key] = new_cache()
    return type(self).generate(self, *args, **kwargs)


def unpatch(hf_model):
    """Restore the modules, attention forwards and attention implementation that `patch` replaced."""
    state = getattr(hf_model, "_llmkern_undo", None)
    if state is None:
        raise ValueError("unpatch: this model was not patched by llmkern")
    undo, old_impl, routed, hooks, patched_dtype = state
    from .hf_attention import unroute

    for h in hooks:
        h.remove()
    unroute(routed)
    dtype = getattr(hf_model, "dtype", None) or torch.float32  # transformers: its first floating parameter's
    for parent, attr, mod in reversed(undo):
        now = getattr(parent, attr)
        if isinstance(now, (lnn.Int8Linear, lnn.Int4Linear)):
            # The model may have moved or changed dtype since patch (model.to(...)): the restored linear follows;
            # a kept original is converted only then (a mixed-dtype model gets its linears back as they were).
            device = (now.weight if isinstance(now, lnn.Int8Linear) else now.qweight).device  # (not buffers():
            # a released Int4Linear lists its bias alone; reading qweight restores the canonical tensors)
            if mod is None:
                mod = _dequantized_linear(now, dtype)
            else:
                mod = mod.to(device=device, dtype=dtype if dtype != patched_dtype else None)
        setattr(parent, attr, mod)
    if old_impl is not None:
        _set_attn_impl(hf_model, old_impl)
    hf_model.__dict__.pop("generate", None)  # the class's generate again (see _route_cache)
    hf_model.__dict__.pop("_llmkern_undo", None)  # no trace of the patch left on the instance
    return hf_model
