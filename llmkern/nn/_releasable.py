"""The release of a quantized linear's canonical buffers while its prepared run holds the weights in a packed
layout (`_Releasable`, mixed into Int8Linear and Int4Linear, llmkern/nn/linear.py)."""
from __future__ import annotations

import weakref

import torch


class _Releasable:
    """Mixin of a quantized linear (before linear.py's _QuantizedBase in the bases) whose prepared run may hold the
    weights in its own layout alone (Int4Linear: rows16 on an AVX-512 BF16 CPU, the W4A8 layout in W4A8 modes, the
    GPU packed copy; Int8Linear: the CPU packed decode layout, in W8A8 with the GEMM layout): the canonical buffers
    named in `_canonical` are then dropped and rebuilt on demand (see below)."""

    _canonical: tuple[str, ...] = ()  # the canonical buffers a prepared run may let go of

    def __init__(self):
        super().__init__()
        self.__dict__.update(_released=None, _keep_canonical=False)  # (see _prepared)

    def _released_takes(self, x) -> bool:
        """Whether the prepared run may take x: nothing was released, or x's dtype is one the released run takes
        (an empty x: any)."""
        rel = self.__dict__.get("_released")
        return rel is None or x.dtype in rel[2] or not x.numel()

    # --- Holding the packed form alone ------------------------------------------------------------------------
    # A prepared run with `release()` can do without the canonical tensors for the x dtypes `release.dtypes`.
    # Int4Linear: on a GPU the cuda preparer's packed run (ops/int4_linear.py CUDA_INT4_RELEASE) for 16-bit x, on
    # an AVX-512 BF16 CPU the rows16 run (CPU_INT4_RELEASE) for every float x, in W4A8 modes the W4A8 run on any
    # CPU (the same switch) for every float x; qweight / scales / offsets go (at G = 32 with fp16-valued scales:
    # 0.625 instead of 1.375 bytes per weight held). Int8Linear: the CPU W8A16 run with the packed decode layout,
    # and the W8A8 run with it and the GEMM layout (ops/int8_linear.py CPU_INT8_RELEASE), for every float x;
    # `weight` goes, the scales stay (W8A16 at G = 32, fp16-valued scales: 1.19 instead of 2.19 bytes per weight).
    # The module removes them from its buffers, so that the packed copy is all it holds of them, and `_released` =
    # (unpack, buffer order, dtypes). They come back, unpacked bit for bit from the packed copy, whenever anything
    # needs them: reading or assigning the attribute, .to() / .cuda() / dtype casts, load_state_dict (then it is
    # packed and released again at the next call), and an activation the run does not take (another dtype, device
    # or backend, or autograd-tracked), after which another dtype's or autograd's call keeps them
    # (`_keep_canonical`: GPU fp32 x runs the canonical kernels; `keep_canonical()` sets it too). state_dict and
    # pickling / deepcopy unpack into the result only (`_unpacked`). While
    # released, named_buffers() lists the others alone. Under torch.compile tracing, reads get the unpacked
    # tensors without restoring them (the graph unpacks on every call).

    def keep_canonical(self, keep: bool = True):
        """keep=True: hold the canonical buffers from now on (rebuilt now if they were released; never released
        again), e.g. before `torch.compile`, whose graph would otherwise unpack them on every call. keep=False: the
        next call prepares again and lets go of them where its run can do without them (the default). Returns
        self. (`llmkern.nn.keep_canonical(model)` does it for every quantized linear of a model.)"""
        if keep:
            self._restore_canonical(keep=True)
            self.__dict__["_keep_canonical"] = True
        elif self.__dict__.get("_keep_canonical"):
            self.__dict__["_keep_canonical"] = False
            self._invalidate_packed()  # (the prepared run was made without releasing: prepare again)
        return self

    def _prepared(self, run) -> None:
        d = self.__dict__
        release = getattr(getattr(run, "impl", None), "release", None)
        if release is None or d.get("_keep_canonical") or d.get("_released") is not None:
            return
        order = list(self._buffers)
        dtypes = release.dtypes
        unpack = release()
        gone = {name: self._buffers.pop(name) for name in self._canonical}
        d["_released"] = (unpack, order, dtypes)
        for f in d.get("_followers", ()):  # (an embedding tied to this lm_head drops the same tensor)
            f._head_released(self, gone)

    def _restore_canonical(self, keep: bool = False) -> None:
        """Put the canonical buffers back (unpacked from the packed copy) and drop the prepared run; `keep`:
        never release them again (fp32 calls)."""
        d = self.__dict__
        rel = d.get("_released")
        if rel is None:
            return
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            # (unpacking would only be recorded in the graph, not run: the buffers would hold garbage)
            raise RuntimeError(f"{type(self).__name__}: its canonical buffers cannot be rebuilt while a CUDA graph "
                               "is being captured (read them, or call with fp32 x, before capturing)")
        buffers = self._canonical_buffers(rel[0](), rel[1])  # (unpacked afresh: never a state dict's tensors)
        self._buffers.clear()  # (refilled in the original order: state_dict keys keep theirs)
        self._buffers.update(buffers)
        d["_released"] = None
        d["_keep_canonical"] = d.get("_keep_canonical") or keep
        self._invalidate_packed()
        for f in d.get("_followers", ()):  # (the tied embedding holds the restored tensor again)
            f._head_restored(self)

    def _canonical_buffers(self, unpacked, order) -> dict:
        """The buffers dict as it was before the release (in its order), with the canonical tensors `unpacked`."""
        tensors = dict(zip(self._canonical, unpacked))
        rest = dict(self._buffers)
        out = {n: tensors[n] if n in tensors else rest.pop(n) for n in order if n in tensors or n in rest}
        out.update(rest)  # (buffers registered since)
        return out

    def __getattr__(self, name):
        rel = self.__dict__.get("_released")
        if rel is not None and name in self._canonical:
            if torch.compiler.is_compiling():
                # (tracing can change no module state: the traced graph unpacks them itself, on every call; the
                # unpackers are torch ops for this, ops/_unpack.py)
                return dict(zip(self._canonical, rel[0]()))[name]
            self._restore_canonical()
        return super().__getattr__(name)

    def __setattr__(self, name, value):
        if name in self._canonical and self.__dict__.get("_released") is not None:
            self._restore_canonical()  # (so that the value lands in _buffers, in its place)
        super().__setattr__(name, value)

    def __delattr__(self, name):
        if name in self._canonical and self.__dict__.get("_released") is not None:
            self._restore_canonical()
        super().__delattr__(name)

    def _apply(self, fn, recurse=True):
        self._restore_canonical()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._restore_canonical()  # (keys the state dict lacks keep their values)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _unpacked(self) -> tuple:
        """The canonical tensors unpacked from the released layout, for a state dict or a copy: the same tensor
        objects again while the last ones are still alive. So a state_dict / deepcopy / pickle of a model whose
        tied lm_head released the table for its embedding too (nn/embedding.py) holds one table, shared by both,
        as the originals did (deepcopy's and pickle's memos keep the first alive while they run)."""
        d = self.__dict__
        unpack = d["_released"][0]
        cache = d.get("_unpack_cache")
        if cache is not None and cache[0] is unpack:
            got = tuple(r() for r in cache[1])
            if all(t is not None for t in got):
                return got
        got = tuple(unpack())
        d["_unpack_cache"] = (unpack, [weakref.ref(t) for t in got])
        return got

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.__dict__.get("_released") is not None:
            for name, t in zip(self._canonical, self._unpacked()):
                destination[prefix + name] = t
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_unpack_cache", None)
        # (_followers stay: a copy of a model ties its embedding copy to its head copy, through the copy's memo)
        rel = state.get("_released")
        if rel is not None:  # the copy holds the canonical buffers (and packs its own at its first call)
            state.update(_buffers=self._canonical_buffers(self._unpacked(), rel[1]), _released=None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_released", None)
        self.__dict__.setdefault("_keep_canonical", False)
