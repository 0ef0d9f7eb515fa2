"""QuantizedEmbedding: a token embedding table kept in the canonical int8 or int4 layout.

A model loaded from a quantized GGUF file used to hold its embedding as a float table: SmolLM2-135M's
[49152, 576] is 113 MB in fp32, more than every other weight of the model together (105 MB in the
Q4_K_M file), and Llama-3-8B's [128256, 4096] would be 2.1 GB. A lookup reads one row per token, so
the table can stay as the file stores it and be dequantized a row at a time: the rows are exactly the
values of the float table (the same `dequantize_int8` / `dequantize_int4`, then the same cast to
`dtype`), at a quarter (int8) or a fifth to a sixth (int4) of the fp32 bytes, or at no extra bytes
when the lm_head is tied to the embedding and holds the same tensors (`llmkern.models.load_gguf`). An int8
table tied to its Int8Linear head (`tie_to`) goes further: once the head holds its packed CPU layout alone, the
table reads its rows there too (one copy of the int8 weights in the model; see "Tied to a released lm_head").

Buffers (the canonical layouts of llmkern/formats/README.md, as the quantized linears hold them):
- int8: `weight` int8 [V, H], `weight_scale` float32 [V] or [V, H // G];
- int4: `qweight` uint8 [V, H // 2], `scales`, `offsets` float32 [V, H // G];
- int5: `codes` uint8 [V, H] (0..31), `scales`, `offsets` float32 [V, H // G]: a GGUF Q5_1 / Q5_K table as stored
  (`llmkern.formats.gguf_kquants.q5_to_int5`), value = float32(code) * scale + offset, gguf's values exactly,
  1.25 bytes per weight at G = 32 (no linear takes this form: their Q5 weights are re-quantized to int8).
`dtype` is the output's (the model's activations); .to(dtype) / .half() change it and leave the buffers'
dtypes alone. Inference only (no gradient reaches the table).
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..ops import _unpack

FORMATS = ("int8", "int4", "int5")
_BUFFERS = {"int8": ("weight", "weight_scale"), "int4": ("qweight", "scales", "offsets"),
            "int5": ("codes", "scales", "offsets")}


def _dequantize_int5(codes, scales, offsets):
    """codes uint8 [n, H], scales / offsets float32 [n, H // G] -> float32 [n, H] = float32(codes) * scale + offset,
    the product rounded to float32 before the sum (two torch ops), as gguf computes Q5_1 / Q5_K values."""
    n, H = codes.shape
    G = H // scales.shape[1]
    w = codes.view(n, H // G, G).float() * scales.unsqueeze(-1)  # [n, H/G, G]
    return (w + offsets.unsqueeze(-1)).view(n, H)


_DEQUANTIZE = {"int8": ops.dequantize_int8, "int4": ops.dequantize_int4, "int5": _dequantize_int5}  # (rows) -> float32


class QuantizedEmbedding(nn.Module):
    """ids (any integer shape [...]) -> rows [..., H] in `dtype`, dequantized from the int8 / int4 table."""

    def __init__(self, tensors: dict, *, dtype=torch.float32):
        super().__init__()
        fmt = "int4" if "qweight" in tensors else "int5" if "codes" in tensors else "int8"
        names = _BUFFERS[fmt]
        if set(tensors) != set(names):
            raise ValueError(f"QuantizedEmbedding: tensors must be {list(_BUFFERS['int8'])} (int8), "
                             f"{list(_BUFFERS['int4'])} (int4) or {list(_BUFFERS['int5'])} (int5), "
                             f"got {sorted(tensors)}")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"QuantizedEmbedding: dtype must be torch.float32, bfloat16 or float16, got {dtype}")
        first = tensors[names[0]]
        want = torch.int8 if fmt == "int8" else torch.uint8
        if first.dtype != want or first.dim() != 2 or first.shape[0] < 1 or first.shape[1] < 1:
            raise TypeError(f"QuantizedEmbedding: {names[0]} must be a non-empty {want} [V, H] tensor, got "
                            f"{first.dtype} {list(first.shape)}")
        V = first.shape[0]
        H = first.shape[1] * (2 if fmt == "int4" else 1)
        for n in names[1:]:
            t = tensors[n]
            ok = t.dtype == torch.float32 and ((t.dim() == 2 and t.shape[0] == V and t.shape[1] > 0
                                                and H % t.shape[1] == 0) or (fmt == "int8" and t.shape == (V,)))
            if not ok:
                raise ValueError(f"QuantizedEmbedding: {n} must be float32 [{V}, H // G] with G dividing H={H}"
                                 f"{f' (or [{V}])' if fmt == 'int8' else ''}, got {t.dtype} {list(t.shape)}")
        if fmt != "int8" and tensors["scales"].shape != tensors["offsets"].shape:
            raise ValueError(f"QuantizedEmbedding: scales {list(tensors['scales'].shape)} and offsets "
                             f"{list(tensors['offsets'].shape)} must have the same shape")
        self.format, self.num_embeddings, self.embedding_dim, self.dtype = fmt, V, H, dtype
        for n in names:  # (kept as given, not copied: a tied lm_head may hold the same tensors)
            self.register_buffer(n, tensors[n])

    @classmethod
    def from_gguf(cls, r: dict, *, dtype=torch.float32) -> "QuantizedEmbedding":
        """From a `llmkern.formats.gguf.load_gguf_tensor` dict of format "int8" or "int4"."""
        if r.get("format") not in FORMATS:
            raise ValueError(f"QuantizedEmbedding.from_gguf: format must be one of {FORMATS}, got {r.get('format')!r}")
        return cls({n: r[n] for n in _BUFFERS[r["format"]]}, dtype=dtype)

    # --- Tied to a released lm_head ------------------------------------------------------------------------------
    # An int8 embedding tied to an Int8Linear holding the same tensors (`tie_to`, the GGUF loader's tied Q8_0 head):
    # when the linear lets go of its int8 weight once prepared (nn/_releasable.py), so does the embedding
    # (`_head_released`), whose lookups then read the linear's packed layout (the same values) and the kept
    # scales; whatever needs the tensor back (reading `weight`, .to(), load_state_dict, the linear's own restore)
    # restores the linear's and takes the same tensor again (`_head_restored`). state_dict and copies unpack it.

    def tie_to(self, linear: nn.Module) -> None:
        """Follow `linear` (an Int8Linear holding this int8 table's very tensors): drop the int8 table whenever
        it lets go of it (one copy of the weights: its packed layout), take it back whenever it restores it."""
        if self.format != "int8" or getattr(linear, "_canonical", None) != ("weight",):
            raise ValueError(f"QuantizedEmbedding.tie_to: an int8 table follows an Int8Linear, got format "
                             f"{self.format!r} and {type(linear).__name__}")
        if linear.weight is not self._buffers["weight"] or linear.weight_scale is not self._buffers["weight_scale"]:
            raise ValueError("QuantizedEmbedding.tie_to: the linear must hold this table's very tensors")
        followers = linear.__dict__.setdefault("_followers", [])
        if self not in followers:
            followers.append(self)

    def _head_released(self, linear, gone: dict) -> None:
        # (only while both tensors are still the linear's: a table given other tensors since has its own)
        b = self._buffers
        if b.get("weight") is gone["weight"] and b["weight_scale"] is linear._buffers.get("weight_scale"):
            self.__dict__["_packed_head"] = linear
            del b["weight"]

    def _head_restored(self, linear) -> None:
        if self.__dict__.get("_packed_head") is linear:
            self.__dict__["_packed_head"] = None
            rest = dict(self._buffers)
            self._buffers.clear()  # (in the original order: weight, weight_scale)
            self._buffers.update(weight=linear._buffers["weight"], **rest)

    def packed_source(self):
        """(packed uint8 tensor, its scales) of the released lm_head this table follows, or None: what the decode
        step reads instead of `weight` (models/decode_plan.py)."""
        head = self.__dict__.get("_packed_head")
        # (from the release, not the prepared run: a backend or mode change drops the run, not the release)
        return None if head is None else (head._released[0].packed, self._buffers["weight_scale"])

    def _restore(self) -> None:
        head = self.__dict__.get("_packed_head")
        if head is not None:
            head.weight  # noqa: B018 - the linear restores its weight and gives it back (_head_restored)

    def __getattr__(self, name):
        if name == "weight" and self.__dict__.get("_packed_head") is not None and not torch.compiler.is_compiling():
            self._restore()
        return super().__getattr__(name)

    def __setattr__(self, name, value):
        if name == "weight" and self.__dict__.get("_packed_head") is not None:
            self._restore()  # (so that the value lands in _buffers, in its place, not as a plain attribute)
        super().__setattr__(name, value)

    def __delattr__(self, name):
        if name == "weight" and self.__dict__.get("_packed_head") is not None:
            self._restore()
        super().__delattr__(name)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        head = self.__dict__.get("_packed_head")
        if head is not None:  # (unpacked into the result only; the head's tensor, if it is in the result too)
            destination[prefix + "weight"] = head._unpacked()[0]
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._restore()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __getstate__(self):
        state = super().__getstate__()
        head = state.pop("_packed_head", None)
        if head is not None:  # the copy holds the table (the head's copy's, where the copy has the head too)
            state["_buffers"] = {"weight": head._unpacked()[0], **self._buffers}
        return state

    @classmethod
    def from_linear(cls, linear: nn.Module, *, dtype=torch.float32) -> "QuantizedEmbedding":
        """Sharing a quantized linear's canonical tensors (Int8Linear / Int4Linear [V, H]): a tied lm_head. The
        linear then keeps them (it would otherwise let go of them once prepared, which frees nothing while the
        embedding holds them, and rebuild a second copy whenever they are read)."""
        fmt = "int4" if hasattr(linear, "qweight") else "int8"
        out = cls({n: getattr(linear, n) for n in _BUFFERS[fmt]}, dtype=dtype)  # (a released linear restores them)
        linear.keep_canonical()
        return out

    def tensors(self) -> tuple:
        """The canonical tensors, in the order of the ops' arguments."""
        return tuple(getattr(self, n) for n in _BUFFERS[self.format])

    @property
    def device(self) -> torch.device:
        return self._buffers[_BUFFERS[self.format][-1]].device  # (the scales or offsets: never released)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids [...] -> flat [n] -> rows [n, H] -> [..., H]
        if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"QuantizedEmbedding: ids must be an integer tensor, got {ids.dtype}")
        flat = ids.reshape(-1)
        # (checked on the CPU, as nn.Embedding does; on a GPU index_select's device-side check stands, and no
        # host sync breaks CUDA-graph capture)
        if flat.is_cpu and flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise IndexError(f"QuantizedEmbedding: ids must be in [0, {self.num_embeddings}), got "
                             f"[{int(flat.min())}, {int(flat.max())}]")
        flat = flat.to(device=self.device, dtype=torch.int64)
        src = self.packed_source()
        if src is not None:  # (the released lm_head's packed layout: the same int8 values)
            rows = [_unpack.int8_packed_rows(src[0], flat, self.num_embeddings, self.embedding_dim),
                    src[1].index_select(0, flat)]
        else:
            rows = [t.index_select(0, flat) for t in self.tensors()]
        out = _DEQUANTIZE[self.format](*rows)
        return out.to(self.dtype).reshape(*ids.shape, self.embedding_dim)

    def dequantize(self) -> torch.Tensor:
        """The whole table [V, H] in `dtype` (what a float nn.Embedding of the same values would hold)."""
        return _DEQUANTIZE[self.format](*self.tensors()).to(self.dtype)

    def row_bytes(self) -> int:
        """Bytes one lookup reads (a row of each buffer; of a released int8 table, its H bytes)."""
        rest = [self._buffers[n] for n in _BUFFERS[self.format][1:]]
        codes = self.embedding_dim // (2 if self.format == "int4" else 1)  # (int8, int5: a byte per value)
        return codes + sum(t[0].numel() * t.element_size() for t in rest)

    def _apply(self, fn, recurse=True):
        # .to(device) moves the buffers; .to(dtype) / .half() / .float() set the output dtype only (the ops
        # read the scales and offsets as float32, the codes as integers).
        self._restore()
        for n in _BUFFERS[self.format]:
            t = self._buffers[n]
            moved = fn(t)
            self._buffers[n] = moved if moved.dtype == t.dtype else t.to(device=moved.device)
        probe = fn(torch.empty(0, dtype=self.dtype, device=self.device))
        if probe.is_floating_point():
            self.dtype = probe.dtype
        return self

    def extra_repr(self) -> str:
        t = self._buffers[_BUFFERS[self.format][1]]
        g = self.embedding_dim if t.dim() == 1 else self.embedding_dim // t.shape[1]
        return f"{self.num_embeddings}, {self.embedding_dim}, format={self.format}, group_size={g}, dtype={self.dtype}"
