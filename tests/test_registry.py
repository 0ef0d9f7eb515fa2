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
