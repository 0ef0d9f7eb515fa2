"""The dispatcher: backend argument > LLMKERN_BACKEND > fastest for the device; logged fallbacks; strict mode."""
import pytest
import torch

import llmkern
from llmkern.ops import OPS, BackendUnsupported, strict

EXPECTED_OPS = {
    "attention", "decode_attention", "kv_cache_append", "int8_linear", "int4_linear", "rms_norm",
    "rotary_embedding", "quantize_int8", "dequantize_int8", "quantize_int4", "dequantize_int4",
    "pack_int4", "unpack_int4", "quantize_rows_int8",
}


def test_every_design_op_is_registered_with_a_reference():
    assert EXPECTED_OPS <= set(OPS)
    for name in EXPECTED_OPS:
        assert hasattr(torch.ops.llmkern, name), name
        assert "reference" in OPS[name].backends_here(), name


@pytest.fixture
def fake_cpu_backend():
    """Give rms_norm a 'cpu' backend that records calls and can refuse inputs; restore afterwards."""
    op = OPS["rms_norm"]
    saved = dict(op.impls)
    calls = []
    state = {"refuse": False}

    def impl(x, weight, eps, residual):
        calls.append(x.shape)
        if state["refuse"]:
            raise BackendUnsupported("test refusal")
        return saved["reference"](x, weight, eps, residual)

    op.impls["cpu"] = impl
    op.fallbacks.clear()
    yield op, calls, state
    op.impls.clear()
    op.impls.update(saved)
    op.fallbacks.clear()


def _args():
    return torch.randn(3, 64), torch.randn(64)


def test_default_is_fastest_backend_for_device(fake_cpu_backend, monkeypatch):
    monkeypatch.delenv("LLMKERN_BACKEND", raising=False)
    op, calls, _ = fake_cpu_backend
    x, w = _args()
    llmkern.ops.rms_norm(x, w)
    assert op.last_backend == "cpu" and len(calls) == 1


def test_explicit_backend_beats_environment(fake_cpu_backend, monkeypatch):
    op, calls, _ = fake_cpu_backend
    x, w = _args()
    monkeypatch.setenv("LLMKERN_BACKEND", "cpu")
    llmkern.ops.rms_norm(x, w, backend="reference")
    assert op.last_backend == "reference" and not calls
    monkeypatch.setenv("LLMKERN_BACKEND", "reference")
    llmkern.ops.rms_norm(x, w)
    assert op.last_backend == "reference" and not calls
    llmkern.ops.rms_norm(x, w, backend="cpu")
    assert op.last_backend == "cpu" and len(calls) == 1


def test_unsupported_input_falls_back_and_is_recorded(fake_cpu_backend, monkeypatch):
    monkeypatch.delenv("LLMKERN_BACKEND", raising=False)
    op, calls, state = fake_cpu_backend
    state["refuse"] = True
    x, w = _args()
    y = llmkern.ops.rms_norm(x, w)
    assert op.last_backend == "reference" and len(calls) == 1
    ref = (x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()).float()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    assert sum(op.fallbacks.values()) == 1
    (used, reason), = op.fallbacks
    assert used == "reference" and "test refusal" in reason


def test_strict_mode_refuses_fallback_from_requested_backend(fake_cpu_backend):
    op, calls, state = fake_cpu_backend
    state["refuse"] = True
    x, w = _args()
    with strict():
        with pytest.raises(RuntimeError, match="requested backend 'cpu'"):
            llmkern.ops.rms_norm(x, w, backend="cpu")
        # Without an explicit request, falling back is the normal path even in strict mode.
        llmkern.ops.rms_norm(x, w, backend="reference")


def test_unknown_backend_is_a_clear_error(monkeypatch):
    x, w = _args()
    with pytest.raises(ValueError, match="backend must be one of"):
        llmkern.ops.rms_norm(x, w, backend="tpu")
    monkeypatch.setenv("LLMKERN_BACKEND", "tpu")
    with pytest.raises(ValueError, match="got 'tpu'"):
        llmkern.ops.rms_norm(x, w)


def test_backend_for_other_device_is_skipped_not_run(monkeypatch):
    """Asking for 'cuda' with CPU tensors runs the CPU order instead (and strict mode says why)."""
    x, w = _args()
    llmkern.ops.rms_norm(x, w, backend="cuda")
    assert OPS["rms_norm"].last_backend in ("cpu", "reference")
    with strict(), pytest.raises(RuntimeError, match="cuda"):
        llmkern.ops.rms_norm(x, w, backend="cuda")


