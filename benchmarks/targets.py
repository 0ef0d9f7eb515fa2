"""The issues' performance targets read off a saved benchmark run: the CPU one (issue 3) and the GPU ones (issue 6:
Triton, issue 7: CUDA).

report.py appends these tables to a run's report (each when the run measured any of its targets). Every number is a
ratio or fraction from that one run (medians; the machine limits measured in it), as the issues ask.
Issue 3 (CPU; Llama-2-7B 4096x4096 and 11008x4096, SmolLM2-135M's linears):
- int8_linear, M = 1, Llama: 2x bf16 F.linear (bf16 groups), 8x torch._weight_int8pack_mm, 75% of the read
  bandwidth;
- int4_linear, M = 1, Llama: 1.5x torch._weight_int4pack_mm(_for_cpu), 70% of the read bandwidth;
- both, M = 1, SmolLM2: faster than the group's best peer;
- prefill, M = 128 and 512, Llama: W8A8 1.3x bf16 F.linear, int4 (any mode) 1x bf16 F.linear (bf16 groups).
"% of the read bandwidth" is of the best of the group's own memory.read entries and the run's probe (`group_read_gbs`).
The M = 1 ratios against torch's int4 / int8 kernels (bf16 x) are also read from in-turn pairs where the run timed
them (conftest.py: Bench.in_turn; rows "..., in turn"): the median over rounds of the two timed in turn, which
this host's drift between entries cannot move.
Issues 6 and 7 (GPU):
- prefill attention, bf16, causal, D = 128, S >= 4096: fraction of the bf16 matmul rate (CUDA 75%, Triton
  50%) and speed against SDPA (CUDA 1.3x, Triton 1x) and, for CUDA, against the Triton backend (1.3x);
- decode attention over a paged cache, batch >= 32 (Triton: 64), context >= 4096: fraction of the copy
  bandwidth (CUDA 80%) or of the read bandwidth (Triton 70%);
- int4_linear W4A16, Llama-3-8B shapes: M = 1..16 against bf16 F.linear (CUDA 3.5x, Triton 3x), M = 64
  faster than F.linear (CUDA);
- int8_linear W8A8, M >= 1024: against bf16 F.linear (CUDA 1.6x, Triton 1.3x).
The llmkern side of a row is the fastest entry of that backend in the group (e.g. CUDA int4: the op, the
module's packed kernels or the sm_90a GEMM, whichever was fastest), named in the table.
"""
from __future__ import annotations

from typing import Callable

READ_ENTRY = "memory.read"  # (benchmarks/_shapes.py: a group's own read-bandwidth entries, kind "limit")


def group_read_gbs(group: list, limits: dict) -> tuple[float | None, bool]:
    """(read bandwidth to take a group's "% BW" from, whether the group timed its own): the best of the group's
    memory.read entries (plain reads of as many bytes, first and last in the group) and the run's probe
    (`limits["read_gbs"]`, measured once at the run's start). The best, not the nearest: this VM's memory speed
    drifts by 1.5x within minutes, and a fraction of a read that caught a slow moment would flatter a kernel."""
    reads = [e.gbs for e in group if e.kind == "limit" and e.impl.startswith(READ_ENTRY) and e.gbs]
    probe = limits.get("read_gbs")
    best = max(reads + ([probe] if probe else []), default=None)
    return best, bool(reads)


def _fastest(group: list, pred: Callable[[str], bool]):
    es = [e for e in group if pred(e.impl)]
    return min(es, key=lambda e: e.median) if es else None


def _peer(group: list, names: tuple):
    return _fastest(group, lambda i: i in names)


def _backend(name: str) -> Callable[[str], bool]:
    return lambda impl: impl == f"llmkern.{name}" or impl.startswith(f"llmkern.{name}.")


def _rows_attention(groups: dict, limits: dict) -> list[tuple]:
    rows = []
    peak = (limits.get("mm_gflops") or {}).get("bf16")
    for g, es in groups.items():
        e0 = es[0]
        s = e0.shape
        if e0.op != "attention" or e0.dtype != "bf16" or s.get("D") != 128 or s.get("S", 0) < 4096 \
                or not s.get("causal"):
            continue
        sdpa = _peer(es, ("SDPA", "SDPA.bshd-views"))
        tri = _fastest(es, _backend("triton"))
        for issue, name, mm_target, sdpa_target in (("7", "cuda", 0.75, 1.3), ("6", "triton", 0.5, 1.0)):
            ours = _fastest(es, _backend(name))
            if ours is None:
                continue
            if peak and ours.gflops:
                rows.append((issue, "prefill attention: % of bf16 matmul", g, ours.impl, ours.gflops / peak, mm_target,
                             "pct"))
            if sdpa:
                rows.append((issue, "prefill attention: x SDPA", g, ours.impl, sdpa.median / ours.median, sdpa_target,
                             "x"))
            if name == "cuda" and tri:
                rows.append((issue, "prefill attention: x the Triton backend", g, ours.impl, tri.median / ours.median,
                             1.3, "x"))
    return rows


