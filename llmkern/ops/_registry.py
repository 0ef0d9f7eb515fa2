"""The op registry: one torch custom op per llmkern op, and the one place a backend is chosen.

Every op is defined once with `defop(name, schema, check=..., fake=...)`. That registers
`torch.ops.llmkern.<name>` (schema, a CPU and a CUDA kernel that both run `Op.dispatch`, and a fake
kernel for torch.compile / meta tensors). Backends attach their implementation with
`@op.backend("cpu")`.

Backend choice (DESIGN.md): the op's `backend` argument, else the `LLMKERN_BACKEND` environment
variable, else the fastest backend available for the inputs' device. A backend that cannot take an
input raises `BackendUnsupported`; the dispatcher then tries the next backend in the device's order
and records the fallback (debug log + `Op.fallbacks`). Under `llmkern.ops.strict()` a fallback away
from an explicitly requested backend raises instead, which is how tests prove a backend really ran.

We use `torch.library.Library.define` + `impl` rather than the `@custom_op` decorator: it costs
about 2 us per call instead of about 10 us (DESIGN.md), which adds up over a decode step.

The public functions (`llmkern.ops.<op>`) call `Op.__call__`. In plain eager use (`_eager_state` and
`_plain_tensors`: no compile, tracing, modes, profiler, autograd inputs or tensor subclasses) it runs
`Op.dispatch`, the registered op's own kernel, directly (or, when the op's `fast_check` vouches for
the arguments, its backend choice without re-checking them): the same checks, backend choice and
fallbacks, without the 2-3 us the torch dispatcher spends converting arguments. Everything else goes
through `torch.ops.llmkern.<op>`, so compiled graphs, modes and profiles still see the registered op.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import logging
import threading
from typing import Callable

import torch

from .. import _backends

log = logging.getLogger("llmkern")

LIB = torch.library.Library("llmkern", "DEF")

# Fastest first. "reference" is last everywhere: it accepts every valid input.
DEVICE_ORDER: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}
ALL_BACKENDS = ("cpu", "cuda", "triton", "reference")

OPS: dict[str, "Op"] = {}
# Tensor types the trusted fast path takes as they are (anything else, e.g. fake tensors, takes the op).
_PLAIN = (torch.Tensor, torch.nn.Parameter)


_VERSIONS = itertools.count(1)


class _ImplTable(dict):
    """backend name -> implementation; a new `version` (unique across tables) after every change, so
    that `Op._plan` caches plans without re-reading the table on every call (tests swap
    implementations in and out)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._changed()

    def _changed(self):
        self.version = next(_VERSIONS)

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self._changed()

    def __delitem__(self, key):
        super().__delitem__(key)
        self._changed()

    def clear(self):
        super().clear()
        self._changed()

    def update(self, *args, **kwargs):
        super().update(*args, **kwargs)
        self._changed()

    def pop(self, *args):
        out = super().pop(*args)
        self._changed()
        return out

    def popitem(self):
        out = super().popitem()
        self._changed()
        return out

    def setdefault(self, key, default=None):
        out = super().setdefault(key, default)
        self._changed()
        return out


class BackendUnsupported(Exception):
    """A backend cannot take this input (dtype, head dim, layout...); the op falls back."""


class _State(threading.local):
    strict = False


_STATE = _State()


@contextlib.contextmanager
def strict(enabled: bool = True):
    """Within this block a fallback away from an explicitly requested backend raises RuntimeError."""
    old = _STATE.strict
    _STATE.strict = enabled
    try:
        yield
    finally:
        _STATE.strict = old


def _backend_available(name: str) -> bool:
    from .. import _backends  # local: avoids an import cycle at package import

    return _backends.available(name)


