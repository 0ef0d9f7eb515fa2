"""Writer of tiny random Llama GGUF files in every supported tensor type, laid out as llama.cpp's
converter writes them (q/k rows permuted for interleaved rotary), for the runtime tests."""
from __future__ import annotations

import numpy as np
import torch

from llmkern.models.config import ModelConfig
from llmkern.models.tokenizer import bytes_to_unicode

# tiny tokenizer: 3 specials, the 256 byte symbols, 4 merges
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n"]


def tiny_vocab():
    tokens = SPECIALS + [bytes_to_unicode()[b] for b in range(256)] + [m.replace(" ", "") for m in MERGES]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return tokens, types


def tiny_config(**kw) -> ModelConfig:
    tokens, _ = tiny_vocab()
    args = dict(vocab_size=len(tokens), hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                intermediate_size=96, rms_eps=1e-5, rope_base=10000.0, max_positions=128, bos_token_id=0,
                eos_token_id=2)
    args.update(kw)
    return ModelConfig(**args)


def converter_permute(n_rows: int, n_head: int) -> np.ndarray:
    """Row order llama.cpp's converter writes q/k in: GGUF row r holds HF row perm[r]. Its rule is
    w.reshape(n_head, 2, D/2, K).swapaxes(1, 2): applied here to the row indices."""
    idx = np.arange(n_rows).reshape(n_head, 2, n_rows // n_head // 2).swapaxes(1, 2)
    return idx.reshape(-1)


# type of each tensor role in the tiny files: every supported type appears
TYPES = {"token_embd": "Q8_0", "attn_q": "Q4_1", "attn_k": "Q4_0", "attn_v": "Q8_0", "attn_output": "F16",
         "ffn_gate": "Q4_1", "ffn_up": "Q4_0", "ffn_down": "F32", "output": "Q4_1"}

ROLE_TO_HF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj"}


# Byte offsets of each block type's float16 fields (d, and dmin / m where the type has one).
F16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q4_K": (0, 2),
              "Q5_K": (0, 2), "Q6_K": (208,), "Q3_K": (108,)}
# Minimum scale / minimum relative to d that centres random blocks of a type with a per-group minimum:
# the mean of its q (Q4_K, Q5_K: dmin * m with m ~ U(0..63) against d * sc * q; Q5_1: m = -15.5 d).
_CENTRE = {"Q4_K": 7.5, "Q5_K": 15.5, "Q5_1": -15.5}


