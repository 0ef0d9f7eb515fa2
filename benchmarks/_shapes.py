"""Real model shapes for the benchmarks, and the default / full case lists.

Shapes come from the models' published configs (config.json):
- SmolLM2-135M: hidden 576, 9 query heads, 3 key/value heads, head dim 64, intermediate 1536, vocab 49152.
- Llama-2-7B:   hidden 4096, 32 query heads, 32 key/value heads, head dim 128, intermediate 11008.
- Llama-3-8B:   hidden 4096, 32 query heads, 8 key/value heads, head dim 128, intermediate 14336.

A linear layer is N x K (out-features x in-features, the [N, K] weight of nn.Linear) applied to M rows.
The default set keeps a file to a few minutes on 2 cores; LLMKERN_BENCH_FULL=1 adds the big shapes.
On a GPU (LLMKERN_BENCH_DEVICE=cuda) the default sets are the shapes of the GPU issues' targets instead
(Llama-3-8B linears at M = 1..1024, prefill attention at S = 4096..16384, decode over batches of 32 and 64
at 4096 tokens), and the activations bf16 only: what scripts/gpu_check.sh measures in its few minutes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

FULL = os.environ.get("LLMKERN_BENCH_FULL", "0") not in ("", "0")
GPU = os.environ.get("LLMKERN_BENCH_DEVICE", "cpu") == "cuda"


@dataclass(frozen=True)
class Model:
    name: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int | None  # None: the lm_head shape is not benchmarked for this model


SMOLLM2 = Model("SmolLM2-135M", 576, 9, 3, 64, 1536, 49152)
LLAMA2 = Model("Llama-2-7B", 4096, 32, 32, 128, 11008, None)
LLAMA3 = Model("Llama-3-8B", 4096, 32, 8, 128, 14336, None)
MODELS = (SMOLLM2, LLAMA2, LLAMA3)


def linear_shapes(m: Model) -> list[tuple[str, int, int]]:
    """(layer names, N, K) of every distinct linear of model `m`, layers with equal shapes merged.

    SmolLM2-135M gives 576x576 (q/o), 192x576 (k/v), 1536x576 (gate/up), 576x1536 (down), 49152x576 (lm_head).
    """
    layers = [
        ("q_proj", m.heads * m.head_dim, m.hidden),
        ("k_proj", m.kv_heads * m.head_dim, m.hidden),
        ("v_proj", m.kv_heads * m.head_dim, m.hidden),
        ("o_proj", m.hidden, m.heads * m.head_dim),
        ("gate_proj", m.intermediate, m.hidden),
        ("up_proj", m.intermediate, m.hidden),
        ("down_proj", m.hidden, m.intermediate),
    ]
    if m.vocab is not None:
        layers.append(("lm_head", m.vocab, m.hidden))
    merged: dict[tuple[int, int], list[str]] = {}
    for name, n, k in layers:
        merged.setdefault((n, k), []).append(name)
    return [("/".join(names), n, k) for (n, k), names in merged.items()]


@dataclass(frozen=True)
class LinearCase:
    model: str
    layer: str
    N: int
    K: int
    M: int

    @property
    def id(self) -> str:
        return f"{self.model}-{self.layer.replace('/', '+')}-{self.N}x{self.K}-M{self.M}"

    @property
    def shape(self) -> dict:
        return {"M": self.M, "N": self.N, "K": self.K}


def linear_cases(gpu_rows: tuple = (1, 16, 64, 1024)) -> list[LinearCase]:
    """Decode (M=1) on every SmolLM2 linear, one prefill-sized SmolLM2 case, and the Llama-2-7B shapes
    and row counts of the CPU linear targets (issue 3): 4096x4096 and 11008x4096 at M = 1, 4096x4096
    at M = 128 and 512 (prefill).

    GPU: the Llama-3-8B q/o, gate/up and down shapes at M in `gpu_rows` (issue 7: int4 at M = 1..16 and
    64, int8 W8A8 at M >= 1024) and SmolLM2's gate/up at M = 1 (a small layer: launch costs).
    Full: every linear of all three models at M = 1, 16, 128 and 512 (on a GPU: added to the above).
    """
    cases = []
    if GPU:
        cases += [LinearCase(LLAMA3.name, l, n, k, M) for M in gpu_rows
                  for l, n, k in (("q_proj/o_proj", 4096, 4096), ("gate_proj/up_proj", 14336, 4096),
                                  ("down_proj", 4096, 14336))]
        cases.append(LinearCase(SMOLLM2.name, "gate_proj/up_proj", 1536, 576, 1))
        if not FULL:
            return _dedup(cases)
    cases += [LinearCase(SMOLLM2.name, l, n, k, 1) for l, n, k in linear_shapes(SMOLLM2)]
    cases.append(LinearCase(SMOLLM2.name, "gate_proj/up_proj", 1536, 576, 64))
    cases.append(LinearCase(LLAMA2.name, "q_proj/o_proj", 4096, 4096, 1))
    cases.append(LinearCase(LLAMA2.name, "gate_proj/up_proj", 11008, 4096, 1))
    cases += [LinearCase(LLAMA2.name, "q_proj/o_proj", 4096, 4096, M) for M in (128, 512)]
    if FULL:
        for m in MODELS:
            for l, n, k in linear_shapes(m):
                for M in (1, 16, 128, 512):
                    if not any((c.model, c.N, c.K, c.M) == (m.name, n, k, M) for c in cases):
                        cases.append(LinearCase(m.name, l, n, k, M))
    return _dedup(cases)


@dataclass(frozen=True)
class AttnCase:
    """Prefill attention: B sequences of S tokens each (Sq = Sk = S)."""

    model: str
    B: int
    S: int
    Hq: int
    Hk: int
    D: int
    causal: bool = True

    @property
    def id(self) -> str:
        return f"{self.model}-B{self.B}-S{self.S}-H{self.Hq}/{self.Hk}-D{self.D}" + ("-causal" if self.causal else "")

    @property
    def shape(self) -> dict:
        return {"B": self.B, "S": self.S, "Hq": self.Hq, "Hk": self.Hk, "D": self.D, "causal": self.causal}


def _attn(m: Model, B: int, S: int, causal: bool = True) -> AttnCase:
    return AttnCase(m.name, B, S, m.heads, m.kv_heads, m.head_dim, causal)


def attention_cases() -> list[AttnCase]:
    if GPU:  # issues 6 / 7: bf16, causal, D = 128, S >= 4096 (Triton: 4096..16384); SmolLM2's D = 64
        cases = [_attn(LLAMA3, 1, 4096), _attn(LLAMA3, 1, 8192), _attn(LLAMA3, 1, 16384), _attn(LLAMA3, 4, 1024),
                 _attn(SMOLLM2, 1, 4096)]
        if not FULL:
            return cases
    else:
        cases = []
    cases += [_attn(SMOLLM2, 1, 128), _attn(SMOLLM2, 1, 512), _attn(LLAMA3, 1, 512)]
    if FULL:
        cases += [_attn(SMOLLM2, 4, 2048), _attn(LLAMA2, 1, 2048), _attn(LLAMA3, 1, 2048),
                  _attn(LLAMA3, 1, 2048, causal=False), _attn(LLAMA3, 4, 1024),
                  _attn(SMOLLM2, 1, 4096), _attn(LLAMA3, 1, 4096)]  # issue 4's S = 4096, D = 64 / 128
    return _dedup(cases)


@dataclass(frozen=True)
class DecodeCase:
    """One new token per sequence over L cached tokens, B sequences; layout "contiguous" or "paged<bs>"."""

    model: str
    B: int
    L: int
    Hq: int
    Hk: int
    D: int

    @property
    def id(self) -> str:
        return f"{self.model}-B{self.B}-L{self.L}-H{self.Hq}/{self.Hk}-D{self.D}"

    @property
    def shape(self) -> dict:
        return {"B": self.B, "L": self.L, "Hq": self.Hq, "Hk": self.Hk, "D": self.D}


def _dec(m: Model, B: int, L: int) -> DecodeCase:
    return DecodeCase(m.name, B, L, m.heads, m.kv_heads, m.head_dim)


def decode_cases() -> list[DecodeCase]:
    if GPU:  # issues 6 / 7: paged, batch >= 32 (Triton: 64), context >= 4096; one sequence for latency
        cases = [_dec(LLAMA3, 32, 4096), _dec(LLAMA3, 64, 4096), _dec(LLAMA3, 1, 4096), _dec(SMOLLM2, 64, 4096)]
        if not FULL:
            return cases
    else:
        cases = []
    cases += [_dec(SMOLLM2, 1, 1024), _dec(SMOLLM2, 8, 1024), _dec(LLAMA3, 1, 4096)]
    if FULL:
        cases += [_dec(SMOLLM2, 32, 2048), _dec(LLAMA2, 1, 4096), _dec(LLAMA2, 8, 2048),
                  _dec(LLAMA3, 8, 8192), _dec(SMOLLM2, 1, 512), _dec(LLAMA3, 8, 512),
                  # issue 4: batch 1 and 8 at contexts 512 and 8192 for both GQA shapes (9:3, 32:8)
                  _dec(SMOLLM2, 8, 512), _dec(SMOLLM2, 1, 8192), _dec(SMOLLM2, 8, 8192), _dec(LLAMA3, 1, 512),
                  _dec(LLAMA3, 1, 8192)]
    return _dedup(cases)


@dataclass(frozen=True)
class AppendCase:
    """Append S new tokens to each of B sequences of a cache with Smax slots per sequence."""

    model: str
    B: int
    S: int
    Smax: int
    Hk: int
    Hq: int
    D: int

    @property
    def id(self) -> str:
        return f"{self.model}-B{self.B}-S{self.S}-Hk{self.Hk}-D{self.D}"

    @property
    def shape(self) -> dict:
        return {"B": self.B, "S": self.S, "Smax": self.Smax, "Hk": self.Hk, "Hq": self.Hq, "D": self.D}


def _app(m: Model, B: int, S: int, Smax: int) -> AppendCase:
    return AppendCase(m.name, B, S, Smax, m.kv_heads, m.heads, m.head_dim)


def append_cases() -> list[AppendCase]:
    # decode (S=1) and prefill (B=1, many tokens)
    if GPU:
        cases = [_app(LLAMA3, 64, 1, 4096), _app(LLAMA3, 1, 4096, 4096)]
        if not FULL:
            return cases
    else:
        cases = []
    cases += [_app(SMOLLM2, 8, 1, 2048), _app(SMOLLM2, 1, 512, 2048), _app(LLAMA3, 8, 1, 4096)]
    if FULL:
        cases += [_app(LLAMA3, 1, 2048, 4096), _app(LLAMA2, 8, 1, 4096), _app(LLAMA2, 1, 2048, 4096)]
    return _dedup(cases)


@dataclass(frozen=True)
class NormCase:
    model: str
    M: int  # tokens
    hidden: int

    @property
    def id(self) -> str:
        return f"{self.model}-M{self.M}-H{self.hidden}"

    @property
    def shape(self) -> dict:
        return {"M": self.M, "hidden": self.hidden}


def norm_cases() -> list[NormCase]:
    if GPU:
        cases = [NormCase(LLAMA3.name, 64, 4096), NormCase(LLAMA3.name, 4096, 4096)]
        if not FULL:
            return cases
    else:
        cases = []
    cases += [NormCase(SMOLLM2.name, 1, 576), NormCase(SMOLLM2.name, 512, 576),
              NormCase(LLAMA3.name, 1, 4096), NormCase(LLAMA3.name, 512, 4096)]
    if FULL:
        cases += [NormCase(SMOLLM2.name, 8, 576), NormCase(LLAMA3.name, 8, 4096), NormCase(LLAMA3.name, 4096, 4096)]
    return _dedup(cases)


@dataclass(frozen=True)
class Variant:
    """A case with a tag that makes it a group of its own (e.g. int4 group size, cache variant)."""

    base: object
    tag: str
    extra: tuple = ()  # (name, value) pairs added to the recorded shape

    @property
    def model(self) -> str:
        return self.base.model

    @property
    def id(self) -> str:
        return f"{self.base.id}-{self.tag}"

    @property
    def shape(self) -> dict:
        return dict(self.base.shape, **dict(self.extra))


def _dedup(cases: list) -> list:
    seen, out = set(), []
    for c in cases:
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


@dataclass
class Entry:
    """One entry of a group, built by a bench file, timed alone (conftest.py: `Bench.entry`) or in turn with a peer
    (`Bench.in_turn`). fn(): one call; kind: "llmkern" (with `backend`) or "peer"; nbytes / flops: the minimum
    memory traffic and the arithmetic of its work; compute: the matmul-rate key (default: the group's dtype);
    check(out): validates the first call's result."""
    impl: str
    fn: Callable
    kind: str
    nbytes: float
    flops: float
    compute: str | None = None
    backend: str | None = None
    check: Callable | None = None


IN_TURN_SEP = "-vs-"  # an in-turn test's parameter: "<llmkern entry>-vs-<peer>"


# ---------------------------------------------------------------------------------- dtypes, backends

# The memory-bound groups' own read-bandwidth entries (CPU runs: M = 1 linears, decode attention; conftest.py's
# Bench.memory_read), kind "limit": neither llmkern nor a peer, one first and one last in the group; the report
# takes those groups' "% BW" from the best of them and the run's probe.
READ_ENTRY, READ_ENTRY_END = "memory.read", "memory.read.end"


def read_entry_wanted(M: int | None = None) -> bool:
    """Whether a group gets READ_ENTRY and READ_ENTRY_END: on the CPU, for work that streams its data once (M = 1
    linears, decode attention: M None). Not on a GPU, where the script's time is short and the run's probe is taken minutes, not
    an hour, before the entries."""
    return not GPU and (M is None or M == 1)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ELT = {"fp32": 4, "bf16": 2, "fp16": 2}


def dtypes() -> list[str]:
    """Activation dtypes to benchmark: LLMKERN_BENCH_DTYPES (comma list), default bf16 and fp32 (GPU: bf16)."""
    names = [s.strip() for s in os.environ.get("LLMKERN_BENCH_DTYPES", "bf16" if GPU else "bf16,fp32").split(",")
             if s.strip()]
    bad = [n for n in names if n not in DTYPES]
    if bad:
        raise ValueError(f"LLMKERN_BENCH_DTYPES: unknown dtype(s) {bad}, expected some of {list(DTYPES)}")
    return names


# The reference backend is plain PyTorch in fp32/fp64: worth timing as a baseline, but only where a
# call stays in the tens of milliseconds.
REFERENCE_MAX_FLOPS = 4e8
REFERENCE_MAX_BYTES = 32e6


def llmkern_backends(op: str, flops: float = 0.0, nbytes: float = 0.0) -> list[str]:
    """llmkern backends to benchmark for `op` on this machine; "reference" only for small problems."""
    from llmkern.ops import OPS

    device = os.environ.get("LLMKERN_BENCH_DEVICE", "cpu")
    runs_here = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}.get(device, ("reference",))
    out = []
    for b in OPS[op].backends_here():
        if b not in runs_here:
            continue
        if b == "reference" and (flops > REFERENCE_MAX_FLOPS or nbytes > REFERENCE_MAX_BYTES):
            continue
        out.append(b)
    return out