class Op:
    """One registered op: its schema, input checks, fake kernel and backend implementations."""

    def __init__(self, name: str, schema: str, check: Callable | None, fake: Callable,
                 fast_check: Callable | None = None):
        self.name = name
        self.schema = schema
        self.check = check
        self.fast_check = fast_check
        self.impls = _ImplTable()
        self.preparers: dict[str, Callable] = {}
        self.fallbacks: collections.Counter = collections.Counter()
        self.last_backend: str | None = None
        self.overload = None
        self._schema_args = None
        self._n_args = schema.split("->")[0].count(",") + 1  # arguments in the schema (none has a comma inside)
        self._plans: dict = {}
        LIB.define(name + schema)
        for key in ("CPU", "CUDA"):
            LIB.impl(name, self.dispatch, key)

        def fake_kernel(*args, **kwargs):
            # Fake mode may drop trailing defaulted arguments or pass keywords: normalize first.
            args = self._complete(args, kwargs)
            if self.check is not None:
                self.check(*args[:-1])
            return fake(*args[:-1])

        torch.library.register_fake("llmkern::" + name, fake_kernel, lib=LIB)
        if "!" not in schema:  # (torch takes autograd formulas for functional ops only; kv_cache_append mutates)
            torch.library.register_autograd("llmkern::" + name, functools.partial(_no_backward, name), lib=LIB)
        OPS[name] = self

    def _complete(self, args, kwargs) -> list:
        """Positional argument list in schema order, defaults filled in.

        The dispatcher drops trailing arguments left at their defaults (and fake mode may pass
        keywords), so every kernel normalizes its arguments first.
        """
        if self._schema_args is None:
            self._schema_args = getattr(torch.ops.llmkern, self.name).default._schema.arguments
        out = list(args)
        for a in self._schema_args[len(out):]:
            out.append(kwargs[a.name] if a.name in kwargs else a.default_value)
        return out

    @property
    def impls(self) -> _ImplTable:
        """backend name -> implementation (assigning a plain dict keeps it a change-counted table)."""
        return self._impls

    @impls.setter
    def impls(self, table) -> None:
        self._impls = table if isinstance(table, _ImplTable) else _ImplTable(table)

    def backend(self, backend_name: str):
        """Decorator attaching the implementation of one backend (called without `backend`)."""
        if backend_name not in ALL_BACKENDS:
            raise ValueError(f"unknown backend {backend_name!r}")

        def deco(fn):
            self.impls[backend_name] = fn
            return fn

        return deco

    def preparer(self, backend_name: str):
        """Decorator attaching a backend's `prepare(*static_args) -> run(x)` (see `Op.prepare`)."""
        if backend_name not in ALL_BACKENDS:
            raise ValueError(f"unknown backend {backend_name!r}")

        def deco(fn):
            self.preparers[backend_name] = fn
            return fn

        return deco

    def prepare(self, *static_args, backend: str | None = None, device="cpu"):
        """Bind every argument but the first (the activation) once: a module's lean eager call.

        `static_args` are the op's arguments after x, without `backend`, already checked by the op
        (a module prepares after its first call went through the registered op). Returns `run(x)`,
        which computes op(x, *static_args) for activations that `plain_activation` accepted, or None
        when the backend the dispatcher would pick here has no preparer (the module then keeps calling
        `run_trusted`). Backend choice is the dispatcher's (`backend`, else LLMKERN_BACKEND, else the
        device order); a backend's preparer may repack weights into the layout its kernel reads
        fastest (DESIGN.md: "repack once"), or raise BackendUnsupported (then None is returned and the
        registered op, with its fallbacks, stays in charge). The result remembers LLMKERN_BACKEND
        (`run.env`) and the device (`device`: a torch.device or its type; a module passes its weights' device,
        so that `run.device` is the one its activations must be on): callers re-prepare when the variable changes.
        """
        env = _backends.env_backend()
        requested = backend if backend is not None else env
        device = torch.device(device)
        for name, impl, _ in self._plan(device.type, requested):
            if impl is None:
                continue
            prep = self.preparers.get(name)
            if prep is None:
                return None
            try:
                idx = _other_gpu(device) if device.type == "cuda" else None
                if idx is None:
                    fn = prep(*static_args)
                else:  # (preparers may launch kernels: packing)
                    with torch.cuda.device(idx):
                        fn = prep(*static_args)
            except BackendUnsupported as e:
                # The registered op handles this case (falling back, or raising under strict mode).
                log.debug("llmkern.%s: %s cannot prepare these weights (%s)", self.name, name, e)
                return None
            op = self

            def run(x, _fn=fn, _name=name):
                idx = _other_gpu(x.device) if x.is_cuda and _several_gpus() else None
                if idx is None:
                    out = _fn(x)
                else:
                    with torch.cuda.device(idx):
                        out = _fn(x)
                op.last_backend = _name
                return out

            run.env, run.backend, run.device, run.impl = env, name, device, fn
            return run
        return None

    def backends_here(self) -> list[str]:
        """Backends that implement this op and are usable on this machine."""
        return [b for b in ALL_BACKENDS if b in self.impls and _backend_available(b)]

    def __call__(self, *args, **kwargs):
        """The op on all its arguments in schema order (what every public function calls).

        In plain eager use (`_eager_state`, and `_plain_tensors` or the op's `fast_check`, which
        also passes every check) this is `dispatch` itself, the registered op's CPU/CUDA kernel,
        without the ~2-3 us of the torch dispatcher converting the arguments to IValues and back:
        nothing could tell the difference. Anything else (torch.compile, tracing, fake or subclass
        tensors, modes, autograd inputs, the profiler) calls `torch.ops.llmkern.<name>`, so graphs
        and profiles see the registered op.
        """
        pending = None
        if not kwargs and _eager_state():  # (keyword arguments: the dispatcher fills in the defaults)
            try:
                fast = self.fast_check
                if fast is not None:
                    op_args = args[:-1]
                    if fast(*op_args):  # plain tensors that pass every check: choose the backend, run
                        return self._run(op_args, args[-1])
                if _plain_tensors(args):
                    return self.dispatch(*args)
            except TypeError as e:
                # E.g. a scalar argument of the wrong type (a str for a float): the dispatcher's schema
                # check below names the argument (an op's own TypeError is raised again there).
                pending = e
        if self.overload is None:
            self.overload = getattr(torch.ops.llmkern, self.name).default
        try:
            return self.overload(*args, **kwargs)
        except RuntimeError as e:
            if pending is not None and str(pending).startswith("llmkern.") and "Expected a value of type" in str(e):
                raise pending from None  # (the op's own check said the same in llmkern's words)
            raise

    def dispatch(self, *args, **kwargs):
        """The CPU/CUDA kernel of the torch op: check the inputs, pick a backend, run it."""
        if len(args) < self._n_args or kwargs:
            args = self._complete(args, kwargs)
        *args, requested = args
        if self.check is not None:
            self.check(*args)
        return self._run(args, requested)

    def run_trusted(self, *args):
        """Eager fast path for llmkern.nn's hot loops: the op without the torch dispatcher and checks.

        All arguments, `backend` last, as in the schema. The caller vouches that they pass the op's
        checks (the modules validate their own buffers, and the activation's dtype, shape and device on
        each call, or go through the op). Under torch.compile or with tensor subclasses (fake tensors)
        it is the registered op, so graphs still see `torch.ops.llmkern.*`. Saves the ~5-10 us of
        dispatcher and checks per call that add up over a decode step (benchmarks/bench_op_overhead.py).
        """
        grad = _GRAD()
        if torch.compiler.is_compiling() or any(type(a) not in _PLAIN or (grad and a.requires_grad)
                                                for a in args if isinstance(a, torch.Tensor)):
            return self(*args)  # (tracked by autograd: the registered op, whose backward raises)
        *args, requested = args
        return self._run(args, requested)

    def _run(self, args, requested):
        """Run the first backend of the plan that takes the input (on its GPU: `_other_gpu`)."""
        if requested is None:
            requested = _backends.env_backend()
        device = _device_of(args)
        if device == "cuda" and _several_gpus():
            idx = _other_gpu(_first_cuda_device(args))
            if idx is not None:
                with torch.cuda.device(idx):
                    return self._run(args, requested)
        reasons = []
        for name, impl, why in self._plan(device, requested):
            if impl is None:
                # Static (machine / registration) skips are fallbacks only for an explicit request.
                if requested is not None:
                    reasons.append(why)
                continue
            try:
                out = impl(*args)
            except BackendUnsupported as e:
                reasons.append(f"{name}: {e}")
                continue
            if reasons:
                self._note_fallback(requested, name, reasons)
            self.last_backend = name
            return out
        raise RuntimeError(f"llmkern.{self.name}: no backend can run this input: " + "; ".join(reasons))

    def _plan(self, device: str, requested: str | None) -> tuple:
        """((name, impl or None, reason if skipped), ...) in the order to try, cached per device/request.

        Whether a backend can run at all depends only on the machine and the registrations, not on
        the input, so this is worked out once; changes of `impls` (tests swap backends) re-plan.
        """
        key = (device, requested, self._impls.version)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        if requested is not None and requested not in ALL_BACKENDS:
            raise ValueError(
                f"llmkern.{self.name}: backend must be one of {ALL_BACKENDS} or None, got {requested!r}"
            )
        order = DEVICE_ORDER.get(device, ("reference",))
        if requested is not None:
            order = (requested,) + tuple(b for b in order if b != requested)
        plan = []
        for name in order:
            impl = self.impls.get(name)
            if impl is None:
                plan.append((name, None, f"{name}: not implemented for {self.name}"))
            elif name != "reference" and not _backend_available(name):
                plan.append((name, None, f"{name}: not available on this machine"))
            elif name != "reference" and name not in DEVICE_ORDER.get(device, ()):
                plan.append((name, None, f"{name}: does not run on {device} tensors"))
            else:
                plan.append((name, impl, None))
        if len(self._plans) > 64:
            self._plans.clear()
        self._plans[key] = plan = tuple(plan)
        return plan

    def _note_fallback(self, requested, used, reasons):
        self.fallbacks[(used, reasons[0])] += 1
        log.debug("llmkern.%s fell back to %s (%s)", self.name, used, "; ".join(reasons))
        if requested is not None and requested != used and _STATE.strict:
            raise RuntimeError(
                f"llmkern.{self.name}: requested backend {requested!r} could not run this input "
                f"({'; '.join(reasons)}) and strict mode forbids falling back to {used!r}"
            )