def _rows_decode(groups: dict, limits: dict) -> list[tuple]:
    rows = []
    for g, es in groups.items():
        e0 = es[0]
        s = e0.shape
        if e0.op != "decode_attention" or s.get("L", 0) < 4096 or s.get("B", 0) < 32:
            continue
        paged = lambda name: (lambda impl: impl.startswith(f"llmkern.{name}.paged"))  # noqa: E731
        for issue, name, min_b, limit_key, target in (("7", "cuda", 32, "copy_gbs", 0.8),
                                                      ("6", "triton", 64, "read_gbs", 0.7)):
            ours = _fastest(es, paged(name))
            lim = limits.get(limit_key)
            if ours is None or s["B"] < min_b or not lim or not ours.gbs:
                continue
            what = "copy" if limit_key == "copy_gbs" else "read"
            rows.append((issue, f"paged decode attention: % of {what} bandwidth", g, ours.impl, ours.gbs / lim,
                         target, "pct"))
    return rows


def _rows_linear(groups: dict) -> list[tuple]:
    rows = []
    for g, es in groups.items():
        e0 = es[0]
        s = e0.shape
        if e0.op not in ("int4_linear", "int8_linear") or e0.dtype != "bf16" or e0.model != "Llama-3-8B":
            continue
        fl = _peer(es, ("F.linear",))
        if fl is None:
            continue
        M = s.get("M", 0)
        for issue, name in (("7", "cuda"), ("6", "triton")):
            if e0.op == "int4_linear":
                ours = _fastest(es, _backend(name))
                if M <= 16:
                    what, target = "int4 W4A16 M<=16: x bf16 F.linear", 3.5 if name == "cuda" else 3.0
                elif M == 64 and name == "cuda":
                    what, target = "int4 W4A16 M=64: x bf16 F.linear", 1.0
                else:
                    continue
            else:
                if M < 1024:
                    continue
                ours = _fastest(es, lambda i, n=name: i.startswith(f"llmkern.{n}.w8a8"))
                what, target = "int8 W8A8 M>=1024: x bf16 F.linear", 1.6 if name == "cuda" else 1.3
            if ours is not None:
                rows.append((issue, what, g, ours.impl, fl.median / ours.median, target, "x"))
    return rows


def cpu_rows(groups: dict, limits: dict) -> list[tuple]:
    """Issue 3's targets, as `rows` (issue "3"), for the CPU groups of a CPU run. The llmkern side is the group's
    fastest llmkern.cpu entry (op, module or step program; W8A8 targets: a w8a8 entry), named in the table."""
    out = []
    if limits.get("device", "cpu") != "cpu":
        return out
    out += _cpu_rows_in_turn(groups)
    for g, es in groups.items():
        e0 = es[0]
        s, op = e0.shape, e0.op
        if op not in ("int4_linear", "int8_linear") or e0.model not in ("Llama-2-7B", "SmolLM2-135M") or e0.alt_of:
            continue
        llama, M, bf16 = e0.model == "Llama-2-7B", s.get("M"), e0.dtype == "bf16"
        ours = _fastest(es, _backend("cpu"))
        if ours is None:
            continue
        fl = _peer(es, ("F.linear",))
        if M == 1 and not llama:
            peers = [e for e in es if e.kind == "peer"]
            best = min(peers, key=lambda e: e.median) if peers else None
            if best is not None:
                out.append(("3", f"{op} M=1 SmolLM2: x the best peer", g, ours.impl, best.median / ours.median, 1.0,
                            "x"))
        elif M == 1 and llama:
            bw, own = group_read_gbs(es, limits)
            if op == "int8_linear":
                if fl is not None and bf16:
                    out.append(("3", "int8 M=1: x bf16 F.linear", g, ours.impl, fl.median / ours.median, 2.0, "x"))
                pk = _peer(es, ("torch._weight_int8pack_mm",))
                if pk is not None:
                    out.append(("3", "int8 M=1: x torch._weight_int8pack_mm", g, ours.impl, pk.median / ours.median,
                                8.0, "x"))
            else:
                pk = _peer(es, ("torch._weight_int4pack_mm",))
                if pk is not None:
                    out.append(("3", "int4 M=1: x torch._weight_int4pack_mm", g, ours.impl, pk.median / ours.median,
                                1.5, "x"))
            if bw and ours.gbs:
                of = "best of the group's reads and the run's probe" if own else "the run's probe"
                out.append(("3", f"{op.split('_')[0]} M=1: % of read bandwidth ({of})", g, ours.impl, ours.gbs / bw,
                            0.75 if op == "int8_linear" else 0.70, "pct"))
        elif llama and M in (128, 512) and bf16 and fl is not None:
            if op == "int8_linear":
                w8a8 = _fastest(es, lambda i: i.startswith("llmkern.cpu.w8a8"))
                if w8a8 is not None:
                    out.append(("3", "W8A8 prefill: x bf16 F.linear", g, w8a8.impl, fl.median / w8a8.median, 1.3, "x"))
            else:
                out.append(("3", "int4 prefill: x bf16 F.linear", g, ours.impl, fl.median / ours.median, 1.0, "x"))
    return sorted(out, key=lambda r: (r[1], r[2]))


