"""One markdown row per profiled kernel from Nsight Compute's CSV pages (scripts/gpu_profile.sh):
`ncu --import R --csv --page details` (one row per (kernel, section metric)) and, optionally, `--page raw` (one
row per kernel, one column per collected metric; the second row holds units), for reading a GPU run's
profiles without the GPU.

Columns: kernel (template arguments cut), grid x block, duration, DRAM and compute (SM) throughput as % of peak,
achieved / theoretical occupancy, registers per thread, warp cycles per issued instruction, and the three
largest warp stall reasons (cycles per issued instruction) from the raw page's stall metrics where present.
Columns whose metric ncu did not report are left empty.

Usage: python scripts/ncu_summary.py DETAILS.csv [RAW.csv]
"""
from __future__ import annotations

import csv
import re
import sys

# (column title, the details page's metric name)
DETAILS = [("time", "Duration"), ("DRAM %", "DRAM Throughput"), ("SM %", "Compute (SM) Throughput"),
           ("occupancy (achieved / theoretical) %", ("Achieved Occupancy", "Theoretical Occupancy")),
           ("regs", "Registers Per Thread"), ("cycles / issue", "Warp Cycles Per Issued Instruction")]
# Stall metrics of the raw page, by ncu version: average cycles a warp spent stalled per issued instruction.
_STALL = re.compile(r"^smsp__average_warps?_(?:latency_)?issue_stalled_([a-z0-9_]+?)(?:_per_issue_active)?\.ratio$")


def _num(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except (AttributeError, ValueError):
        return None


def _short(name: str) -> str:
    """`void ns::kernel<T, 64>(Args)` -> `kernel<...>`."""
    name = re.sub(r"\(.*\)$", "", name.strip())
    name = re.sub(r"^void ", "", name)
    depth, out = 0, []
    for ch in name:  # drop everything inside template brackets
        if ch == "<":
            depth += 1
            if depth == 1:
                out.append("<...>")
        elif ch == ">":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    return "".join(out).split("::")[-1]


def read_details(path: str) -> dict[str, dict]:
    """{kernel ID: {"name", "grid", "block", (metric): (value text, unit)}} in profile order."""
    kernels: dict[str, dict] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            kid = row.get("ID")
            if kid is None or not row.get("Metric Name"):
                continue
            k = kernels.setdefault(kid, {"name": row.get("Kernel Name", ""), "grid": row.get("Grid Size", ""),
                                         "block": row.get("Block Size", "")})
            k[row["Metric Name"]] = (row.get("Metric Value", ""), row.get("Metric Unit", ""))
    return kernels


def read_stalls(path: str) -> dict[str, list[tuple[str, float]]]:
    """{kernel ID: [(stall reason, cycles per issued instruction), ...] largest first}."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if len(rows) < 3:
        return {}
    head = rows[0]
    idcol = head.index("ID") if "ID" in head else 0
    cols = [(i, m.group(1)) for i, h in enumerate(head) if (m := _STALL.match(h))]
    out = {}
    for row in rows[2:]:  # (rows[1]: units)
        vals = [(reason, _num(row[i])) for i, reason in cols if i < len(row)]
        best: dict[str, float] = {}  # (a reason under both metric spellings: once)
        for r, v in vals:
            if v is not None and r not in ("selected", "not_selected"):
                best[r] = max(v, best.get(r, v))
        out[row[idcol]] = sorted(best.items(), key=lambda rv: -rv[1])
    return out


def _cell(k: dict, metric) -> str:
    if isinstance(metric, tuple):
        return " / ".join(_cell(k, m) for m in metric)
    value, unit = k.get(metric, ("", ""))
    if not value:
        return ""
    return f"{value} {unit}".strip() if unit and unit != "%" else value


def summary(details: str, raw: str | None = None) -> str:
    kernels = read_details(details)
    stalls = read_stalls(raw) if raw else {}
    head = ["#", "kernel", "grid x block"] + [t for t, _ in DETAILS] + ["top stalls (cycles / issue)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for kid, k in kernels.items():
        top = ", ".join(f"{r} {v:.2f}" for r, v in stalls.get(kid, [])[:3])
        cells = [kid, _short(k["name"]), f"{k['grid']} x {k['block']}"] + [_cell(k, m) for _, m in DETAILS] + [top]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    sys.stdout.write(summary(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else None))
