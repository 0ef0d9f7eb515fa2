"""Shared helpers of the attention-side op tests: naive float64 definitions, input makers, tolerances.

The naive definitions here are deliberately written differently from llmkern/reference (explicit loops
over heads and query rows, Python index arithmetic) so that the reference is checked against an
independent reading of the spec.
"""
from __future__ import annotations

import contextlib
import math

import torch

from llmkern.ops import OPS

# DESIGN.md: ||out - ref|| / ||ref|| against float64.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def backends(op: str) -> list[str]:
    """Backends of `op` usable here (collected once, at import)."""
    return OPS[op].backends_here()


def backend_device(backend: str) -> str:
    """The device a backend's kernels take tensors on."""
    return "cuda" if backend in ("cuda", "triton") else "cpu"


def run_on(on_backend: str, fn, /, *args, **kwargs):
    """fn(*args, **kwargs) with every tensor argument on `backend`'s device; results come back on the CPU.

    Generic tests build CPU inputs; GPU backends get CUDA copies (one copy per distinct tensor, so an
    argument passed twice stays one tensor), and tensors the op writes in place (caches, a rotated q)
    are copied back into the caller's CPU tensors afterwards. CPU backends run on the inputs as given.
    """
    dev = backend_device(on_backend)
    if dev == "cpu":
        return fn(*args, **kwargs)
    copies = {}

    def move(t):
        if not isinstance(t, torch.Tensor):
            return t
        if id(t) not in copies:
            copies[id(t)] = (t, t.to(dev))
        return copies[id(t)][1]

    out = fn(*[move(a) for a in args], **{k: move(v) for k, v in kwargs.items()})
    for orig, moved in copies.values():
        back_cpu = moved.cpu()
        if not torch.equal(back_cpu, orig):  # written in place by the op
            orig.copy_(back_cpu)

    def back(o):
        if isinstance(o, torch.Tensor):
            return o.cpu()
        if isinstance(o, (tuple, list)):
            return type(o)(back(x) for x in o)
        return o

    return back(out)