def random_blocks(type_name: str, shape, rng, f16_values) -> np.ndarray:
    """Random blocks of a GGUF type for a tensor of torch shape (..., K): uint8 [..., bytes per row], every
    byte random except the float16 fields, drawn by f16_values(shape) -> float array (one per block)."""
    import gguf

    elems, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    raw = rng.integers(0, 256, size=(*shape[:-1], shape[-1] // elems, nbytes), dtype=np.uint8)
    for start in F16_FIELDS[type_name]:
        raw[..., start:start + 2] = np.asarray(f16_values(raw.shape[:-1])).astype(np.float16)[..., None].view(np.uint8)
    return raw.reshape(*shape[:-1], -1)


def scaled_random_blocks(type_name: str, shape, rng, std: float) -> np.ndarray:
    """Random blocks (of the K-quants, which gguf cannot quantize) whose values have about `std`, centred:
    for weights of a runnable random model."""
    import gguf

    qt = gguf.GGMLQuantizationType[type_name]
    fields = F16_FIELDS[type_name]

    def with_d(d):
        raw = random_blocks(type_name, shape, np.random.default_rng(seed), lambda s: np.full(s, d))
        if len(fields) > 1:  # the minimum's field
            raw3 = raw.reshape(*shape[:-1], -1, gguf.GGML_QUANT_SIZES[qt][1])
            raw3[..., fields[1]:fields[1] + 2] = np.float16(d * _CENTRE[type_name]).reshape(1).view(np.uint8)
        return raw

    seed = int(rng.integers(0, 2 ** 31))
    got = np.asarray(gguf.quants.dequantize(with_d(1.0), qt)).std()
    return with_d(std / got)


def _encode(w: np.ndarray, type_name: str):
    """float32 [N, K] -> (data to write, raw dtype or None, the values a reader gets back, float32).
    K-quant types (no quantizer in gguf) get random blocks of w's standard deviation, not w's values."""
    import zlib

    import gguf
    from gguf import quants

    if type_name == "F32":
        return w, None, w
    if type_name == "F16":
        h = w.astype(np.float16)
        return h, None, h.astype(np.float32)
    qt = gguf.GGMLQuantizationType[type_name]
    if type_name in ("Q3_K", "Q4_K", "Q5_K", "Q6_K"):
        q = scaled_random_blocks(type_name, w.shape, np.random.default_rng(zlib.crc32(w.tobytes())), float(w.std()))
        return q, qt, quants.dequantize(q, qt).astype(np.float32)
    q = quants.quantize(w, qt)
    return q, qt, quants.dequantize(q, qt).astype(np.float32)


def write_tiny_gguf(path, *, tied=False, arch="llama", seed=0, types=None, cfg=None, skip=(), meta_extra=None,
                    extra_tensors=None):
    """Write a random tiny Llama GGUF; return (config, HF-order state dict of the values stored).

    The returned state dict holds exactly what a reader dequantizes (quantization is per row, so
    permuting rows commutes with it), keyed like llmkern.models.Llama's parameters.
    """
    import gguf

    types = dict(TYPES, **(types or {}))
    cfg = cfg or tiny_config(tie_embeddings=tied)
    rng = np.random.default_rng(seed)
    H, D, Hq, Hk, I, V = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, cfg.vocab_size
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_positions)
    w.add_embedding_length(H)
    w.add_feed_forward_length(I)
    w.add_head_count(Hq)
    w.add_head_count_kv(Hk)
    w.add_rope_freq_base(cfg.rope_base)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_vocab_size(V)
    w.add_rope_dimension_count(D)
    tokens, ttypes = tiny_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(ttypes)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    for k, v in (meta_extra or {}).items():
        w.add_string(k, v)
    sd = {}

    def add(name, arr, type_name, hf_name, perm_heads=0):
        data, raw, back = _encode(arr.astype(np.float32), type_name)
        if perm_heads:
            perm = converter_permute(arr.shape[0], perm_heads)
            data = data[perm]  # row-wise blocks: permuting the stored rows == quantizing permuted rows
        sd[hf_name] = torch.from_numpy(np.ascontiguousarray(back))
        if name not in skip:
            w.add_tensor(name, np.ascontiguousarray(data), raw_dtype=raw)

    def rnd(*shape, scale=0.3):
        return rng.standard_normal(shape).astype(np.float32) * scale

    add("token_embd.weight", rnd(V, H, scale=1.0), types["token_embd"], "embed_tokens.weight")
    for i in range(cfg.num_layers):
        p, hp = f"blk.{i}.", f"layers.{i}."
        add(p + "attn_norm.weight", 1 + rnd(H, scale=0.1), "F32", hp + "input_layernorm.weight")
        add(p + "ffn_norm.weight", 1 + rnd(H, scale=0.1), "F32", hp + "post_attention_layernorm.weight")
        permute = arch in ("llama", "mistral")
        shapes = {"attn_q": (Hq * D, H), "attn_k": (Hk * D, H), "attn_v": (Hk * D, H), "attn_output": (H, Hq * D),
                  "ffn_gate": (I, H), "ffn_up": (I, H), "ffn_down": (H, I)}
        for role, shape in shapes.items():
            heads = {"attn_q": Hq, "attn_k": Hk}.get(role, 0) if permute else 0
            add(p + role + ".weight", rnd(*shape, scale=shape[1] ** -0.5), types[role], hp + ROLE_TO_HF[role] + ".weight",
                perm_heads=heads)
        if cfg.attention_bias:
            for role, n in (("attn_q", Hq * D), ("attn_k", Hk * D), ("attn_v", Hk * D)):
                add(p + role + ".bias", rnd(n, scale=0.1), "F32", hp + ROLE_TO_HF[role] + ".bias")
    add("output_norm.weight", 1 + rnd(H, scale=0.1), "F32", "norm.weight")
    if not tied:
        add("output.weight", rnd(V, H, scale=H ** -0.5), types["output"], "lm_head.weight")
    else:
        sd["lm_head.weight"] = sd["embed_tokens.weight"]
    for name, arr in (extra_tensors or {}).items():
        w.add_tensor(name, np.asarray(arr, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return cfg, sd


# a small SentencePiece vocabulary: specials, the 256 byte tokens, pieces with scores
SPM_PIECES = ["▁", "a", "b", "c", "▁a", "ab", "▁ab", "bc", "▁abc", "h", "e", "l", "o", "he", "ll", "hell", "hello",
              "▁hello", "▁w", "w", "r", "d", "wor", "world", "▁world", "▁t", "t", "▁th", "▁the", "é", "▁é", ",", "!",
              "1", "2", "▁1", "12"]


def spm_vocab(seed=0):
    """(tokens, scores, types) with scores falling along SPM_PIECES, jittered so that order matters."""
    import random
    rng = random.Random(seed)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES
    types = [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES)
    scores = [0.0] * 259 + [-float(i) + rng.choice([0.0, 0.5]) for i in range(len(SPM_PIECES))]
    return tokens, scores, types


def write_spm_gguf(path):
    """A GGUF holding only a SentencePiece tokenizer (and the few keys readers insist on)."""
    import gguf
    tokens, scores, types = spm_vocab()
    w = gguf.GGUFWriter(str(path), "llama")
    for add, v in ((w.add_block_count, 1), (w.add_context_length, 64), (w.add_embedding_length, 64),
                   (w.add_feed_forward_length, 96), (w.add_head_count, 2), (w.add_head_count_kv, 1),
                   (w.add_layer_norm_rms_eps, 1e-5)):
        add(v)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def assert_greedy_tokens(ref, res, row: int = 0) -> None:
    """Each token generate() produced (res: a GenerationResult) is the float reference model's argmax at its
    position, up to fp32 near-ties (within 1e-5 of the row's largest logit magnitude)."""
    import torch
    seq = res.prompt_tokens[row] + res.tokens[row]
    with torch.inference_mode():
        logits = ref(torch.tensor([seq]))[0].double()  # [T, V]
    P = len(res.prompt_tokens[row])
    for t, tok_id in enumerate(res.tokens[row]):
        r = logits[P - 1 + t]
        assert r[tok_id] >= r.max() - 1e-5 * r.abs().max(), (t, tok_id, int(r.argmax()))