def test_checks_run_before_any_backend(fake_cpu_backend):
    op, calls, _ = fake_cpu_backend
    with pytest.raises(ValueError, match="weight"):
        llmkern.ops.rms_norm(torch.randn(3, 64), torch.randn(63))
    assert not calls


def test_fake_kernels_give_shapes_under_fake_mode():
    """Every op's fake kernel runs the shared checks and returns the right shapes without data."""
    from torch._subclasses import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 5, 64)
        w = torch.empty(7, 64, dtype=torch.int8)
        assert llmkern.ops.int8_linear(x, w, torch.empty(7)).shape == (2, 5, 7)
        q = torch.empty(2, 9, 6, 64)
        out, lse = llmkern.ops.attention(q, torch.empty(2, 11, 3, 64), torch.empty(2, 11, 3, 64),
                                         causal=True, return_lse=True)
        assert out.shape == q.shape and lse.shape == (2, 6, 9)
        with pytest.raises(ValueError, match="x must have shape"):
            llmkern.ops.int8_linear(torch.empty(2, 63), w, torch.empty(7))


# ----------------------------------------------------------------------------- eager calls skip the dispatcher

@pytest.fixture
def dispatcher_calls(monkeypatch):
    """Record the public function's calls of `torch.ops.llmkern.rms_norm` (then made as usual)."""
    op = OPS["rms_norm"]
    real = getattr(torch.ops.llmkern, "rms_norm").default
    calls = []

    def recorded(*a, **k):
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(op, "overload", recorded)
    return calls


def test_plain_eager_call_runs_the_kernel_directly(dispatcher_calls):
    """A plain eager call is the op's kernel itself (checks, backend choice, fallbacks): same result,
    same errors, without the torch dispatcher."""
    x, w = _args()
    y = llmkern.ops.rms_norm(x, w, backend="reference")
    ref = (x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()).float()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    assert OPS["rms_norm"].last_backend == "reference"
    with pytest.raises(ValueError, match="weight"):
        llmkern.ops.rms_norm(torch.randn(3, 64), torch.randn(63))
    with torch.no_grad():  # parameters are fine without autograd
        llmkern.ops.rms_norm(x, torch.nn.Parameter(w))
    assert dispatcher_calls == []