def on_device(backend: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """(args, kwargs) with their tensors moved to `backend`'s device (for opcheck on GPU backends)."""
    dev = backend_device(backend)
    mv = lambda t: t.to(dev) if isinstance(t, torch.Tensor) else t  # noqa: E731
    return tuple(mv(a) for a in args), {k: mv(v) for k, v in kwargs.items()}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN or inf anywhere in out gives inf (never passes)."""
    out64, ref64 = out.to(torch.float64), ref.to(torch.float64)
    if not torch.isfinite(out64).all():
        return math.inf
    den = ref64.norm().item()
    num = (out64 - ref64).norm().item()
    return num / den if den > 0 else num


def assert_rel(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "out") -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"


def assert_lse(lse: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """lse: -inf exactly where ref is -inf (rows that see no key), relative error elsewhere."""
    assert lse.shape == ref.shape and lse.dtype == torch.float32
    empty = torch.isneginf(ref)
    assert torch.equal(torch.isneginf(lse), empty), "lse must be -inf exactly on rows that see no key"
    assert_rel(lse[~empty], ref[~empty], tol, "lse")


@contextlib.contextmanager
def poisoned_outputs():
    """torch.empty & co. return NaN-filled memory inside this block (outputs a kernel forgets stay NaN).

    Uses torch's deterministic mode, which fills uninitialized memory; warn_only keeps ops that have
    no deterministic implementation usable.
    """
    was = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def randn(*shape, dtype=torch.float32, layout="contiguous", gen=None) -> torch.Tensor:
    """Random normal tensor of `shape`, optionally as a non-contiguous view with the same values shape.

    layout: "contiguous"; "sliced" (every other entry of dim 0 and the first half of a doubled last
    dim of a bigger tensor); "transposed" (dims 1 and 2 swapped in memory).
    """
    if layout == "contiguous":
        return torch.randn(*shape, generator=gen).to(dtype)
    if layout == "sliced":
        big = torch.randn(2 * shape[0], *shape[1:-1], 2 * shape[-1], generator=gen).to(dtype)
        t = big[::2, ..., : shape[-1]]
    elif layout == "transposed":
        perm = list(shape)
        perm[1], perm[2] = perm[2], perm[1]
        t = torch.randn(*perm, generator=gen).to(dtype).transpose(1, 2)
    else:
        raise ValueError(layout)
    assert t.shape == tuple(shape) and not t.is_contiguous()
    return t


def naive_attention(q, k, v, *, scale=None, causal=False, window_left=-1, window_right=-1, softcap=0.0):
    """One sequence, float64, by rows: q [Sq, Hq, D], k/v [Sk, Hk, D] -> out [Sq, Hq, D], lse [Hq, Sq].

    Query i sees keys j with lo <= j <= hi, lo = i + Sk - Sq - window_left (window_left >= 0, else 0),
    hi = i + Sk - Sq (causal) or + window_right (window_right >= 0) or Sk - 1. No key: out 0, lse -inf.
    """
    q, k, v = q.double(), k.double(), v.double()
    Sq, Hq, D = q.shape
    Sk, Hk = k.shape[0], k.shape[1]
    scale = D ** -0.5 if scale is None else scale
    out = torch.zeros(Sq, Hq, D, dtype=torch.float64)
    lse = torch.full((Hq, Sq), -math.inf, dtype=torch.float64)
    for h in range(Hq):
        kh = h // (Hq // Hk)
        for i in range(Sq):
            diag = i + Sk - Sq
            hi = diag if causal else (diag + window_right if window_right >= 0 else Sk - 1)
            lo = diag - window_left if window_left >= 0 else 0
            lo, hi = max(lo, 0), min(hi, Sk - 1)
            if hi < lo:
                continue
            s = (k[lo:hi + 1, kh] @ q[i, h]) * scale  # [n]
            if softcap > 0:
                s = softcap * torch.tanh(s / softcap)
            m = s.max()
            e = torch.exp(s - m)
            lse[h, i] = m + torch.log(e.sum())
            out[i, h] = (e / e.sum()) @ v[lo:hi + 1, kh]
    return out, lse


def naive_attention_batched(q, k, v, **kw):
    """q [B, Sq, Hq, D], k/v [B, Sk, Hk, D] -> out [B, Sq, Hq, D], lse [B, Hq, Sq] (float64)."""
    outs, lses = zip(*(naive_attention(q[b], k[b], v[b], **kw) for b in range(q.shape[0])))
    return torch.stack(outs), torch.stack(lses)


class CacheLayout:
    """Where each sequence's tokens live in a KV cache, contiguous or paged.

    Contiguous (block_size None): rows are sequences, [B, smax, ...], token j of sequence b at slot
    b * smax + j. Paged: [num_blocks, block_size, ...] with blocks handed out in a shuffled order (so a
    kernel that assumes block b follows block b - 1 fails), two spare blocks, and unused block_table
    entries set to -1. `slots[b]` int64 [L_b] is the flat slot of each of sequence b's tokens.
    """

    def __init__(self, lens, *, block_size=None, smax=None, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.lens = list(lens)
        B = len(self.lens)
        if block_size is None:
            self.row_len = smax if smax is not None else max(self.lens, default=0) + 3
            self.rows = B
            self.block_table = None
            self.slots = [b * self.row_len + torch.arange(n) for b, n in enumerate(self.lens)]
            return
        bs = self.row_len = block_size
        need = [(n + bs - 1) // bs for n in self.lens]
        self.rows = sum(need) + 2
        order = torch.randperm(self.rows, generator=gen)
        self.block_table = torch.full((B, max(need, default=0) + 1), -1, dtype=torch.int32)
        self.slots, nxt = [], 0
        for b, n in enumerate(self.lens):
            blocks = order[nxt:nxt + need[b]]
            nxt += need[b]
            self.block_table[b, : need[b]] = blocks.to(torch.int32)
            j = torch.arange(n)
            self.slots.append(blocks[j // bs].to(torch.int64) * bs + j % bs)

    def place(self, per_seq, fill):
        """per_seq: list of [L_b, *rest] tensors -> cache [rows, row_len, *rest] (other slots = fill)."""
        rest = tuple(per_seq[0].shape[1:])
        flat = torch.full((self.rows * self.row_len,) + rest, fill, dtype=per_seq[0].dtype)
        for slots, t in zip(self.slots, per_seq):
            flat[slots] = t
        return flat.reshape((self.rows, self.row_len) + rest)


def make_kv(lens, Hk, D, *, dtype=torch.float32, int8=False, seed=0):
    """Random per-sequence cache contents: dict of lists, one [L_b, ...] tensor per sequence.

    float: "k", "v" [L_b, Hk, D] of `dtype`. int8: "k", "v" int8 in -127..127 and "k_scale",
    "v_scale" float32 [L_b, Hk] in [0.004, 0.02] (so dequantized values are O(1)).
    "k64"/"v64" hold the float64 values a kernel must see (dequantized for int8).
    """
    gen = torch.Generator().manual_seed(seed)
    kv = {}
    for name in ("k", "v"):
        if int8:
            qs = [torch.randint(-127, 128, (n, Hk, D), generator=gen, dtype=torch.int8) for n in lens]
            ss = [torch.rand(n, Hk, generator=gen) * 0.016 + 0.004 for n in lens]
            kv[name], kv[name + "_scale"] = qs, ss
            kv[name + "64"] = [q_.double() * s_.double()[..., None] for q_, s_ in zip(qs, ss)]
        else:
            ts = [torch.randn(n, Hk, D, generator=gen).to(dtype) for n in lens]
            kv[name], kv[name + "64"] = ts, [t.double() for t in ts]
    return kv


def place_kv(kv, layout):
    """Caches for decode_attention from make_kv's contents: (k_cache, v_cache, k_scale, v_scale).

    Unused float slots and scales are NaN and unused int8 slots hold 99: a kernel that reads past a
    sequence's length produces NaN (float) or garbage that the comparison catches.
    """
    int8 = kv["k"][0].dtype == torch.int8
    fill = 99 if int8 else math.nan
    kc, vc = layout.place(kv["k"], fill), layout.place(kv["v"], fill)
    if not int8:
        return kc, vc, None, None
    return kc, vc, layout.place(kv["k_scale"], math.nan), layout.place(kv["v_scale"], math.nan)
