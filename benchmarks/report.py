"""Turn a saved pytest-benchmark run into a markdown table and a PNG plot.

    python benchmarks/report.py SAVED.json [--out DIR] [--no-plot]

SAVED.json comes from `pytest benchmarks/ --benchmark-only --benchmark-json=SAVED.json` (or
`--benchmark-save=NAME`, stored under .benchmarks/). Writes DIR/<stem>_report.md and
DIR/<stem>_report.png (DIR defaults to the JSON's folder) and prints the table. Columns: see
benchmarks/README.md. Speedups are ratios of medians measured in the same run: "vs X" = median(X) /
median(this row), so > 1 means this row is faster than X.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # targets.py sits beside this file
import targets  # noqa: E402


@dataclass
class Entry:
    group: str
    impl: str
    kind: str  # "llmkern", "peer" or "limit" (a group's own read-bandwidth entry, targets.READ_ENTRY)
    median: float  # seconds
    nbytes: float
    flops: float
    compute: str
    dtype: str
    op: str
    shape: dict = field(default_factory=dict)  # the case's shape (M, N, K / B, S, D / ...)
    model: str = ""
    timing: str = ""  # GPU: "graph" (kernel time) or "eager..." (benchmarks/conftest.py: Bench._cuda_timed)
    alt_ratio: float | None = None  # alternated entries: the median over rounds of peer time / this entry's time
    alt_of: str = ""  # an in-turn kernel pair's (conftest.py: Bench.in_turn) group: the group the pair comes from

    @property
    def label(self):
        """impl, marked when a GPU entry was timed eagerly: its time includes the host's launch and Python cost,
        unlike the graph-replayed entries beside it."""
        return self.impl + (" (eager)" if self.timing and self.timing != "graph" else "")

    @property
    def gbs(self):
        return self.nbytes / self.median / 1e9 if self.nbytes else None

    @property
    def gflops(self):
        return self.flops / self.median / 1e9 if self.flops else None


def load(path: str) -> tuple[list[Entry], dict]:
    """Entries of a saved run and its metadata (limits, machine info, date)."""
    with open(path) as f:
        data = json.load(f)
    entries = []
    for b in data.get("benchmarks", []):
        info = b.get("extra_info") or {}
        stats = b.get("stats") or {}
        if "median" not in stats:
            continue
        entries.append(Entry(
            group=b.get("group") or info.get("case") or b["name"],
            impl=info.get("impl") or b["name"],
            kind=info.get("kind") or ("llmkern" if "llmkern" in b["name"] else "peer"),
            # (a GPU entry timed as replays of a graph of k calls: per call; conftest.py's JSON hook did it already)
            median=float(stats["median"]) / (1 if stats.get("per_call") else int(info.get("calls_per_replay") or 1)),
            nbytes=float(info.get("bytes") or 0.0),
            flops=float(info.get("flops") or 0.0),
            compute=info.get("compute") or info.get("dtype") or "fp32",
            dtype=info.get("dtype") or "",
            op=info.get("op") or (b.get("group") or "").split(" ")[0],
            shape=info.get("shape") or {},
            model=info.get("model") or "",
            timing=info.get("timing") or "",
            alt_ratio=info.get("alt_ratio"),
            alt_of=info.get("alt_of") or "",
        ))
        if info.get("alt_peer") and info.get("alt_peer_median_s"):
            # an entry timed in turn with a peer, round by round (bench_generate.py: test_generate_alternated;
            # conftest.py: Bench.in_turn): the peer's rounds are an entry of the same group
            e = entries[-1]
            entries.append(Entry(group=e.group, impl=info["alt_peer"], kind="peer",
                                 median=float(info["alt_peer_median_s"]),
                                 nbytes=float(info.get("alt_peer_bytes") or 0.0), flops=e.flops, compute=e.compute,
                                 dtype=e.dtype, op=e.op, shape=e.shape, model=e.model, alt_of=e.alt_of))
    timing: dict = {}  # how GPU entries were timed (benchmarks/conftest.py: Bench._cuda_timed) -> count
    for b in data.get("benchmarks", []):
        how = (b.get("extra_info") or {}).get("timing")
        if how:
            how = "eager (not capturable)" if how.startswith("eager (not capturable") else how
            timing[how] = timing.get(how, 0) + 1
    meta = {
        "timing": timing,
        "limits": data.get("llmkern_limits") or {},
        "machine": data.get("machine_info") or {},
        "datetime": data.get("datetime", ""),
    }
    return entries, meta


def groups_of(entries: list[Entry]) -> dict[str, list[Entry]]:
    """Entries by group (groups in name order), each group fastest first."""
    out: dict[str, list[Entry]] = {}
    for e in entries:
        out.setdefault(e.group, []).append(e)
    return {g: sorted(out[g], key=lambda e: e.median) for g in sorted(out)}


def best_peer(group: list[Entry]) -> Entry | None:
    peers = [e for e in group if e.kind == "peer"]
    return min(peers, key=lambda e: e.median) if peers else None


# Opt-in routes timed beside their default: an entry named <default entry>.<suffix> in the same group. The switch
# that makes the route the default (or, for no_splitk, turns the default off).
ROUTES = {
    "mma": "LLMKERN_CUDA_DECODE_MMA=1 (tensor-core decode attention)",
    "pipelined": "LLMKERN_CUDA_DECODE_PIPELINE=1 (cp.async-pipelined decode loop)",
    "sm90": "the sm_90a kernel (attention: LLMKERN_CUDA_ATTN_WGMMA=1, W8A8: LLMKERN_CUDA_INT8_WGMMA=1; int4: on already)",
    "sm90o": "LLMKERN_CUDA_ATTN_WGMMA=1 + LLMKERN_CUDA_ATTN_OVERLAP=1",
    "dequant_cublas": "LLMKERN_CUDA_PREFILL_CUBLAS=1 (dequantize, then cuBLAS)",
    "no_splitk": "LLMKERN_CUDA_GEMM_SPLITK=0 (split-K off: > 1x here means split-K loses)",
    "fp32dot": "llmkern.ops.decode_attention.CPU_I16_DOT = False (int8 cache, 16-bit q: fp32 FMAs, not int16 dot "
               "products; > 1x here means the int16 path loses)",
    "graph": "generate(cuda_graph=True) (the decode step as one CUDA graph)",
}


def route_pairs(groups: dict[str, list[Entry]]) -> dict[tuple[str, str], list[tuple[str, Entry, Entry]]]:
    """(suffix, op) -> [(group, default entry, route entry)] for every ROUTES entry timed beside its default."""
    out: dict[tuple[str, str], list] = {}
    for g, es in groups.items():
        by_impl = {e.impl: e for e in es if e.kind == "llmkern"}
        for impl, e in by_impl.items():
            base, _, suffix = impl.rpartition(".")
            if suffix in ROUTES and base in by_impl:
                out.setdefault((suffix, e.op), []).append((g, by_impl[base], e))
    return out


def routes_markdown(groups: dict[str, list[Entry]]) -> list[str]:
    """The opt-in routes against their defaults, measured in the same run: one line per route (over its groups:
    geometric mean, min and max of default time / route time, and in how many groups the route was faster), for
    deciding which to turn on. Nothing when the run timed none."""
    pairs = route_pairs(groups)
    if not pairs:
        return []
    lines = ["## Opt-in routes against their defaults (same run)", "",
             "Speedup = default median / route median (> 1: the route is faster).", "",
             "| route | op | switch | groups | geo-mean | min | max | faster in |", "|---|---|---|---|---|---|---|---|"]
    order = {s: i for i, s in enumerate(ROUTES)}
    for (suffix, op), ps in sorted(pairs.items(), key=lambda kv: (order[kv[0][0]], kv[0][1])):
        r = [b.median / e.median for _, b, e in ps]
        geo = math.exp(sum(math.log(v) for v in r) / len(r))
        lines.append(_row([f".{suffix}", op, ROUTES[suffix], str(len(r)), _x(geo), _x(min(r)), _x(max(r)),
                           f"{sum(v > 1 for v in r)} of {len(r)}"]))
    lines.append("")
    return lines


def fractions(e: Entry, limits: dict, read_gbs: float | None = None) -> tuple[float | None, float | None]:
    """(fraction of the read bandwidth, fraction of the matmul rate of e's compute dtype). read_gbs: the group's own
    (targets.group_read_gbs); default: the run's probe."""
    bw = read_gbs or limits.get("read_gbs")
    peak = (limits.get("mm_gflops") or {}).get(e.compute)
    fb = e.gbs / bw if e.gbs is not None and bw else None
    fm = e.gflops / peak if e.gflops is not None and peak else None
    return fb, fm


def fmt_time(s: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _num(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}g}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def _row(cells: list[str]) -> str:
    """One markdown table row; a '|' inside a cell would split it."""
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def limits_line(meta: dict) -> str:
    lim = meta["limits"]
    info = (meta["machine"] or {}).get("llmkern", {})
    if not lim:
        return "Machine limits: not measured in this run (fractions omitted)."
    mm = ", ".join(f"{k} {v:.4g}" for k, v in (lim.get("mm_gflops") or {}).items())
    return (f"Machine limits measured in this run ({lim.get('device', '?')}, {lim.get('threads', '?')} threads"
            f"{', ISA ' + str(info['cpu_isa']) if info.get('cpu_isa') else ''}"
            f"{'; ' + str(info['cpu_host']) if info.get('cpu_host') else ''}): "
            f"read {lim.get('read_gbs', float('nan')):.4g} GB/s, copy {lim.get('copy_gbs', float('nan')):.4g} GB/s; "
            f"matmul GFLOP/s: {mm}. \"% BW\" of a group with `{targets.READ_ENTRY}` entries (kind \"limit\": plain reads "
            f"of as many bytes, first and last in the group) is of the best of those and this probe.")


def markdown(entries: list[Entry], meta: dict) -> str:
    """The whole report: header, one summary table (best llmkern entry vs best peer), a table per group."""
    groups = groups_of(entries)
    lines = [f"# llmkern benchmarks {meta.get('datetime', '')}".rstrip(), "", limits_line(meta), ""]
    if meta.get("timing"):
        lines[-1:-1] = ["", "GPU timing (entries): " + ", ".join(f"{k} {v}" for k, v in sorted(meta["timing"].items()))
                        + " (graph: each call replayed from a CUDA graph, rounds of >= 1 ms, one synchronize per round)."]
    lines += ["## Summary: best llmkern entry vs best peer", "",
              "| group | best llmkern | median | best peer | median | speedup |", "|---|---|---|---|---|---|"]
    for g, es in groups.items():
        ours = [e for e in es if e.kind == "llmkern"]
        peer = best_peer(es)
        if not ours and peer is None:
            continue
        o = ours[0] if ours else None
        speedup = _x(peer.median / o.median) if o and peer else "-"
        if o is not None and o.alt_ratio is not None:  # (timed in turn: the per-round ratio, as the group's table)
            speedup = f"{_x(o.alt_ratio)} (in turn)"
        lines.append(_row([
            g, o.label if o else "-", fmt_time(o.median) if o else "-", peer.label if peer else "-",
            fmt_time(peer.median) if peer else "-", speedup]))
    lines.append("")
    lines += targets.cpu_markdown(groups, meta["limits"])  # (CPU runs)
    lines += targets.markdown(groups, meta["limits"])  # (GPU runs; nothing for a CPU run)
    lines += routes_markdown(groups)
    for g, es in groups.items():
        peer = best_peer(es)
        ours = [e for e in es if e.kind == "llmkern"]
        # bench_op_overhead: the baseline is the direct call, the difference is the dispatch cost per call
        overhead = peer is not None and all(e.op == "op_overhead" for e in es)
        head = ["entry", "kind", "median", "vs best peer"] + (["overhead"] if overhead else []) + \
               [f"vs {o.impl}" for o in ours] + ["GB/s", "GFLOP/s", "% BW", "% MM"]
        lines += [f"### {g}", ""]
        lines += [f"Timed in turn, round by round: the median over rounds of {peer.impl}'s time / {e.impl}'s is "
                  f"{_x(e.alt_ratio)}.\n" for e in ours if e.alt_ratio is not None and peer is not None]
        lines += [_row(head), "|" + "---|" * len(head)]
        # (an in-turn pair's group has no reads of its own: those of the group it comes from)
        read_gbs, _ = targets.group_read_gbs(es + groups.get(es[0].alt_of, []), meta["limits"])
        for e in es:
            fb, fm = fractions(e, meta["limits"], read_gbs)
            row = [e.label, e.kind, fmt_time(e.median), _x(peer.median / e.median) if peer else "-"]
            if overhead:
                d = e.median - peer.median
                row.append(("-" if d < 0 else "+") + fmt_time(abs(d)) if d else "0")
            row += [_x(o.median / e.median) for o in ours]
            row += [_num(e.gbs), _num(e.gflops), _pct(fb), _pct(fm)]
            lines.append(_row(row))
        lines.append("")
    return "\n".join(lines)


def plot(entries: list[Entry], meta: dict, png: str) -> None:
    """One PNG, up to four panels: the issues' targets the run measured (measured / target, 1 = just met), speedup
    bars (llmkern entries vs the group's best peer), a roofline of every entry that does arithmetic, and % of read
    bandwidth for work without arithmetic (copies)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = groups_of(entries)
    bars = []  # (label, speedup vs best peer, kind)
    for g, es in groups.items():
        peer = best_peer(es)
        if peer is None:
            continue
        shown = [e for e in es if e.kind == "llmkern"] or [e for e in es if e.kind == "peer"]  # (none ran: the peers)
        bars += [(f"{g} :: {e.impl}", e.alt_ratio if e.alt_ratio is not None else peer.median / e.median, e.kind)
                 for e in shown]
    lim = meta["limits"]
    bw, peaks = lim.get("read_gbs"), lim.get("mm_gflops") or {}
    pts = [e for e in entries if e.flops and e.nbytes and not e.alt_of]  # (in-turn pairs: timed in their groups too)
    mem_only = sorted([e for e in entries if not e.flops and e.nbytes and e.kind != "limit"],
                      key=lambda e: (e.group, e.median))
    if not bw:
        mem_only = []
    goals = targets.cpu_rows(groups, lim) + targets.rows(groups, lim)
    panels = [(name, h) for name, h, on in (
        ("targets", max(3.0, 0.2 * len(goals) + 1.5), bool(goals)),
        ("speedup", max(3.0, 0.2 * len(bars) + 1.5), bool(bars)),
        ("roofline", 6.0, bool(pts)),
        ("memory", max(3.0, 0.2 * len(mem_only) + 1.5), bool(mem_only))) if on]
    if not panels:
        panels = [("speedup", 3.0)]
    heights = [min(h, 60.0) for _, h in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (name, _) in zip(axes[:, 0], panels):
        if name == "targets":
            ys = list(range(len(goals)))
            ax.barh(ys, [g[4] / g[5] for g in goals], color=["tab:green" if g[4] >= g[5] else "tab:red" for g in goals])
            ax.set_yticks(ys, [f"issue {g[0]}: {g[1]} :: {g[2]} ({g[3]})" for g in goals], fontsize=6)
            ax.set_ylim(len(goals) - 0.5, -0.5)
            ax.axvline(1.0, color="k", lw=0.8)
            ax.set_xscale("log")
            ax.set_xlabel("measured / target (>= 1: met)")
            ax.set_title("the issues' performance targets measured in this run (green: met, red: not met)")
        elif name == "speedup":
            _bars(ax, [b[0] for b in bars], [b[1] for b in bars], [b[2] for b in bars])
            ax.axvline(1.0, color="k", lw=0.8)
            if bars:
                ax.set_xscale("log")
            ax.set_xlabel("speedup vs the best peer in the group (median / median; > 1 is faster)")
            ax.set_title("llmkern vs best peer (blue: llmkern; gray: peers, shown when no llmkern entry ran)")
        elif name == "roofline":
            _roofline(ax, pts, bw, peaks, plt)
        else:
            _bars(ax, [f"{e.group} :: {e.impl}" for e in mem_only], [100 * e.gbs / bw for e in mem_only],
                  [e.kind for e in mem_only])
            ax.axvline(100.0, color="k", lw=0.8)
            ax.set_xlabel(f"% of the read bandwidth measured in this run ({bw:.1f} GB/s)")
            ax.set_title("work without arithmetic (copies, norms): fraction of the memory roof")
    fig.tight_layout()
    fig.savefig(png, dpi=110, bbox_inches="tight")  # "tight": the long y labels stay inside the image
    plt.close(fig)


def _bars(ax, labels, values, kinds) -> None:
    ys = list(range(len(labels)))
    ax.barh(ys, values, color=["tab:blue" if k == "llmkern" else "tab:gray" for k in kinds])
    ax.set_yticks(ys, labels, fontsize=6)
    ax.set_ylim(len(labels) - 0.5, -0.5)  # first entry on top


def _roofline(ax, pts, bw, peaks, plt) -> None:
    """GFLOP/s against flops per byte, log-log, under the roofs min(peak, intensity x bandwidth)."""
    ai = [e.flops / e.nbytes for e in pts]
    lo, hi = min(ai) / 2, max(ai) * 2
    if bw:
        xs = [lo * (hi / lo) ** (i / 100) for i in range(101)]
        used = {e.compute for e in pts}
        for name, peak in peaks.items():
            if name not in used:
                continue
            ax.plot(xs, [min(peak, x * bw) for x in xs], lw=1, label=f"roof {name}: {peak:.0f} GFLOP/s, {bw:.0f} GB/s")
    ops = sorted({e.op for e in pts})
    for i, op in enumerate(ops):
        color = plt.cm.tab10(i % 10)
        for ours, marker in ((True, "o"), (False, "s")):
            sel = [(a, e.gflops) for a, e in zip(ai, pts) if e.op == op and (e.kind == "llmkern") == ours]
            if sel:
                ax.scatter([p[0] for p in sel], [p[1] for p in sel], marker=marker, s=18, edgecolors=color,
                           facecolors=color if ours else "none", label=f"{op} ({'llmkern' if ours else 'peers'})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.legend(fontsize=6, loc="lower right")
    ax.set_xlabel("arithmetic intensity (flops per byte moved)")
    ax.set_ylabel("GFLOP/s achieved")
    ax.set_title("roofline of this run's measured limits: height below the roof = fraction not reached")


def write_compact(saved: str, path: str) -> None:
    """Copy of a saved run with each benchmark's raw `stats.data` dropped (the summary stats stay)."""
    with open(saved) as f:
        run = json.load(f)
    for b in run.get("benchmarks", []):
        (b.get("stats") or {}).pop("data", None)
    with open(path, "w") as f:
        json.dump(run, f, indent=1)
    print(f"wrote {path}", file=sys.stderr)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("saved", help="JSON from --benchmark-json or --benchmark-save")
    ap.add_argument("--out", default=None, help="output folder (default: the JSON's folder)")
    ap.add_argument("--no-plot", action="store_true", help="write the table only")
    ap.add_argument("--compact", metavar="PATH", default=None,
                    help="also write the run without its raw per-round timings (pytest-benchmark keeps every "
                         "round: hundreds of MB) to PATH, small enough to commit under benchmarks/results/")
    args = ap.parse_args(argv)
    if args.compact:
        write_compact(args.saved, args.compact)
    entries, meta = load(args.saved)
    if not entries:
        print(f"{args.saved}: no benchmark with timings (was it run with --benchmark-disable?)", file=sys.stderr)
        return 1
    out = args.out or os.path.dirname(os.path.abspath(args.saved))
    os.makedirs(out, exist_ok=True)
    stem = os.path.splitext(os.path.basename(args.saved))[0]
    text = markdown(entries, meta)
    md = os.path.join(out, f"{stem}_report.md")
    with open(md, "w") as f:
        f.write(text + "\n")
    try:
        print(text)
    except BrokenPipeError:  # `report.py ... | head`
        sys.stderr.close()
        return 0
    print(f"wrote {md}", file=sys.stderr)
    if not args.no_plot:
        png = os.path.join(out, f"{stem}_report.png")
        try:
            plot(entries, meta, png)
        except ImportError as e:  # e.g. a GPU machine without matplotlib: the table is still written
            print(f"no plot ({e}); the table is in {md}", file=sys.stderr)
            return 0
        print(f"wrote {png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
