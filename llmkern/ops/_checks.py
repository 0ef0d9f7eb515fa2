"""Input checks shared by every op: each failure names the argument, what was expected and what was given.

Shape/dtype/device checks run in the op before any backend (and in its fake kernel, so they also fire
under torch.compile). Checks that need tensor *values* (block table entries, slot numbers, cu_seqlens)
run only where reading values is cheap and possible: real CPU tensors, or CUDA tensors outside graph
capture when `value_checks(True)` (the default).
"""
from __future__ import annotations

import contextlib
import threading

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FLOAT_SET = frozenset(FLOAT_DTYPES)  # for the ops' fast_checks: one hash lookup per dtype
INDEX_DTYPES = (torch.int32, torch.int64)
# Largest attention window (window_left / window_right) the ops take: kernels add it to positions, and
# 2^63 - 1 overflowed there (every key masked). -1 means unbounded; any window past the keys is the same.
MAX_WINDOW = 2 ** 31 - 1

_VALUE_CHECKS = [True]
_VOUCHED = threading.local()  # .on: the caller built the index tensors of its GPU op calls (values_vouched)


def set_value_checks(enabled: bool) -> None:
    """Turn off the checks that read tensor values on CUDA (they synchronize the stream)."""
    _VALUE_CHECKS[0] = bool(enabled)


@contextlib.contextmanager
def values_vouched():
    """Within: ops called by this thread skip the checks that read CUDA tensors' values (positions, slots,
    lengths, block tables), each a device-to-host copy that waits for the stream. For llmkern's own callers
    that built those tensors themselves with values known on the host to be in range (a prefill's positions
    0..S-1 after checking S against the table, a cache's own lengths). Every other check still runs, and CPU
    tensors are still checked (cheaply)."""
    prev = getattr(_VOUCHED, "on", False)
    _VOUCHED.on = True
    try:
        yield
    finally:
        _VOUCHED.on = prev


def can_read_values(t: torch.Tensor) -> bool:
    """True when checking `t`'s values is possible here (not a fake/meta tensor, not capturing) and wanted."""
    if t.device.type == "meta" or isinstance(t, torch._subclasses.FakeTensor):
        return False
    if torch.compiler.is_compiling():
        return False
    if t.device.type == "cuda":
        return (_VALUE_CHECKS[0] and not getattr(_VOUCHED, "on", False)
                and not torch.cuda.is_current_stream_capturing())
    return True


def _fmt_dtypes(dtypes) -> str:
    return " or ".join(str(d).replace("torch.", "") for d in dtypes)


def tensor(op: str, name: str, t, *, ranks=None, dtypes=None) -> None:
    """`t` must be a tensor with a rank in `ranks` and a dtype in `dtypes`."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"llmkern.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ranks is not None and t.dim() not in ranks:
        want = " or ".join(str(r) for r in ranks)
        raise ValueError(f"llmkern.{op}: {name} must have rank {want}, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"llmkern.{op}: {name} must have dtype {_fmt_dtypes(dtypes)}, got {t.dtype}")


def shape(op: str, name: str, t: torch.Tensor, expected: tuple, what: str = "") -> None:
    """`t.shape` must equal `expected` (None entries match anything)."""
    got = tuple(t.shape)
    if len(got) != len(expected) or any(e is not None and e != g for e, g in zip(expected, got)):
        exp = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        extra = f" ({what})" if what else ""
        raise ValueError(f"llmkern.{op}: {name} must have shape {exp}{extra}, got {list(got)}")


_INF = float("inf")


def attn_scalars_ok(scale, softcap, window_left) -> bool:
    """The attention ops' scalars are valid (what `attn_scalars` checks), for fast paths that skip the checks:
    scale None or finite > 0, softcap finite >= 0, window_left an int in -1..MAX_WINDOW."""
    return ((scale is None or 0 < scale < _INF) and 0 <= softcap < _INF and type(window_left) is int
            and -1 <= window_left <= MAX_WINDOW)


def attn_scalars(op: str, scale, softcap, window_left, window_right=None) -> None:
    """Raise (naming the argument) unless the attention scalars are valid; window_right: attention's only."""
    int_arg(op, "window_left", window_left)
    if window_right is not None:
        int_arg(op, "window_right", window_right)
    if scale is not None and not 0 < scale < _INF:
        raise ValueError(f"llmkern.{op}: scale must be finite and > 0, or None, got {scale}")
    if not 0 <= softcap < _INF:
        raise ValueError(f"llmkern.{op}: softcap must be finite and >= 0 (0 = off), got {softcap}")
    windows = (window_left,) if window_right is None else (window_left, window_right)
    if not all(-1 <= w <= MAX_WINDOW for w in windows):
        name, got = ("window_left", window_left) if window_right is None else ("window_left/right", windows)
        raise ValueError(f"llmkern.{op}: {name} must be -1 (unbounded) or in [0, {MAX_WINDOW}], got {got}")


def int_arg(op: str, name: str, value) -> None:
    """`value` must be an integer (not a float that a kernel would truncate; bools pass, as in torch's schemas)."""
    if not hasattr(value, "__index__"):
        raise TypeError(f"llmkern.{op}: {name} must be an int, got {value!r} ({type(value).__name__})")


def bool_arg(op: str, name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"llmkern.{op}: {name} must be a bool, got {value!r} ({type(value).__name__})")


def writable(op: str, name: str, t: torch.Tensor) -> None:
    """`t` (written in place) must not overlap itself: no broadcast (stride 0) dim of size > 1, where every
    element would be written once per index (an expand()ed view)."""
    if any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)):
        raise ValueError(f"llmkern.{op}: {name} is written in place and must not overlap itself, got an expanded "
                         f"view (shape {list(t.shape)}, strides {list(t.stride())})")


def same_device(op: str, **tensors) -> None:
    """All given (non-None) tensors must live on one device."""
    items = [(n, t) for n, t in tensors.items() if t is not None]
    if not items:
        return
    n0, t0 = items[0]
    for n, t in items[1:]:
        if t.device != t0.device:
            raise ValueError(
                f"llmkern.{op}: {n} is on {t.device} but {n0} is on {t0.device}; all inputs must be on one device"
            )


def same_dtype(op: str, **tensors) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    n0, t0 = items[0]
    for n, t in items[1:]:
        if t.dtype != t0.dtype:
            raise TypeError(f"llmkern.{op}: {n} must have the dtype of {n0} ({t0.dtype}), got {t.dtype}")


def head_dim(op: str, name: str, d: int) -> None:
    """Head dims of DESIGN.md: 32..256, multiple of 8."""
    if not (32 <= d <= 256 and d % 8 == 0):
        raise ValueError(f"llmkern.{op}: head dim of {name} must be a multiple of 8 in 32..256, got {d}")


def value(op: str, cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(f"llmkern.{op}: {message}")