@pytest.mark.parametrize("case", ["autograd", "dispatch_mode", "function_mode", "profiler", "meta", "subclass"])
def test_non_plain_calls_go_through_the_dispatcher(case, dispatcher_calls):
    """Whatever could tell a direct call from the registered op takes the registered op: inputs that
    need autograd, torch function/dispatch modes (they must see llmkern ops), the profiler, meta and
    tensor subclasses."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class LogDispatch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    class LogFunction(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    class Sub(torch.Tensor):
        pass

    x, w = _args()
    if case == "autograd":
        x.requires_grad_(True)
        llmkern.ops.rms_norm(x, w, backend="reference")
    elif case == "dispatch_mode":
        with LogDispatch():
            llmkern.ops.rms_norm(x, w, backend="reference")
        assert any("llmkern.rms_norm" in s for s in seen)
    elif case == "function_mode":
        with LogFunction():
            llmkern.ops.rms_norm(x, w, backend="reference")
        assert any("llmkern.rms_norm" in s for s in seen)
    elif case == "profiler":
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            llmkern.ops.rms_norm(x, w, backend="reference")
        assert any("llmkern::rms_norm" in e.name for e in prof.events())
    elif case == "meta":
        assert llmkern.ops.rms_norm(x.to("meta"), w.to("meta")).device.type == "meta"
    else:
        y = llmkern.ops.rms_norm(x.as_subclass(Sub), w, backend="reference")
        torch.testing.assert_close(y.as_subclass(torch.Tensor), llmkern.ops.rms_norm(x, w, backend="reference"))
    assert len(dispatcher_calls) == 1


def test_replacing_or_editing_impls_replans():
    """Plans are cached per change of the implementation table, whether it is edited or replaced."""
    op = OPS["rms_norm"]
    saved = dict(op.impls)
    x, w = _args()
    calls = []
    try:
        op.impls = {"reference": lambda *a: calls.append("new table") or saved["reference"](*a)}
        llmkern.ops.rms_norm(x, w)
        op.impls["reference"] = lambda *a: calls.append("edited") or saved["reference"](*a)
        llmkern.ops.rms_norm(x, w)
        del op.impls["reference"]
        with pytest.raises(RuntimeError, match="no backend"):
            llmkern.ops.rms_norm(x, w)
    finally:
        op.impls = saved
    assert calls == ["new table", "edited"]
    llmkern.ops.rms_norm(x, w)
    assert op.last_backend in ("cpu", "reference")


@pytest.mark.parametrize("op_name", ["decode_attention", "kv_cache_append"])
def test_fast_check_vouches_for_plain_valid_arguments_only(op_name, monkeypatch):
    """An op's fast_check lets a plain eager call skip the generic scan and `check`; arguments it does
    not vouch for (autograd inputs, bad values) take the full checks or the dispatcher."""
    op = OPS[op_name]
    assert op.fast_check is not None
    real_check, real_overload = op.check, getattr(torch.ops.llmkern, op_name).default
    checks, dispatched = [], []
    monkeypatch.setattr(op, "check", lambda *a: checks.append(1) or real_check(*a))
    monkeypatch.setattr(op, "overload", lambda *a: dispatched.append(1) or real_overload(*a))
    k, v = torch.randn(1, 4, 2, 64), torch.randn(1, 4, 2, 64)
    lens = torch.tensor([3], dtype=torch.int32)
    q = torch.randn(1, 4, 64)

    def call(q=q, k=k, lens=lens, slots=torch.tensor([[2]])):
        if op_name == "decode_attention":
            return llmkern.ops.decode_attention(q, k, v, lens)
        return llmkern.ops.kv_cache_append(k[:, :1], v[:, :1], k, v, slots)

    call()
    assert checks == [] and dispatched == []
    with pytest.raises(ValueError):
        if op_name == "decode_attention":
            call(lens=torch.tensor([5], dtype=torch.int32))  # more than the cache holds
        else:
            call(slots=torch.tensor([[4]]))  # past the cache
    assert checks == [1] and dispatched == []
    if op_name == "decode_attention":
        call(q=q.clone().requires_grad_(True))
    else:
        call(k=k.clone().requires_grad_(True))
    assert dispatched == [1]
    with torch.no_grad():
        call(q=q.clone().requires_grad_(True))
    assert dispatched == [1] and checks == [1, 1]


def test_wrong_scalar_type_is_named_as_before():
    """Plain eager calls skip the dispatcher's schema check; a scalar of the wrong type still gets its
    error naming the argument (the call is retried through the registered op)."""
    q, k = torch.randn(1, 4, 64), torch.randn(1, 4, 2, 64)
    lens = torch.tensor([3], dtype=torch.int32)
    with pytest.raises(Exception, match="softcap"):
        llmkern.ops.decode_attention(q, k, k, lens, softcap="big")
    with pytest.raises(Exception, match="eps"):
        llmkern.ops.rms_norm(torch.randn(2, 64), torch.randn(64), eps="small")


def test_rms_norm_fast_check(monkeypatch):
    """rms_norm's fast_check vouches for plain CPU tensors (an nn.Parameter weight included) that pass
    every check; a wrong weight shape or a tracked input takes the full check / the dispatcher."""
    op = OPS["rms_norm"]
    assert op.fast_check is not None
    real_check, real_overload = op.check, torch.ops.llmkern.rms_norm.default
    checks, dispatched = [], []
    monkeypatch.setattr(op, "check", lambda *a: checks.append(1) or real_check(*a))
    monkeypatch.setattr(op, "overload", lambda *a: dispatched.append(1) or real_overload(*a))
    x, r = torch.randn(3, 64), torch.randn(3, 64)
    w = torch.nn.Parameter(torch.randn(64), requires_grad=False)
    y, h = llmkern.ops.rms_norm(x, w, 1e-6, r)
    assert checks == [] and dispatched == []
    torch.testing.assert_close(h, x + r)
    with pytest.raises(ValueError, match="weight"):
        llmkern.ops.rms_norm(x, torch.randn(63))
    assert checks == [1] and dispatched == []
    llmkern.ops.rms_norm(x.clone().requires_grad_(True), w)
    assert dispatched == [1]


def test_op_object_takes_keyword_arguments():
    """Calling an Op with keywords (defaults left out) goes through the registered op, as before."""
    x, w = _args()
    y, _ = OPS["rms_norm"](x, w, backend="reference")
    ref = (x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()).float()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)


def _linear_variants(op_name):
    """(valid args, [variants]) of int8_linear / int4_linear without backend: each variant breaks one
    thing _check looks at (or autograd / device / subclass), or is valid in another way."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 64, generator=g)
    N = 5
    if op_name == "int8_linear":
        w = torch.randint(-127, 128, (N, 64), dtype=torch.int8, generator=g)
        s = torch.rand(N, generator=g)
        base = (x, w, s, torch.randn(N), "w8a16")
        swaps = {1: [w.float(), w[:, :63], w[None]], 2: [s.double(), torch.rand(N + 1), torch.rand(N, 0),
                                                          torch.rand(N, 3), torch.rand(N, 4), torch.rand(N, 2, 2)]}
    else:
        w = torch.randint(0, 256, (N, 32), dtype=torch.uint8, generator=g)
        s = torch.rand(N, 2, generator=g)
        base = (x, w, s, -s, torch.randn(N), "w4a16")
        swaps = {1: [w.to(torch.int8), w[:, :31], w[None]], 2: [s.double(), torch.rand(N, 3), torch.rand(N, 1),
                                                                torch.rand(N + 1, 2), torch.rand(N, 4)],
                 3: [(-s).double(), torch.rand(N, 1), torch.rand(2)]}
    bias_i, mode_i = len(base) - 2, len(base) - 1
    swaps[0] = [x.double(), x[:, :63], x.to(torch.int32), x[0, 0], x.to("meta"), x.clone().requires_grad_(True),
                x.as_subclass(type("Sub", (torch.Tensor,), {})), x.t().contiguous().t(), x[None], x.bfloat16()]
    swaps[bias_i] = [None, torch.randn(N + 1), torch.randn(N).double(), torch.randn(1, N), torch.randn(N).half()]
    swaps[mode_i] = ["w8a8" if op_name == "int8_linear" else "w4a8g", "w3a3"]
    out = []
    for i, alts in swaps.items():
        for a in alts:
            out.append(base[:i] + (a,) + base[i + 1:])
    if op_name == "int4_linear":  # scales and offsets agreeing on a group size that is not allowed / allowed
        for groups in (4, 1):
            t = torch.rand(N, groups)
            out.append(base[:2] + (t, t.clone()) + base[4:])
    return base, out


