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
from _quant_helpers import TOL, assert_rounded_from, rel_err  # noqa: E402,F401


def poison_empty(shape, dtype=None, device=None):
    t = torch.empty(shape, dtype=dtype)
    t.view(torch.uint8).fill_(0xFF)
    return t


class Adapter:
    """`op(...)` runs llmkern.ops.<name>._cuda on CPU tensors through `emu`; module switches (CUDA_DECODE_MMA,
    ...) and the stand-ins NUM_SMS / IS_SM90 are keyword overrides; `.path` is the launcher's path name
    (int8_linear: `_last_cuda_path`; int4_linear: the binding's return value)."""

    def __init__(self, emu, name):
        self.mod = sys.modules[f"llmkern.ops.{name}"]
        self.emu = emu
        src = textwrap.dedent(inspect.getsource(self.mod._cuda))
        src = "\n".join(line for line in src.splitlines() if not line.startswith("@"))
        for old, new in (('.device.type != "cuda"', '.device.type != "cpu"'), ("_backends.cuda_module()", "EMU"),
                         ("_num_sms(x.device)", "NUM_SMS"), ("torch.empty(", "POISON_EMPTY(")):
            assert old in src, old
            src = src.replace(old, new)
        src = re.sub(r"torch\.cuda\.current_stream\([^)]*\)\.cuda_stream", "0", src)
        src = src.replace("_is_sm90(x.device)", "IS_SM90")
        # int4_linear discards the binding's path name: keep it
        src = src.replace("        mod.int4_linear(\n", "        global _last_cuda_path\n        _last_cuda_path = mod.int4_linear(\n")
        self.src = src
        self.path = None

    def __call__(self, *args, num_sms=132, is_sm90=True, **switches):
        for k in switches:
            assert hasattr(self.mod, k), k
        g = dict(self.mod.__dict__, EMU=self.emu, NUM_SMS=num_sms, IS_SM90=is_sm90, POISON_EMPTY=poison_empty,
                 _last_cuda_path=None, **switches)
        exec(self.src, g)
        out = g["_cuda"](*args)
        self.path = g["_last_cuda_path"]
        return out
