"""Drop-in replacements for `nn.Linear` with int8 or int4 weights, and `quantize_linears`.

Both modules hold the canonical, documented quantized layout (llmkern/ops/int8_linear.py and
int4_linear.py) as buffers, so `state_dict()` saves exactly that layout and loading it into a freshly
constructed module gives bit-for-bit the same outputs. `forward` calls `llmkern.ops` only, so every
backend speeds these modules up.

Lean eager calls and prepacking: after a module's first call went through the registered op (full
checks), it asks the op to `prepare` its weights (`Op.prepare`): the backend binds them once (and may
repack them into the layout its kernel reads fastest, DESIGN.md "repack once") and returns `run(x)`,
which later calls use for plain activations: no dispatcher, no re-checking of the weights, no
per-call Python work beyond the launch. `self._run` holds it; it is dropped whenever the canonical
buffers or the mode/backend may change (assignment, `_load_from_state_dict`, `_apply` for
.to()/.cuda()) and when LLMKERN_BACKEND changes. Under torch.compile the registered op is used.
On the CPU the prepared run is a `BoundRun` (ops/_cpu_linear.py: weights bound once in C++), and
`__call__` runs it without nn.Module.__call__ -> forward when nothing could tell the difference (no
hooks, no replaced forward, plain eager mode: see `_QuantizedBase.__call__`).

So the buffers are constants once a module has run: change them by assignment (`m.scales = s2`) or
load_state_dict, which re-prepare; in-place edits (`m.scales.mul_(2)`, `m.qweight.data = ...`) are not seen
by the prepared or repacked copies (calls of other sizes, which read the canonical buffers, would see them),
nor by llmkern's decode plan. Inference only: the ops have no backward.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

import torch.nn.modules.module as _nn_module

from .. import ops
from .._backends import env_backend
from ..ops._cpu_linear import BoundRun
from ..ops._registry import _COMPILING, _GRAD, _eager_state
from ..ops.int4_linear import MODES as INT4_MODES, int4_linear_op
from ..ops.int8_linear import MODES, int8_linear_op
from ._fast import FLOATS, plain_activation
from ._releasable import _Releasable

_Tensor = torch.Tensor

INT8_MODES = ("w8a16", "w8a8")
INT4_GROUP_SIZES = (32, 64, 128)


class _QuantizedBase(nn.Module):
    """Shared plumbing: float32 side buffers that .to(dtype)/.half() must not convert, and `_run`."""

    # Buffers that the ops require in float32 whatever dtype the rest of the model is cast to.
    _fp32_buffers: tuple[str, ...] = ()

    _op = None  # the op (Int8Linear: int8_linear_op, Int4Linear: int4_linear_op)

    def __init__(self):
        super().__init__()
        self._trusted = False  # True once the current buffers passed the op's checks (see nn/_fast.py)
        self._run = None  # the op's prepared run(x) for the current buffers (see the module doc)
        self._fast = None  # its BoundRun when __call__ may run it directly (see __call__)

    def __call__(self, x, *args, **kwargs):
        """nn.Module's call, shortened for the common case: in plain eager use (`_eager_state`: not
        compiling or tracing, no torch function/dispatch mode, no profiler), with no hooks (this module's
        or global), a plain CPU float activation [..., in_features] that autograd does not track, and
        the prepared CPU run still valid (LLMKERN_BACKEND unchanged), the prepared run is called
        straight away: what nn.Module.__call__ -> forward would do, minus ~3-5 us of Python per call in a
        model (docs/notes/cpu-op-overhead.md, "Bound runs"). Anything else takes nn.Module.__call__."""
        if not _COMPILING():
            d = self.__dict__
            run = d["_fast"]
            if (run is not None and not args and not kwargs and type(x) is _Tensor and x.is_cpu
                    and not (d["_forward_hooks"] or d["_forward_pre_hooks"] or d["_backward_hooks"]
                             or d["_backward_pre_hooks"] or _nn_module._global_forward_hooks
                             or _nn_module._global_forward_pre_hooks or _nn_module._global_backward_hooks
                             or _nn_module._global_backward_pre_hooks)
                    and x.dtype in FLOATS and x.dim() >= 1 and x.shape[-1] == run.K and run.env == env_backend()
                    and _eager_state() and not (x.requires_grad and _GRAD())):
                out = run(x)
                type(self)._op.last_backend = "cpu"  # (type(self): no probe of the instance's dict)
                return out
        return nn.Module.__call__(self, x, *args, **kwargs)

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if isinstance(value, torch.Tensor) or (value is None and name == "bias") or name in ("mode", "backend"):
            self._invalidate_packed()  # new weights or settings: re-validate and re-prepare
        elif name in ("forward", "_compiled_call_impl"):
            # A replaced forward (accelerate's hooks do this) or Module.compile(): __call__ must not skip them.
            self.__dict__["_fast"] = None

    def __getstate__(self):
        # The prepared run holds raw pointers into this module's buffers (and C++ objects that do not
        # pickle): a copy (copy.deepcopy, pickle, torch.save of the module) prepares its own at its first call.
        state = super().__getstate__()
        state.update(_run=None, _fast=None, _trusted=False)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        for name in ("_run", "_fast"):  # (pickles of older versions lack them)
            self.__dict__.setdefault(name, None)
        self.__dict__.setdefault("_trusted", False)

    def _invalidate_packed(self) -> None:
        """Drop the prepared (possibly repacked) weights: they were derived from the old buffers."""
        self.__dict__["_run"] = None
        self.__dict__["_fast"] = None
        self.__dict__["_trusted"] = False

    def _lean(self, x):
        """The prepared run(x) if it applies to this activation, else None (take the op)."""
        run = self.__dict__["_run"]
        if (run is not None and plain_activation(x, self.in_features, run.device)
                and run.env == env_backend()):
            return run
        return None

    def _first_call(self, op, fn, x, static_args, forward):
        """The first call since the buffers were set: y = fn(x, *static_args) with the op's checks, then the
        buffers are trusted and the run prepared (`_trust`). In plain eager use (x on the weights' device) it
        checks only (`op.check`), prepares, and computes as every later call will: on the CPU through the
        prepared run (layouts that run packs, W4A8's, rows16, the int8 GEMM's, are packed once, not also by the
        op for this output), on a GPU through forward's prepared path. So the first output has the later calls'
        bits: on a GPU Int4Linear's first call used to run the canonical kernels (each weight rounded to 16
        bits) and every later one the packed kernels (exact products), so the same prompt gave other logits in
        a model's first run than in its second (docs/notes/gpu-run-2026-11-29.md, the bf16 graph test).
        `forward`: the calling class's own forward (not self.forward: a subclass's, or one that hooks put on the
        instance, would run its extra work twice). Anything else (modes, tracing, autograd, other devices) takes
        the op."""
        if (type(x) is _Tensor and (x.is_cpu or x.is_cuda) and x.device == static_args[0].device and _eager_state()
                and not (x.requires_grad and _GRAD())):
            op.check(x, *static_args)
            self._trust(op, *static_args)
            if not x.is_cpu:
                return forward(self, x)  # (trusted now: its prepared run, or the op's trusted call)
            run = self._lean(x)  # (None: no prepared run for this backend or x; the op computes)
            return run(x) if run is not None else fn(x, *static_args, backend=self.backend)
        out = fn(x, *static_args, backend=self.backend)
        if not self.__dict__["_trusted"]:  # (an autograd-tracked x comes here on every call: prepare once)
            self._trust(op, *static_args)
        return out

    def _still_trusted(self) -> bool:
        """Whether the buffers are trusted, with the preparation that LLMKERN_BACKEND now calls for: a module
        trusted while no preparer applied (another backend selected, e.g. "reference"; a released Int4Linear
        restores its buffers for it) prepares again at its first call after the variable changes."""
        d = self.__dict__
        if d["_trusted"] and d["_run"] is None and d.get("_trust_env") != env_backend():
            d["_trusted"] = False
        return d["_trusted"]

    def _trust(self, op, *static_args) -> None:
        """The buffers just passed the op's checks: trust them and prepare the lean path."""
        d = self.__dict__
        d["_trusted"] = True
        d["_trust_env"] = env_backend()
        dev = static_args[0].device
        run = d["_run"] = None if dev.type == "meta" else op.prepare(*static_args, backend=self.backend, device=dev)
        self._allow_fast(run)
        if run is not None:
            self._prepared(run)

    def _prepared(self, run) -> None:
        """Called with each new prepared run (Int4Linear: may release its canonical buffers)."""

    def _allow_fast(self, run) -> None:
        """Let __call__ run `run` (the prepared run) directly where that is what forward would do: a CPU
        BoundRun, forward ours (not a subclass's or an instance's), no Module.compile(), no hooks now.
        (Called when preparing, and by forward's lean calls: a hook removed or a forward override
        deleted since then gives the shortcut back.)"""
        d = self.__dict__
        impl = getattr(run, "impl", None)
        if (isinstance(impl, BoundRun) and run.backend == "cpu" and type(self).forward in _FAST_FORWARDS
                and "forward" not in d and d.get("_compiled_call_impl") is None
                and not (d["_forward_hooks"] or d["_forward_pre_hooks"] or d["_backward_hooks"]
                         or d["_backward_pre_hooks"])):
            impl.env = run.env
            d["_fast"] = impl

    def _apply(self, fn, recurse=True):
        # `module.to(torch.bfloat16)` would convert every floating buffer, but the ops read scales and
        # offsets as float32: move those to the new device only and keep their dtype.
        kept = {n: self._buffers.pop(n) for n in self._fp32_buffers if self._buffers.get(n) is not None}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, t in kept.items():
                moved = fn(t)
                self._buffers[name] = moved if moved.dtype == t.dtype else t.to(device=moved.device)
        self._invalidate_packed()
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._invalidate_packed()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _fp16_scales(w: torch.Tensor, q: torch.Tensor, s: torch.Tensor, o: torch.Tensor):
    """(qweight, scales, offsets) of w [N, K] with scales and offsets [N, K / G] rounded to fp16 values and q chosen
    again for them, or the given (q, s, o) (ops.quantize_int4's) when `fp16_scales_fit` says fp16 cannot hold them."""
    if not fp16_scales_fit(s, o):
        return q, s, o
    s16, o16 = s.to(torch.float16).to(torch.float32), o.to(torch.float16).to(torch.float32)
    return requantize_int4(w, s16, o16), s16, o16


