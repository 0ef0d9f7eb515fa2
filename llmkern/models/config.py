"""ModelConfig: the hyper-parameters of a Llama-family decoder (Llama 2/3, SmolLM2, Qwen2, Mistral).

A config comes from a GGUF file's metadata (`ModelConfig.from_gguf_metadata`), from a Hugging Face
`config.json` dict (`ModelConfig.from_hf_config`), or from a preset (`ModelConfig.preset(name)`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

# GGUF `general.architecture` values this runtime reads. Each stores its hyper-parameters under
# "<arch>.<key>" with the same key names.
GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2")


MAX_POSITIONS = 1 << 24  # the longest context a config may declare (GGUF context_length, HF max_position_embeddings)


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    head_dim: int = 0                      # 0: hidden_size // num_heads
    rms_eps: float = 1e-5
    rope_base: float = 10000.0
    rope_scaling: dict | None = None       # None, {"type": "linear", "factor"} or {"type": "llama3", ...}
    tie_embeddings: bool = False           # lm_head shares the token embedding matrix
    max_positions: int = 4096
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    attention_bias: bool = False           # q/k/v projections carry a bias (Qwen2)
    o_bias: bool = False                   # the output projection too (Llama's attention_bias=True)
    arch: str = "llama"
    name: str = ""
    extra: dict = field(default_factory=dict)  # anything else worth keeping (e.g. sliding_window)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig: {name} must be > 0, got {getattr(self, name)}")
        if self.head_dim == 0:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"ModelConfig: hidden_size {self.hidden_size} is not divisible by "
                                 f"num_heads {self.num_heads}; give head_dim explicitly")
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig: num_heads {self.num_heads} must be a multiple of "
                             f"num_kv_heads {self.num_kv_heads}")
        if not (math.isfinite(self.rope_base) and self.rope_base > 0):
            raise ValueError(f"ModelConfig: rope_base must be a positive finite number, got {self.rope_base}")
        if not (math.isfinite(self.rms_eps) and self.rms_eps >= 0):
            raise ValueError(f"ModelConfig: rms_eps must be a finite number >= 0, got {self.rms_eps}")
        if not 0 < self.max_positions <= MAX_POSITIONS:
            # (the rotary table holds max_positions rows: 2^24 of them at head dim 128 are 8 GiB)
            raise ValueError(f"ModelConfig: max_positions must be in 1..{MAX_POSITIONS}, got {self.max_positions}")

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ sizes

    def num_parameters(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.attention_bias:
            attn += d * (self.num_heads + 2 * self.num_kv_heads)
        if self.o_bias:
            attn += h
        layer = attn + 3 * h * i + 2 * h
        emb = self.vocab_size * h
        return self.num_layers * layer + h + emb * (1 if self.tie_embeddings else 2)

    # ------------------------------------------------------------------ GGUF

    @classmethod
    def from_gguf_metadata(cls, meta: dict, *, source: str = "GGUF file") -> "ModelConfig":
        """meta: {key: python value} of a GGUF file (see gguf_loader.read_metadata).

        Reads `general.architecture` and the "<arch>.*" keys; vocab size falls back to the token list.
        Whether embeddings are tied is a property of the tensors (no `output.weight`), so the loader
        sets `tie_embeddings`; here it defaults to False.
        """
        arch = meta.get("general.architecture")
        if arch not in GGUF_ARCHITECTURES:
            raise ValueError(f"{source}: unsupported architecture {arch!r}; llmkern runs {GGUF_ARCHITECTURES}")

        def get(key, default=None, required=False):
            full = f"{arch}.{key}"
            if full in meta:
                return meta[full]
            if required:
                raise ValueError(f"{source}: metadata key {full!r} is missing")
            return default

        heads = int(get("attention.head_count", required=True))
        hidden = int(get("embedding_length", required=True))
        if heads <= 0 or hidden <= 0:
            raise ValueError(f"{source}: {arch}.attention.head_count ({heads}) and {arch}.embedding_length ({hidden}) "
                             "must be > 0")
        vocab = get("vocab_size")
        if vocab is None:
            tokens = meta.get("tokenizer.ggml.tokens")
            if tokens is None:
                raise ValueError(f"{source}: neither {arch}.vocab_size nor tokenizer.ggml.tokens is present")
            vocab = len(tokens)
        scaling = None
        kind = get("rope.scaling.type")
        factor = get("rope.scaling.factor")
        if kind in ("linear",) and factor and float(factor) != 1.0:
            scaling = {"type": "linear", "factor": float(factor)}
        elif kind not in (None, "none", "linear"):
            raise ValueError(f"{source}: unsupported rope scaling {kind!r} (llmkern supports none and linear "
                             f"from GGUF metadata)")
        rope_dim = get("rope.dimension_count")
        head_dim = int(get("attention.key_length", 0) or 0)
        if not head_dim:
            if hidden % heads:
                raise ValueError(f"{source}: {arch}.embedding_length {hidden} is not a multiple of "
                                 f"{arch}.attention.head_count {heads} (and no attention.key_length gives the head dim)")
            head_dim = hidden // heads
        if rope_dim is not None and int(rope_dim) != head_dim:
            raise ValueError(f"{source}: {arch}.rope.dimension_count={rope_dim} differs from the head dim {head_dim} "
                             f"({'attention.key_length' if get('attention.key_length') else 'embedding_length / head_count'}"
                             "): partial rotary is not supported (or the metadata is inconsistent)")
        extra = {}
        if get("attention.sliding_window") is not None:
            extra["sliding_window"] = int(get("attention.sliding_window"))
        try:
            return cls._from_gguf_fields(meta, arch, get, int(vocab), hidden, heads, head_dim, scaling, extra)
        except ValueError as e:  # the config's checks, named after the file
            msg = str(e)
            raise ValueError(msg if msg.startswith(source) else f"{source}: {msg}") from e

    @classmethod
    def _from_gguf_fields(cls, meta, arch, get, vocab, hidden, heads, head_dim, scaling, extra) -> "ModelConfig":
        return cls(
            vocab_size=int(vocab),
            hidden_size=hidden,
            num_layers=int(get("block_count", required=True)),
            num_heads=heads,
            num_kv_heads=int(get("attention.head_count_kv", heads)),
            intermediate_size=int(get("feed_forward_length", required=True)),
            head_dim=head_dim,
            rms_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_base=float(get("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            tie_embeddings=False,
            max_positions=int(get("context_length", 4096)),
            bos_token_id=_opt_int(meta.get("tokenizer.ggml.bos_token_id")),
            eos_token_id=_opt_int(meta.get("tokenizer.ggml.eos_token_id")),
            attention_bias=(arch == "qwen2"),
            arch=arch,
            name=str(meta.get("general.name", "")),
            extra=extra,
        )

    # ------------------------------------------------------------------ Hugging Face config.json

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelConfig":
        """cfg: a Hugging Face config.json dict (LlamaConfig, MistralConfig, Qwen2Config)."""
        model_type = cfg.get("model_type", "llama")
        if model_type not in ("llama", "mistral", "qwen2"):
            raise ValueError(f"from_hf_config: unsupported model_type {model_type!r} (llama, mistral, qwen2)")
        heads = int(cfg["num_attention_heads"])
        if cfg.get("mlp_bias"):
            raise ValueError("from_hf_config: mlp_bias=True is not supported")
        # transformers >= 5 keeps rope_theta and the scaling under "rope_parameters"
        rope = dict(cfg.get("rope_parameters") or {})
        rope_base = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling is not None:
            scaling = dict(scaling)
            scaling.setdefault("type", scaling.get("rope_type"))
        eos = cfg.get("eos_token_id")
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        extra = {}
        if cfg.get("sliding_window") and cfg.get("use_sliding_window", model_type == "mistral"):
            extra["sliding_window"] = int(cfg["sliding_window"])
            n = int(cfg["num_hidden_layers"])
            if cfg.get("layer_types"):  # (transformers >= 4.53 lists each layer's kind)
                extra["sliding_layers"] = [i for i, t in enumerate(cfg["layer_types"]) if t == "sliding_attention"]
            elif model_type == "qwen2":  # Qwen2: layers from max_window_layers on slide
                extra["sliding_layers"] = list(range(int(cfg.get("max_window_layers", n)), n))
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            intermediate_size=int(cfg["intermediate_size"]),
            head_dim=int(cfg.get("head_dim") or 0),
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_base=float(rope_base),
            rope_scaling=scaling,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_positions=int(cfg.get("max_position_embeddings", 4096)),
            bos_token_id=_opt_int(cfg.get("bos_token_id")),
            eos_token_id=_opt_int(eos),
            attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            o_bias=bool(cfg.get("attention_bias", False)) and model_type != "qwen2",
            arch=model_type,
            name=str(cfg.get("_name_or_path", "")),
            extra=extra,
        )

    # ------------------------------------------------------------------ presets

    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        """One of PRESETS (case-insensitive): the published hyper-parameters of that model."""
        for key, kwargs in PRESETS.items():
            if key.lower() == name.lower():
                return cls(name=key, **kwargs)
        raise ValueError(f"ModelConfig.preset: unknown preset {name!r}; known: {sorted(PRESETS)}")


def _opt_int(v):
    return None if v is None else int(v)


# The published configs (config.json of each model on the Hugging Face hub).
PRESETS = {
    "SmolLM2-135M": dict(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
                         intermediate_size=1536, rms_eps=1e-5, rope_base=100000.0, tie_embeddings=True,
                         max_positions=8192, bos_token_id=1, eos_token_id=2),
    "Llama-2-7B": dict(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                       intermediate_size=11008, rms_eps=1e-5, rope_base=10000.0, max_positions=4096,
                       bos_token_id=1, eos_token_id=2),
    "Llama-3-8B": dict(vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                       intermediate_size=14336, rms_eps=1e-5, rope_base=500000.0, max_positions=8192,
                       bos_token_id=128000, eos_token_id=128001),
    "Qwen2-7B": dict(vocab_size=152064, hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4,
                     intermediate_size=18944, rms_eps=1e-6, rope_base=1000000.0, max_positions=32768,
                     bos_token_id=None, eos_token_id=151643, attention_bias=True, arch="qwen2"),
    "Qwen2-0.5B": dict(vocab_size=151936, hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
                       intermediate_size=4864, rms_eps=1e-6, rope_base=1000000.0, tie_embeddings=True,
                       max_positions=32768, bos_token_id=None, eos_token_id=151643, attention_bias=True,
                       arch="qwen2"),
    "Mistral-7B": dict(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                       intermediate_size=14336, rms_eps=1e-5, rope_base=10000.0, max_positions=32768,
                       bos_token_id=1, eos_token_id=2, arch="mistral"),
}