@pytest.mark.parametrize("op_name", ["int8_linear", "int4_linear"])
def test_linear_fast_check_never_vouches_for_what_check_rejects(op_name, monkeypatch):
    """The quantized linears' fast_check: True for plain valid CPU arguments (the call then skips the
    generic scan and `check`), and never True where `check` itself (run without the shortcut) raises."""
    import importlib

    mod = importlib.import_module(f"llmkern.ops.{op_name}")
    fast = OPS[op_name].fast_check
    assert fast is mod._cpu_fast_ok
    base, variants = _linear_variants(op_name)
    assert fast(*base)
    monkeypatch.setattr(mod, "_cpu_fast_ok", lambda *a: False)  # _check's own code from here on
    vouched = 0
    for args in [base] + variants:
        if fast(*args):
            vouched += 1
            mod._check(*args)  # must not raise
        else:
            try:
                mod._check(*args)
            except (TypeError, ValueError):
                pass
    assert vouched >= 4  # the base, bf16 x, a strided x, another mode, no bias ...


@pytest.mark.parametrize("op_name", ["int8_linear", "int4_linear"])
def test_linear_fast_check_skips_check_and_dispatcher(op_name, monkeypatch):
    op = OPS[op_name]
    real_check, real_overload = op.check, getattr(torch.ops.llmkern, op_name).default
    checks, dispatched = [], []
    monkeypatch.setattr(op, "check", lambda *a: checks.append(1) or real_check(*a))
    monkeypatch.setattr(op, "overload", lambda *a: dispatched.append(1) or real_overload(*a))
    base, _ = _linear_variants(op_name)
    fn = getattr(llmkern.ops, op_name)
    out = fn(*base)
    assert checks == [] and dispatched == [] and out.shape == (3, 5)
    with pytest.raises(ValueError, match="bias"):
        fn(*base[:-2], torch.randn(6), base[-1])
    assert checks == [1] and dispatched == []
    fn(base[0].clone().requires_grad_(True), *base[1:])
    assert dispatched == [1]


