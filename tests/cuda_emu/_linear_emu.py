"""Shared pieces of the emulated int8_linear / int4_linear tests (test_int8_linear_sm80_emulated.py,
test_int4_linear_sm80_emulated.py): the real Python adapter `_cuda` of llmkern.ops.<op>, rewritten to run on
CPU tensors with an emulator module (the device checks, the stream, the SM count and the sm_90 check
replaced by stand-ins; every torch.empty allocation filled with 0xFF bytes, NaN for floats, so that an output
element a kernel forgets to write fails), and the quantized-linear test helpers of tests/ops."""
import inspect
import pathlib
import re
import sys
import textwrap

import torch

import llmkern.ops  # noqa: F401  (registers the ops; the adapters live in sys.modules)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "ops"))
from _quant_helpers import TOL, assert_exact_products, assert_rounded_from, rel_err  # noqa: E402,F401


def poison_empty(shape, dtype=None, device=None):
    t = torch.empty(shape, dtype=dtype)
    t.view(torch.uint8).fill_(0xFF)
    return t


# Stand-ins in the adapters' source: (text, replacement); _cuda must contain the _REQUIRED ones.
_REWRITES = (('.device.type != "cuda"', '.device.type != "cpu"'), ("_backends.cuda_module()", "EMU"),
             ("_num_sms(x.device)", "NUM_SMS"), ("_num_sms(qweight.device)", "NUM_SMS"),
             ("torch.empty(", "POISON_EMPTY("), ("torch.cuda.is_current_stream_capturing()", "CAPTURING"),
             ("torch.cuda.synchronize(qweight.device)", "None"), ("torch.cuda.synchronize(weight.device)", "None"))
# Left in the rewritten source they would touch CUDA: none may remain.
_CUDA_CALLS = ('.device.type != "cuda"', "_backends.cuda_module()", "_backends.cuda_stream(", "_num_sms(", "torch.empty(",
               "torch.cuda.")
# Module-level functions of the ops the adapters call besides `_cuda` (rewritten the same way when present).
_HELPERS = ("_cuda_bind", "_cuda_pack", "_cuda_packed_run", "_cuda_prepare")


def _keep_path(src: str, call: str) -> str:
    """src with the statement `call` ..., where it has one (a binding whose returned path name the adapter
    discards), assigned to the module's _last_cuda_path, at whatever indentation it has."""
    pat = re.compile(r"^( *)" + re.escape(call), re.M)
    assert len(pat.findall(src)) <= 1, call
    return pat.sub(lambda m: f"{m.group(1)}global _last_cuda_path\n{m.group(1)}_last_cuda_path = {call}", src)


def make_int4(M, N, K, G, dtype, seed, bias=False, scale16=False):
    """x [M, K]; every nibble value; positive scales, offsets of either sign (GGUF Q4_0/Q4_1-like); scale16: values
    that fp16 holds exactly; an fp32 bias or None."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    qw = torch.randint(0, 256, (N, K // 2), generator=g, dtype=torch.uint8)
    s = torch.rand(N, K // G, generator=g) * 0.02 + 1e-3
    o = -8 * s + torch.randn(N, K // G, generator=g) * 0.01
    if scale16:
        s, o = s.half().float(), o.half().float()
    b = torch.randn(N, generator=g) if bias else None
    return x, qw, s, o, b


class Adapter:
    """`op(...)` runs llmkern.ops.<name>._cuda on CPU tensors through `emu`; module switches (CUDA_DECODE_MMA,
    ...) and the stand-ins NUM_SMS / IS_SM90 are keyword overrides; `.path` is the launcher's path name
    (int8_linear: `_last_cuda_path`; int4_linear: the binding's return value). `.prepare(...)` runs the op's
    cuda preparer (`_cuda_prepare`) the same way and returns its run(x). The op's other cuda helpers (_HELPERS)
    are rewritten alongside."""

    def __init__(self, emu, name):
        self.mod = sys.modules[f"llmkern.ops.{name}"]
        self.emu = emu
        self.src = self._rewrite("_cuda")
        # int4_linear discards the binding's path name: keep it
        self.src = _keep_path(self.src, "mod.int4_linear(\n")
        self.helpers = "\n\n".join(self._rewrite(h) for h in _HELPERS if hasattr(self.mod, h))
        for old in _CUDA_CALLS:  # the stand-ins must reach every device-specific call of the adapter
            assert old not in self.src + self.helpers, old
        self.path = None

    def _rewrite(self, fn):
        src = textwrap.dedent(inspect.getsource(getattr(self.mod, fn)))
        src = "\n".join(line for line in src.splitlines() if not line.startswith("@"))
        for old, new in _REWRITES:
            src = src.replace(old, new)
        src = re.sub(r"_backends\.cuda_stream\([^)]*\)", "0", src)
        # the packed kernel's path name, as for int4_linear above
        src = _keep_path(src, "mod.int4_linear_packed(")
        return src.replace("_is_sm90(x.device)", "IS_SM90")

    def _globals(self, num_sms, is_sm90, capturing, switches):
        for k in switches:
            assert hasattr(self.mod, k), k
        g = dict(self.mod.__dict__, EMU=self.emu, NUM_SMS=num_sms, IS_SM90=is_sm90, POISON_EMPTY=poison_empty,
                 CAPTURING=capturing, _last_cuda_path=None, **switches)
        exec(self.src, g)
        exec(self.helpers, g)
        return g

    def __call__(self, *args, num_sms=132, is_sm90=True, **switches):
        g = self._globals(num_sms, is_sm90, False, switches)
        out = g["_cuda"](*args)
        self.path = g["_last_cuda_path"]
        return out

    def prepare(self, *args, num_sms=132, is_sm90=True, capturing=False, **switches):
        """The cuda preparer's run(x) (each call of it sets `.path` as __call__ does, or to "packed*")."""
        g = self._globals(num_sms, is_sm90, capturing, switches)
        run = g["_cuda_prepare"](*args)

        def call(x):
            g["_last_cuda_path"] = None
            out = run(x)
            self.path = g["_last_cuda_path"]
            return out

        call.packed = getattr(run, "packed", None)
        call.release = getattr(run, "release", None)
        return call
