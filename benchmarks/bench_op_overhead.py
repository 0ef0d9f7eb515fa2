"""Per-call cost of dispatch: `torch.ops.llmkern.<op>` vs calling the backend function directly.

On a decode step of hundreds of op calls, microseconds of dispatch per call add up (DESIGN.md: about
2 us for an op registered with `Library.define` + `impl`, about 10 us for `@torch.library.custom_op`).
Inputs are tiny so the work itself is negligible. Groups and entries:
- "trivial": an op that does nothing, `(Tensor x) -> ()`, called as a plain Python function (baseline),
  as an op registered with `torch.library.Library.define` + `impl` (llmkern's way), and as an op made
  with `@torch.library.custom_op`;
- "<op>/<backend>": the backend function called directly (baseline, no checks, no dispatch), the public
  function `llmkern.ops.<op>(..., backend=...)` (in plain eager use it runs the op's kernel, checks
  and backend choice included, without the torch dispatcher: llmkern/ops/_registry.py), and
  `torch.ops.llmkern.<op>.default(..., backend)`.
The "vs best peer" column of the report is then the dispatch's slowdown; median(op) - median(baseline)
is the overhead per call.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import _shapes as S

OP = "op_overhead"


@dataclass(frozen=True)
class Tiny:
    what: str
    model: str = "-"

    @property
    def id(self) -> str:
        return self.what

    @property
    def shape(self) -> dict:
        return {}


# ----------------------------------------------------------------------------- trivial ops

def _noop(x: torch.Tensor) -> None:
    return None


_LIB = torch.library.Library("llmkern_bench", "FRAGMENT")
_LIB.define("noop_define(Tensor x) -> ()")
for _key in ("CPU", "CUDA"):
    _LIB.impl("noop_define", _noop, _key)


@torch.library.custom_op("llmkern_bench::noop_custom_op", mutates_args=())
def _noop_custom(x: torch.Tensor) -> None:
    return None


TRIVIAL = {
    "python-function": lambda x: _noop(x),
    "Library.define+impl": lambda x: torch.ops.llmkern_bench.noop_define.default(x),
    "@custom_op": lambda x: torch.ops.llmkern_bench.noop_custom_op.default(x),
}


# ----------------------------------------------------------------------------- llmkern ops, tiny inputs

def _tiny_args(op: str, device: str) -> tuple[tuple, dict]:
    """(the op's arguments in schema order without `backend`, keyword arguments of the public function)."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    if op == "rms_norm":
        return (r(1, 64), r(64), 1e-6, None), {}
    if op == "int8_linear":
        w = torch.randint(-127, 128, (64, 64), dtype=torch.int8, generator=g).to(device)
        return (r(1, 64), w, r(64).abs() * 0.01, None, "w8a16"), {}
    if op == "decode_attention":
        lens = torch.full((1,), 16, dtype=torch.int32, device=device)
        return (r(1, 2, 64), r(1, 16, 1, 64), r(1, 16, 1, 64), lens, None, None, None, None, 0.0, -1), {}
    if op == "kv_cache_append":
        slots = torch.tensor([[3]], dtype=torch.int64, device=device)
        kc, vc = torch.zeros(1, 16, 1, 64, device=device), torch.zeros(1, 16, 1, 64, device=device)
        return (r(1, 1, 1, 64), r(1, 1, 1, 64), kc, vc, slots, None, None, None, None, None, False), {}
    raise AssertionError(op)


OPS_MEASURED = ("rms_norm", "int8_linear", "decode_attention", "kv_cache_append")
N_POSITIONAL = {"rms_norm": 4, "int8_linear": 5, "decode_attention": 4, "kv_cache_append": 5}


def _items():
    items = [(Tiny("trivial"), "fp32", name) for name in TRIVIAL]
    for op in OPS_MEASURED:
        for b in S.llmkern_backends(op):
            case = Tiny(f"{op}-{b}")
            items += [(case, "fp32", f"{kind}.{op}.{b}") for kind in ("direct", "llmkern.ops", "torch.ops")]
    return items


@pytest.mark.parametrize("case, dtype, impl", S.params(_items()))
def test_op_overhead(bench, case, dtype, impl):
    if case.what == "trivial":
        x = torch.zeros(4, device=bench.device)
        f = TRIVIAL[impl]
        kind = "peer" if impl == "python-function" else "llmkern"
        bench(lambda: f(x), op=OP, impl=impl, kind=kind, case=case, dtype=dtype, nbytes=0.0, flops=0.0, graph=False)
        return

    import llmkern.ops as ops

    how, op, backend = impl.rsplit(".", 2)  # "direct" | "llmkern.ops" | "torch.ops", op name, backend
    args, kwargs = _tiny_args(op, bench.device)
    if how == "direct":
        fn = lambda: ops.OPS[op].impls[backend](*args)  # noqa: E731
        kind = "peer"
    elif how == "llmkern.ops":
        public = getattr(ops, op)
        pos = args[:N_POSITIONAL[op]]  # the public functions take the rest as keywords (all default here)
        fn = lambda: public(*pos, backend=backend)  # noqa: E731
        kind = "llmkern"
    else:
        overload = getattr(torch.ops.llmkern, op).default
        fn = lambda: overload(*args, backend)  # noqa: E731
        kind = "llmkern"
    if how == "direct":
        try:
            fn()
        except NotImplementedError:
            pytest.skip(f"llmkern.{op} backend {backend!r} not implemented yet")
        bench(fn, op=OP, impl=impl, kind=kind, case=case, dtype=dtype, nbytes=0.0, flops=0.0, graph=False)
    else:  # (graph=False: on a GPU the host-side cost is the point, not the kernels)
        bench(fn, op=OP, impl=impl, kind=kind, backend=backend, verify_op=op, case=case, dtype=dtype,
              nbytes=0.0, flops=0.0, graph=False)
