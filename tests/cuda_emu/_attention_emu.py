"""Shared by the emulated prefill attention tests (test_attention_sm80_emulated.py, _sm90_emulated.py): the
emulator module holding both kernels, the adapter runner, the check against the float64 reference, inputs."""
import importlib

import torch

from llmkern import reference

TOL = 1e-2  # DESIGN.md, fp16 / bf16 outputs
ATT = importlib.import_module("llmkern.ops.attention")  # the module (llmkern.ops.attention is the function)

MASKS = {
    "full": {},
    "causal": dict(causal=True),
    "window_both": dict(window_left=70, window_right=9),
    "causal_window_left": dict(causal=True, window_left=100),
    "softcap_causal": dict(causal=True, softcap=2.0, scale=0.5),
}


def load_emu():
    """The emulated attention module (csrc/cuda/attention.cu + attention_sm90.cu: both kernels, one build)."""
    import build_emu

    return build_emu.load(ops=("attention",), sources=["csrc/cuda/attention_sm90.cu"], name="_C_cuda_emu_attn")


def runner(emu, kernel):
    """run(q, k, v, cu_q=None, ...) -> (out, lse) through the real adapter; asserts `kernel` ("sm80" / "sm90")
    ran. The caller sets ATT._CUDA_WGMMA / _CUDA_WIDE and the emulator's timing."""
    def run(q, k, v, cu_q=None, cu_k=None, scale=None, causal=False, window_left=-1, window_right=-1, softcap=0.0):
        ATT._last_cuda_kernel = None
        out, lse = ATT._cuda_launch(emu, 0, q, k, v, cu_q, cu_k, scale, causal, window_left, window_right, softcap)
        assert ATT._last_cuda_kernel == kernel
        return out, lse
    return run


def reference_of(q, k, v, **kw):
    return reference.attention(q, k, v, kw.get("cu_q"), kw.get("cu_k"), kw.get("scale"), kw.get("causal", False),
                               kw.get("window_left", -1), kw.get("window_right", -1), kw.get("softcap", 0.0))


def check(run, q, k, v, **kw):
    """Runs and compares: out within TOL (relative, float64 reference), lse -inf exactly where the reference's
    is, else within 2e-5."""
    out, lse = run(q, k, v, **kw)
    rout, rlse = reference_of(q, k, v, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    err = ((out.double() - rout.double()).norm() / rout.double().norm().clamp_min(1e-30)).item()
    assert err <= TOL, f"relative error {err}"
    fin = torch.isfinite(rlse)
    assert torch.equal(fin, torch.isfinite(lse)), "rows without keys must have lse -inf, the others finite"
    assert torch.allclose(lse[fin], rlse[fin].float(), rtol=2e-5, atol=2e-5)
    return out, lse


def rand(*shape, dtype, g):
    return torch.randn(*shape, generator=g).to(dtype)