_TC = torch._C
_FN_MODES, _DISPATCH_MODES = _TC._len_torch_function_stack, _TC._len_torch_dispatch_stack
_TRACING, _FUNCTORCH = _TC._get_tracing_state, _TC._are_functorch_transforms_active
_PROFILING, _GRAD = _TC._autograd._profiler_enabled, _TC.is_grad_enabled
_COMPILING = torch.compiler.is_compiling


def _eager_state() -> bool:
    """Plain eager mode: not compiling, tracing, under functorch transforms or the profiler, and no
    torch function or dispatch mode active (~0.3 us)."""
    if _COMPILING():  # first: dynamo folds it to True and must not trace the private calls below
        return False
    return not (_FN_MODES() or _DISPATCH_MODES() or _TRACING() is not None or _FUNCTORCH() or _PROFILING())


def _plain_tensors(args) -> bool:
    """Every tensor argument a plain tensor (torch.Tensor or nn.Parameter: no fake or other subclass)
    on the CPU or a CUDA device that needs no autograd (the ops have no backward: through the
    dispatcher such an output would carry an error node instead). ~0.2 us per tensor. (Sparse or
    nested tensors, which the dispatcher refuses, fail the op's own checks or the backend's stride
    and pointer reads instead.)"""
    grad = _GRAD()
    for a in args:
        if isinstance(a, torch.Tensor):
            if type(a) not in _PLAIN or not (a.is_cpu or a.is_cuda) or (grad and a.requires_grad):
                return False
    return True