def fp16_scales_fit(s: torch.Tensor, o: torch.Tensor) -> bool:
    """Whether int4 scales and offsets [N, K / G] (ops.quantize_int4's: offset = the group's min) may be rounded to
    fp16 values: every nonzero scale at least fp16's smallest normal (below it fp16 loses mantissa bits) and every
    offset moved by at most 1/32 of its group's step. The scale then moves by at most 2^-11 of itself, and the
    group's min and max still map to levels 0 and 15 (within 0.04 of a step). False for tensors without values
    (meta / fake, under torch.compile): their shapes are the same either way."""
    if s.device.type == "meta" or isinstance(s, torch._subclasses.FakeTensor) or torch.compiler.is_compiling():
        return False
    s16, o16 = s.to(torch.float16).to(torch.float32), o.to(torch.float16).to(torch.float32)
    normal = (s == 0) | (s >= torch.finfo(torch.float16).tiny)  # [N, K / G]
    return (bool(torch.isfinite(s16).all()) and bool(torch.isfinite(o16).all()) and bool(normal.all())
            and bool(((o16 - o).abs() <= s / 32).all()))


def requantize_int4(w: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """qweight uint8 [N, K / 2] of w [N, K] for the given scales and offsets [N, K / G]: each value's nearest level,
    clamped to 0..15 (a group whose scale is 0: level 0)."""
    N, K = w.shape
    G = K // scales.shape[1]
    wg = w.to(torch.float32).reshape(N, K // G, G)  # [N, K] -> [N, K / G, G]
    inv = torch.where(scales > 0, 1.0 / torch.where(scales > 0, scales, 1.0), 0.0)  # [N, K / G]
    q = torch.round((wg - offsets.unsqueeze(-1)) * inv.unsqueeze(-1)).clamp_(0, 15).to(torch.uint8)
    return ops.pack_int4(q.reshape(N, K))  # [N, K / G, G] -> [N, K] -> packed [N, K / 2]


def _check_features(cls: str, in_features: int, out_features: int) -> None:
    if in_features <= 0 or out_features <= 0:
        raise ValueError(f"{cls}: in_features and out_features must be > 0, got ({in_features}, {out_features})")


class Int8Linear(_Releasable, _QuantizedBase):
    """y = x @ dequant(weight)^T + bias with int8 weights; a drop-in for `nn.Linear`.

    Buffers: `weight` int8 [N, K], `weight_scale` float32 [N] (group_size 0, per output channel) or
    [N, K // group_size], `bias` [N] in `dtype` or None. forward: x [..., K] -> [..., N] in x's dtype.
    mode: "w8a16" (weight-only) or "w8a8" (dynamic per-row int8 activations), see ops.int8_linear.
    """

    _fp32_buffers = ("weight_scale",)
    _op = int8_linear_op
    _canonical = ("weight",)  # (what a prepared CPU W8A16 run may let go of: _Releasable)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, group_size: int = 0,
                 mode: str = "w8a16", device=None, dtype=torch.float32, backend=None):
        super().__init__()
        _check_features("Int8Linear", in_features, out_features)
        if mode not in INT8_MODES:
            raise ValueError(f"Int8Linear: mode must be one of {INT8_MODES}, got {mode!r}")
        if group_size < 0 or (group_size and in_features % group_size):
            raise ValueError(f"Int8Linear: group_size must be 0 (per channel) or divide in_features="
                             f"{in_features}, got {group_size}")
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.mode, self.backend = group_size, mode, backend
        # Zeros, not empty: a module that was never loaded computes `bias` (or 0), never garbage.
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        scale_shape = (out_features,) if group_size == 0 else (out_features, in_features // group_size)
        self.register_buffer("weight_scale", torch.zeros(scale_shape, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_quantized(cls, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
                       *, mode: str = "w8a16", backend=None) -> "Int8Linear":
        """Wrap already-quantized tensors (kept as given, not copied): weight int8 [N, K],
        weight_scale float32 [N] or [N, K // G], bias [N] or None."""
        if not isinstance(weight, torch.Tensor) or weight.dtype != torch.int8 or weight.dim() != 2:
            raise TypeError(f"Int8Linear.from_quantized: weight must be an int8 [N, K] tensor, got "
                            f"{getattr(weight, 'dtype', type(weight))} {tuple(getattr(weight, 'shape', ()))}")
        N, K = weight.shape
        if not isinstance(weight_scale, torch.Tensor) or weight_scale.dtype != torch.float32:
            raise TypeError("Int8Linear.from_quantized: weight_scale must be a float32 tensor, got "
                            f"{getattr(weight_scale, 'dtype', type(weight_scale))}")
        if weight_scale.shape == (N,):
            group_size = 0
        elif weight_scale.dim() == 2 and weight_scale.shape[0] == N and weight_scale.shape[1] > 0 \
                and K % weight_scale.shape[1] == 0:
            group_size = K // weight_scale.shape[1]
        else:
            raise ValueError(f"Int8Linear.from_quantized: weight_scale must be [{N}] or [{N}, K // G] with G "
                             f"dividing K={K}, got {list(weight_scale.shape)}")
        if bias is not None and tuple(bias.shape) != (N,):
            raise ValueError(f"Int8Linear.from_quantized: bias must have shape [{N}], got {list(bias.shape)}")
        dtype = bias.dtype if bias is not None else torch.float32
        # Build on the meta device (allocates nothing), then attach the given tensors.
        m = cls(K, N, bias is not None, group_size=group_size, mode=mode, device="meta", dtype=dtype,
                backend=backend)
        m.weight, m.weight_scale = weight, weight_scale
        if bias is not None:
            m.bias = bias
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, mode: str = "w8a16", group_size: int = 0,
                    backend=None) -> "Int8Linear":
        """Quantize `linear.weight` with ops.quantize_int8 (symmetric, per channel or per group)."""
        w = linear.weight.detach()
        q, s = ops.quantize_int8(w, group_size, backend=backend)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls.from_quantized(q, s, bias, mode=mode, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [..., K] -> [..., N]
        if not torch.compiler.is_compiling():
            run = self._lean(x)
            takes = self._released_takes(x)
            if run is not None and takes:
                if self.__dict__["_fast"] is None:
                    self._allow_fast(run)
                return run(x)
            if self.__dict__.get("_released") is not None:  # the packed run cannot take x (autograd-tracked x,
                # which the op takes from now on, so the weight is kept; another device or backend): weight again
                self._restore_canonical(keep=not takes or (x.requires_grad and torch.is_grad_enabled()))
            if self._still_trusted() and self.mode in MODES and plain_activation(x, self.in_features,
                                                                                 self.weight.device):
                return int8_linear_op.run_trusted(x, self.weight, self.weight_scale, self.bias, self.mode,
                                                  self.backend)
            return self._first_call(int8_linear_op, ops.int8_linear, x,
                                    (self.weight, self.weight_scale, self.bias, self.mode), Int8Linear.forward)
        return ops.int8_linear(x, self.weight, self.weight_scale, self.bias, self.mode, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}, mode={self.mode!r}, backend={self.backend!r}")


class Int4Linear(_Releasable, _QuantizedBase):
    """y = x @ dequant(qweight)^T + bias with 4-bit weights (canonical layout of ops.int4_linear).

    Buffers: `qweight` uint8 [N, K // 2] (low nibble = even k), `scales` and `offsets` float32
    [N, K // group_size] (dequant = q * scale + offset), `bias` [N] in `dtype` or None.
    forward: x [..., K] -> [..., N] in x's dtype.
    mode: "w4a16" (float activations), "w4a8" / "w4a8g" (activations quantized to int8 on the fly, one
    scale per row / per group, integer dot products on the CPU; see ops.int4_linear). An attribute, like
    Int8Linear's: not in the state dict.
    """

    _fp32_buffers = ("scales", "offsets")
    _op = int4_linear_op
    _canonical = ("qweight", "scales", "offsets")  # (what a prepared run may let go of: _Releasable)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, group_size: int = 32,
                 mode: str = "w4a16", device=None, dtype=torch.float32, backend=None):
        super().__init__()
        _check_features("Int4Linear", in_features, out_features)
        if mode not in INT4_MODES:
            raise ValueError(f"Int4Linear: mode must be one of {INT4_MODES}, got {mode!r}")
        if group_size not in INT4_GROUP_SIZES or in_features % group_size:
            raise ValueError(f"Int4Linear: group_size must be one of {INT4_GROUP_SIZES} and divide in_features="
                             f"{in_features}, got {group_size}")
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.backend, self.mode = group_size, backend, mode
        G = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.zeros(out_features, G, dtype=torch.float32, device=device))
        self.register_buffer("offsets", torch.zeros(out_features, G, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_quantized(cls, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                       bias: torch.Tensor | None = None, *, mode: str = "w4a16", backend=None) -> "Int4Linear":
        """Wrap already-quantized tensors in the canonical layout (kept as given, not copied)."""
        if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.uint8 or qweight.dim() != 2:
            raise TypeError(f"Int4Linear.from_quantized: qweight must be a uint8 [N, K // 2] tensor, got "
                            f"{getattr(qweight, 'dtype', type(qweight))} {tuple(getattr(qweight, 'shape', ()))}")
        N, K = qweight.shape[0], qweight.shape[1] * 2
        for name, t in (("scales", scales), ("offsets", offsets)):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.dim() != 2 or t.shape[0] != N:
                raise TypeError(f"Int4Linear.from_quantized: {name} must be a float32 [{N}, K // G] tensor, got "
                                f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
        if offsets.shape != scales.shape or scales.shape[1] == 0 or K % scales.shape[1]:
            raise ValueError(f"Int4Linear.from_quantized: scales/offsets must both be [{N}, K // G] with G dividing "
                             f"K={K}, got {list(scales.shape)} and {list(offsets.shape)}")
        if bias is not None and tuple(bias.shape) != (N,):
            raise ValueError(f"Int4Linear.from_quantized: bias must have shape [{N}], got {list(bias.shape)}")
        dtype = bias.dtype if bias is not None else torch.float32
        m = cls(K, N, bias is not None, group_size=K // scales.shape[1], mode=mode, device="meta", dtype=dtype,
                backend=backend)
        m.qweight, m.scales, m.offsets = qweight, scales, offsets
        if bias is not None:
            m.bias = bias
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, group_size: int = 32, mode: str = "w4a16", fp16_scales: bool = True,
                    backend=None) -> "Int4Linear":
        """Quantize `linear.weight` with ops.quantize_int4 (round to nearest, offset = group min).

        fp16_scales (default): scales and offsets rounded to fp16 values, as GGUF, GPTQ and AWQ store them, and q
        chosen again for the rounded values (`_fp16_scales`). The buffers stay float32; the kernels then stream
        2-byte scales (the CPU's packed layouts, the CUDA packed module): K/2 + 4 K/G bytes per output row instead
        of K/2 + 8 K/G, 17% fewer at G = 32, which is what a decode call's time follows (4096x4096 at M = 1, Intel
        host, alternated with the fp32-scaled module: W4A16 1.13x, W4A8g 1.18-1.19x faster, fp32 or bf16 x;
        docs/notes/cpu-intel-host/fp16_scales_ab.py). The rounding moves a scale by at most 2^-11 of it
        and an offset by at most 1/32 of its group's step, against int4's own rounding of up to half a step; a
        weight whose values do not allow that (a scale outside fp16's normal range, an offset large against its
        group's spread) keeps ops.quantize_int4's fp32 values. False: those values always."""
        w = linear.weight.detach()
        q, s, o = ops.quantize_int4(w, group_size, backend=backend)
        if fp16_scales:
            q, s, o = _fp16_scales(w, q, s, o)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls.from_quantized(q, s, o, bias, mode=mode, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [..., K] -> [..., N]
        if not torch.compiler.is_compiling():
            run = self._lean(x)
            d = self.__dict__
            released = d.get("_released") is not None
            takes = self._released_takes(x)
            if run is not None and takes:
                if d["_fast"] is None:
                    self._allow_fast(run)
                return run(x)
            if released:  # the packed run cannot take x (GPU: fp32 x; autograd-tracked x, which the op takes from
                # now on, so the canonical buffers are kept; another device or backend): canonical again
                self._restore_canonical(keep=not takes or (x.requires_grad and torch.is_grad_enabled()))
            if self._still_trusted() and self.mode in INT4_MODES and plain_activation(x, self.in_features,
                                                                                      self.qweight.device):
                return int4_linear_op.run_trusted(x, self.qweight, self.scales, self.offsets, self.bias, self.mode,
                                                  self.backend)
            return self._first_call(int4_linear_op, ops.int4_linear, x,
                                    (self.qweight, self.scales, self.offsets, self.bias, self.mode),
                                    Int4Linear.forward)
        return ops.int4_linear(x, self.qweight, self.scales, self.offsets, self.bias, self.mode, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}, mode={self.mode!r}, backend={self.backend!r}")


# Each linear type's tensors (concat_linears).
_TENSORS = {nn.Linear: ("weight", "bias"), Int8Linear: ("weight", "weight_scale", "bias"),
            Int4Linear: ("qweight", "scales", "offsets", "bias")}

# The forwards __call__'s shortcut stands for (see _QuantizedBase._trust).
_FAST_FORWARDS = (Int8Linear.forward, Int4Linear.forward)


def quantize_linears(module: nn.Module, quant: str = "int8", *, group_size: int | None = None,
                     mode: str | None = None, skip: Iterable[str] = (), backend=None) -> nn.Module:
    """Replace every `nn.Linear` in `module`'s tree by Int8Linear / Int4Linear, in place.

    quant: "int8" (group_size default 0 = per channel; `mode` "w8a16" (default) or "w8a8") or "int4"
    (group_size default 32; `mode` "w4a16" (default), "w4a8" or "w4a8g"; `Int4Linear.from_linear`: fp16-valued
    scales). skip: names not to quantize, either full dotted names ("model.lm_head") or the last component
    ("lm_head"). Returns `module`, or the new module when `module` itself is an nn.Linear.
    """
    if quant not in ("int8", "int4"):
        raise ValueError(f"quantize_linears: quant must be 'int8' or 'int4', got {quant!r}")
    if isinstance(skip, str):
        skip = (skip,)
    skip = set(skip)
    if group_size is None:
        group_size = 0 if quant == "int8" else 32
    modes = INT8_MODES if quant == "int8" else INT4_MODES
    mode = modes[0] if mode is None else mode
    if mode not in modes:
        raise ValueError(f"quantize_linears: mode for {quant} must be one of {modes}, got {mode!r}")

    def convert(name: str, lin: nn.Linear) -> nn.Module:
        try:
            if quant == "int8":
                return Int8Linear.from_linear(lin, mode=mode, group_size=group_size, backend=backend)
            return Int4Linear.from_linear(lin, group_size=group_size, mode=mode, backend=backend)
        except ValueError as e:
            raise ValueError(f"quantize_linears: cannot quantize {name or '<root>'} "
                             f"({lin.in_features} -> {lin.out_features}) to {quant}: {e}") from e

    if isinstance(module, nn.Linear):
        return module if ("" in skip) else convert("", module)
    # Collect first, then replace: never mutate a module tree while iterating over it.
    targets = [(name, m) for name, m in module.named_modules()
               if isinstance(m, nn.Linear) and name not in skip and name.rsplit(".", 1)[-1] not in skip]
    for name, lin in targets:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, convert(name, lin))
    return module


def set_linear_modes(module: nn.Module, *, int4: str | None = None, int8: str | None = None) -> int:
    """Set the mode of every Int4Linear (`int4`: "w4a16" / "w4a8" / "w4a8g") and Int8Linear (`int8`:
    "w8a16" / "w8a8") in `module`'s tree; None leaves that kind as it is. Returns how many changed.

    E.g. `set_linear_modes(model, int4="w4a8g", int8="w8a8")` makes a GGUF model quantize its activations
    to int8 in every quantized linear (integer dot products: faster on the CPU, with the extra
    activation rounding measured in docs/notes/cpu-w4a8.md). Each changed module re-prepares its
    weights on its next call.
    """
    if int4 is not None and int4 not in INT4_MODES:
        raise ValueError(f"set_linear_modes: int4 must be one of {INT4_MODES}, got {int4!r}")
    if int8 is not None and int8 not in INT8_MODES:
        raise ValueError(f"set_linear_modes: int8 must be one of {INT8_MODES}, got {int8!r}")
    changed = 0
    for m in module.modules():
        want = int4 if isinstance(m, Int4Linear) else int8 if isinstance(m, Int8Linear) else None
        if want is not None and m.mode != want:
            m.mode = want  # __setattr__ drops the prepared call
            changed += 1
    return changed


def keep_canonical(module: nn.Module, keep: bool = True) -> int:
    """`keep_canonical(keep)` on every Int8Linear / Int4Linear in `module`'s tree: keep=True makes each hold its
    canonical buffers from now on (rebuilt now where a prepared CPU or GPU run had let go of them), which
    `torch.compile` then reads instead of unpacking a packed layout on every call; keep=False gives the release
    back. Returns how many modules there are."""
    n = 0
    for m in module.modules():
        if isinstance(m, (Int8Linear, Int4Linear)):
            m.keep_canonical(keep)
            n += 1
    return n


def concat_linears(mods) -> nn.Module | None:
    """One linear computing `torch.cat([m(x) for m in mods], -1)`, or None when they cannot be joined.

    Joins along the output dimension N (rows of every weight format): nn.Linear, Int8Linear (same
    mode, group size and backend) or Int4Linear (same group size and backend), all of one type, with
    one in_features, device and dtype, and either all or none with a bias. Used to fuse q/k/v and
    gate/up projections, which read the same input: one kernel launch instead of two or three, and
    the weights of each output row are the row's own, so every output element is the one the
    separate module computes. The result owns new (concatenated) tensors.
    """
    mods = list(mods)
    first = mods[0]
    kind = type(first)
    if kind not in (nn.Linear, Int8Linear, Int4Linear) or any(type(m) is not kind for m in mods):
        return None
    if len({m.in_features for m in mods}) != 1 or len({m.bias is None for m in mods}) != 1:
        return None
    if kind is not nn.Linear and len({(m.group_size, m.backend, getattr(m, "mode", None)) for m in mods}) != 1:
        return None  # (checked before the tensors are read: reading a released module's restores them)
    # (by name, not m.buffers(): a released module lists the tensors it kept alone)
    tensors = [t for m in mods for t in (getattr(m, n) for n in _TENSORS[kind]) if t is not None]
    if len({t.device for t in tensors}) != 1 or any(t.is_meta for t in tensors):
        return None
    if first.bias is not None and len({m.bias.dtype for m in mods}) != 1:
        return None
    bias = None if first.bias is None else torch.cat([m.bias.detach() for m in mods])
    if kind is nn.Linear:
        w = [m.weight for m in mods]
        if len({(t.dtype, t.device) for t in w}) != 1:
            return None
        out = nn.Linear(first.in_features, sum(m.out_features for m in mods), bias=bias is not None,
                        device="meta", dtype=w[0].dtype)
        out.weight = nn.Parameter(torch.cat([t.detach() for t in w]), requires_grad=w[0].requires_grad)
        if bias is not None:
            out.bias = nn.Parameter(bias, requires_grad=first.bias.requires_grad)
        return out
    if kind is Int8Linear:
        return Int8Linear.from_quantized(torch.cat([m.weight for m in mods]),
                                         torch.cat([m.weight_scale for m in mods]), bias,
                                         mode=first.mode, backend=first.backend)
    return Int4Linear.from_quantized(torch.cat([m.qweight for m in mods]), torch.cat([m.scales for m in mods]),
                                     torch.cat([m.offsets for m in mods]), bias, mode=first.mode,
                                     backend=first.backend)