def params(items: list[tuple]) -> list:
    """pytest.param list of (case, dtype, entry) with readable ids, in the given (group-major) order.

    Keeping a group's entries adjacent lets each file cache one group's tensors at a time.
    """
    import pytest

    return [pytest.param(*it, id="-".join([it[0].id] + [str(x) for x in it[1:]])) for it in items]


def step_calls(mods, x, n_out: int, op: str):
    """fn() for the ".step" entries: each module's prepared CPU kernel (the run its prepared call makes)
    bound once as a `KernelCall` on x [M, K] into its own out [M, n_out], cycled like the modules.

    This is how llmkern's own runtime runs a linear in a decode step (a `StepProgram` of such calls:
    no Python, no output allocation per layer), so it measures the kernel and its launch, without the
    per-call Python of the module path. fn returns the out it wrote (for the result check) and, like
    the prepared run, records the backend that ran as `OPS[op].last_backend`. None when the module has
    no prepared CPU runner (another backend or device)."""
    import itertools

    from llmkern.ops import OPS

    threads = torch.get_num_threads()
    M = x.shape[0]
    items = []
    for m in mods:
        run = m.__dict__.get("_run")
        impl = getattr(run, "impl", None)
        if impl is None or not hasattr(impl, "call") or run.backend != "cpu":
            return None
        out = torch.empty(M, n_out, dtype=x.dtype)
        ws = torch.empty(max(impl.workspace_size(M, threads), 1), dtype=torch.uint8)
        # the call holds raw pointers into x, m's packed weights, out and ws: keep them alive with it
        items.append((impl.call(x, out, ws, threads), out, ws, m, x))
    nxt = itertools.cycle(items).__next__
    opr = OPS[op]

    def fn():
        c, out, *_ = nxt()
        c()
        opr.last_backend = "cpu"
        return out

    return fn


def with_switch(op_module: str, switch: str, fn, value=True):
    """fn wrapped so that `llmkern.ops.<op_module>.<switch>` is `value` during each call (the CUDA adapters read
    their route switches per call: CUDA_INT4_WGMMA, CUDA_PREFILL_CUBLAS, CUDA_DECODE_PIPELINE, CUDA_GEMM_SPLITK,
    ...), and as it was after it: the entry times that route while the others time the default."""
    import importlib

    mod = importlib.import_module(f"llmkern.ops.{op_module}")  # the module, not the function of that name

    def switched(*args, **kwargs):
        before = getattr(mod, switch)
        setattr(mod, switch, value)
        try:
            return fn(*args, **kwargs)
        finally:
            setattr(mod, switch, before)

    return switched