IN_TURN_TARGETS = {("int4_linear", "torch._weight_int4pack_mm"): 1.5, ("int8_linear", "torch._weight_int8pack_mm"): 8.0}


def _cpu_rows_in_turn(groups: dict) -> list[tuple]:
    """Issue 3's M = 1 ratios against torch's kernels from the in-turn pairs (conftest.py: Bench.in_turn): per group a
    pair comes from (`alt_of`) and peer, the best llmkern entry's median over rounds of peer time / its time, against
    the Llama target (IN_TURN_TARGETS) or, on SmolLM2's shapes, 1x (faster than that peer)."""
    best: dict = {}  # (target, base group) -> (entry, ratio, target value)
    for g, es in groups.items():
        for e in es:
            if e.kind != "llmkern" or e.alt_ratio is None or not e.alt_of or e.shape.get("M") != 1:
                continue
            peer = next((p.impl for p in es if p.kind == "peer"), None)
            if e.model == "Llama-2-7B" and (e.op, peer) in IN_TURN_TARGETS:
                what, target = f"{e.op.split('_')[0]} M=1: x {peer}, in turn", IN_TURN_TARGETS[(e.op, peer)]
            elif e.model == "SmolLM2-135M" and peer is not None:
                what, target = f"{e.op} M=1 SmolLM2: x {peer}, in turn", 1.0
            else:
                continue
            key = (what, e.alt_of)
            if key not in best or e.alt_ratio > best[key][1]:
                best[key] = (e, e.alt_ratio, target)
    return [("3", what, base, e.impl, r, t, "x") for (what, base), (e, r, t) in best.items()]


def cpu_markdown(groups: dict, limits: dict) -> list[str]:
    """The "CPU issue targets" section (empty when the run measured none of them)."""
    return _table(cpu_rows(groups, limits), "## CPU issue targets (issue 3)")


def rows(groups: dict, limits: dict) -> list[tuple]:
    """(issue, target, group, llmkern entry, measured, target value, "x" or "pct") for every target the run
    measured, issue 7 first."""
    out = _rows_attention(groups, limits) + _rows_decode(groups, limits) + _rows_linear(groups)
    return sorted(out, key=lambda r: (-int(r[0]), r[1], r[2]))


def markdown(groups: dict, limits: dict) -> list[str]:
    """The "GPU issue targets" section (empty when the run measured none of them)."""
    return _table(rows(groups, limits), "## GPU issue targets (issue 7: CUDA, issue 6: Triton)")


def _table(rs: list[tuple], title: str) -> list[str]:
    if not rs:
        return []
    fmt = lambda v, k: f"{100 * v:.0f}%" if k == "pct" else f"{v:.2f}x"  # noqa: E731
    met = sum(r[4] >= r[5] for r in rs)
    lines = [title, "",
             f"{met} of {len(rs)} met. Ratios and fractions from this run (medians; limits measured in it).", "",
             "| issue | target | group | llmkern entry | measured | target | met |", "|---|---|---|---|---|---|---|"]
    for issue, what, g, impl, v, t, kind in rs:
        lines.append(f"| {issue} | {what} | {g} | {impl} | {fmt(v, kind)} | {fmt(t, kind)} | "
                     f"{'yes' if v >= t else 'no'} |")
    lines.append("")
    return lines