def _no_backward(name, ctx, *grads):
    """The autograd formula of every functional op: outputs of inputs that require grad are tracked, and
    backpropagating through them raises (rather than torch's fallback, which warned and dropped the gradient)."""
    raise RuntimeError(f"llmkern.{name} has no backward: llmkern's ops are for inference (run them under "
                       f"torch.no_grad() or torch.inference_mode(); train with the float modules)")


def needs_grad(*tensors) -> bool:
    """Whether autograd would track any of `tensors` (None allowed): for an op's `fast_check`."""
    if not _GRAD():
        return False
    return any(t is not None and t.requires_grad for t in tensors)


def _device_of(args) -> str:
    for a in args:
        if isinstance(a, torch.Tensor):
            return "cpu" if a.is_cpu else a.device.type  # is_cpu: no torch.device object (~0.2 us)
    return "cpu"


_GPUS: list = []  # [torch.cuda.device_count()], read once


def _other_gpu(device) -> int | None:
    """The index of `device` (a CUDA torch.device) when the machine has several GPUs and it is not torch's
    current one, else None. llmkern's and Triton's kernels launch on the current device (the CUDA runtime's
    per-thread state, which torch's own ops switch for themselves): a call on another GPU's tensors must
    make that GPU current first."""
    if not _several_gpus() or device.index is None or device.index == torch.cuda.current_device():
        return None
    return device.index


def _several_gpus() -> bool:
    if not _GPUS:
        _GPUS.append(torch.cuda.device_count())
    return _GPUS[0] > 1


def _first_cuda_device(args):
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_cuda:
            return a.device
    return None


def defop(name: str, schema: str, *, check: Callable | None, fake: Callable,
          fast_check: Callable | None = None) -> Op:
    """Define `torch.ops.llmkern.<name>`. The schema's last argument must be `str? backend=None`.

    fast_check(*args without backend) (optional), for ops called once per layer and step: True only
    when every tensor argument is a plain `torch.Tensor` on the CPU that autograd does not track
    (`needs_grad`) and every check of `check` passes, verified in one pass over the arguments; a
    plain eager call then skips both the generic tensor scan and `check` (~1.5 us). False (for any
    reason) takes the normal path, where `check` raises with its message.
    """
    if not schema.rstrip().split("->")[0].rstrip().endswith("str? backend=None)"):
        raise ValueError(f"schema of {name} must end with 'str? backend=None'")
    return Op(name, schema, check, fake, fast_check)