class _FakeGpu:
    """torch.cuda's device state on a machine with two GPUs, current device 0: `torch.cuda.device(i)` makes i
    current for its block (what the registry must do before a backend launches on a tensor of GPU 1)."""

    def __init__(self, monkeypatch):
        from llmkern.ops import _registry

        self.current = 0
        monkeypatch.setattr(_registry, "_GPUS", [2])
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "device", self.device)

    def device(self, idx):
        import contextlib

        @contextlib.contextmanager
        def cm():
            prev, self.current = self.current, int(idx.index if isinstance(idx, torch.device) else idx)
            try:
                yield
            finally:
                self.current = prev
        return cm()


def test_kernels_run_with_their_tensors_gpu_current(monkeypatch):
    """Kernels (llmkern's CUDA launchers, Triton's) launch on the current GPU: an op call, a preparer and a
    prepared run on tensors of another GPU run with that GPU current, and leave the current one as it was."""
    from llmkern.ops import _registry

    gpu = _FakeGpu(monkeypatch)
    op = OPS["rms_norm"]
    seen = []

    def impl(*args):
        seen.append(("op", gpu.current))
        return "y"

    monkeypatch.setitem(op.impls, "cuda", impl)
    monkeypatch.setattr(_registry, "_backend_available", lambda name: True)
    monkeypatch.setattr(_registry, "_device_of", lambda args: "cuda")
    for idx in (1, 0):
        monkeypatch.setattr(_registry, "_first_cuda_device", lambda args, i=idx: torch.device("cuda", i))
        assert op._run((None, None, 1e-6, None), "cuda") == "y"
        assert seen[-1] == ("op", idx) and gpu.current == 0

    def prep(*static):
        seen.append(("prepare", gpu.current))
        return lambda x: seen.append(("run", gpu.current))

    monkeypatch.setitem(op.preparers, "cuda", prep)
    run = op.prepare(None, None, None, backend="cuda", device=torch.device("cuda", 1))
    assert seen[-1] == ("prepare", 1) and gpu.current == 0

    class X:  # an activation on GPU 1 (is_cuda and device are all the wrapper reads)
        is_cuda, device = True, torch.device("cuda", 1)

    run(X())
    assert seen[-1] == ("run", 1) and gpu.current == 0
    X.device = torch.device("cuda", 0)
    run(X())
    assert seen[-1] == ("run", 0)


def test_cuda_backend_unavailable_where_its_kernels_cannot_run(monkeypatch, caplog):
    """A GPU the build has no code for (older than sm_80, or newer than its targets without PTX): the cuda
    backend reports itself unavailable, with the reason (in `llmkern info` too), and the next backend runs."""
    from llmkern import _backends

    class FakeModule:
        def kernel_image_error(self, device):
            return "no kernel image is available for execution on the device (compute capability 12.0)"

    monkeypatch.setattr(_backends, "cuda_module", lambda: FakeModule())
    monkeypatch.setattr(_backends, "_cuda_device", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    _backends.cuda_kernels_error.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="llmkern"):
            assert not _backends.available("cuda")
        assert "no kernel image" in _backends.cuda_kernels_error() and "cannot run on cuda:0" in caplog.text
        FakeModule.kernel_image_error = lambda self, device: ""
        _backends.cuda_kernels_error.cache_clear()
        assert _backends.available("cuda") and _backends.cuda_kernels_error() is None
    finally:
        _backends.cuda_kernels_error.cache_clear()


def test_cuda_stream_asks_torch_for_the_device_of_the_tensor(monkeypatch):
    """_backends.cuda_stream: the raw stream of the given device (torch.device, index) or, for None, of the current
    GPU, through torch._C._cuda_getCurrentRawStream; torch.cuda.current_stream(device).cuda_stream where torch
    has no such call."""
    from llmkern import _backends

    asked = []
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda i: asked.append(i) or 1000 + i, raising=False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(_backends, "_RAW_STREAM", [None])
    assert _backends.cuda_stream(torch.device("cuda", 1)) == 1001
    assert _backends.cuda_stream(2) == 1002 and _backends.cuda_stream(None) == 1003
    assert _backends.cuda_stream(torch.device("cuda")) == 1003  # (no index: the current GPU)
    assert asked == [1, 2, 3, 3]

    class FakeStream:
        cuda_stream = 77

    monkeypatch.delattr(torch._C, "_cuda_getCurrentRawStream")
    monkeypatch.setattr(_backends, "_RAW_STREAM", [None])
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: asked.append(device) or FakeStream)
    assert _backends.cuda_stream(torch.device("cuda", 1)) == 77 and asked[-1] == torch.device("cuda", 1)
