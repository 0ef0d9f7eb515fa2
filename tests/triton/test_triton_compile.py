"""Compile every Triton kernel variant for sm_80 and sm_90 (no GPU needed); check shared memory and spills.

Runs scripts/triton_compile_report.py --json in a child process without TRITON_INTERPRET (the compiler
must be the real one): any compile error, or a variant whose metadata.shared exceeds the target's
per-block limit, fails. Registers and spills come from `ptxas -v` on each variant's PTX, specialized as
the JIT specializes a typical launch (variants.specialize). Every variant the dispatcher picks for 16-bit
inputs is listed below and must not spill on either target: a spill costs GPU speed and the GPU runs are
too rare to notice it there. Compiled kernels are cached by Triton (~/.triton/cache), so reruns are quick.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton not installed")

REPO = Path(__file__).resolve().parents[2]

# Dispatcher-picked variants for fp16/bf16 inputs (fp16 compiles the same tiles as bf16): 0 B of spill
# stores and loads on sm_80 and sm_90. A new variant or config must be added here.
NO_SPILL_16BIT = [
    "rms_norm N=4096 residual=False",
    "rms_norm N=4096 residual=True",
    "rms_norm N=16384 residual=False",
    "rms_norm N=16384 residual=True",
    "rotary H=32 D=128 interleaved=False",
    "rotary H=32 D=128 interleaved=True",
    "kv_cache_append D=128 rotary=False int8=False",
    "kv_cache_append D=128 rotary=True int8=False",
    "kv_cache_append D=128 rotary=False int8=True",
    "kv_cache_append D=128 rotary=True int8=True",
    "decode D=128 rows=4 bf16 paged=False int8=False softcap=False split=False",
    "decode D=128 rows=4 bf16 paged=True int8=False softcap=False split=True",
    "decode D=120 rows=4 bf16 paged=True int8=False softcap=False split=True",
    "decode D=128 rows=4 bf16 paged=True int8=True softcap=False split=True",
    "decode D=128 rows=4 bf16 paged=True int8=False softcap=True split=True",
    "decode D=256 rows=8 bf16 paged=True int8=False softcap=False split=True",
    "decode D=128 rows=128 bf16 paged=True int8=False softcap=False split=True",
    "decode D=256 rows=128 bf16 paged=True int8=True softcap=False split=True",
    "decode merge D=128 splits<=64",
    "decode merge D=256 splits<=64",
    "attention D=64 bf16 varlen=False softcap=False",
    "attention D=120 bf16 varlen=False softcap=False",
    "attention D=128 bf16 varlen=False softcap=False",
    "attention D=128 bf16 varlen=True softcap=True",
    "attention D=256 bf16 varlen=False softcap=False",
    "attention D=256 bf16 varlen=True softcap=False",
    "int4_linear M=1 bf16 G=32 split=True",
    "int4_linear M=1 bf16 G=128 split=True",
    "int4_linear M=5 bf16 G=32 split=True",
    "int4_linear M=5 bf16 G=128 split=True",
    "int4_linear M=64 bf16 G=32 split=False",
    "int4_linear M=64 bf16 G=128 split=False",
    "int4_linear M=4096 bf16 G=32 split=False",
    "int4_linear M=4096 bf16 G=128 split=False",
    "int4_linear split-K reduce",
    "int8 quant rows",
    "int8_linear w8a8 M=1 per_group=False",
    "int8_linear w8a8 M=1 per_group=True",
    "int8_linear w8a8 M=64 per_group=False",
    "int8_linear w8a8 M=64 per_group=True",
    "int8_linear w8a8 M=4096 per_group=False",
    "int8_linear w8a8 M=4096 per_group=True",
    "int8_linear w8a16 M=1 bf16 per_group=False",
    "int8_linear w8a16 M=1 bf16 per_group=True",
    "int8_linear w8a16 M=64 bf16 per_group=False",
    "int8_linear w8a16 M=64 bf16 per_group=True",
    "int8_linear w8a16 M=4096 bf16 per_group=False",
    "int8_linear w8a16 M=4096 bf16 per_group=True",
]

# fp32 variants may pick smaller tiles instead; they do not spill today either, so a spill there is a
# regression too (raise a budget here only with a reason in COMPILE_REPORT.md / the notes).
FP32_SPILL_BUDGET = {
    "decode D=128 rows=4 fp32 paged=True int8=False softcap=False split=True": 0,
    "attention D=128 fp32 varlen=False softcap=False": 0,
    # 16 B since session 19: softcap's tanh gained a Taylor branch for small |x| (fp32 precision at large caps);
    # sm_80 only, 64 registers; fp32 prefill attention on a GPU is Triton's alone and rare (the CUDA kernel is 16-bit)
    "attention D=128 fp32 varlen=True softcap=True": 16,
    "attention D=256 fp32 varlen=False softcap=False": 0,
    "int4_linear M=1 fp32 G=32 split=True": 0,
    "int4_linear M=1 fp32 G=128 split=True": 0,
    "int4_linear M=64 fp32 G=32 split=False": 0,
    "int4_linear M=64 fp32 G=128 split=False": 0,
    "int4_linear M=4096 fp32 G=32 split=False": 0,
    "int4_linear M=4096 fp32 G=128 split=False": 0,
    "int8_linear w8a16 M=1 fp32 per_group=False": 0,
    "int8_linear w8a16 M=1 fp32 per_group=True": 0,
    "int8_linear w8a16 M=64 fp32 per_group=False": 0,
    "int8_linear w8a16 M=64 fp32 per_group=True": 0,
    "int8_linear w8a16 M=4096 fp32 per_group=False": 0,
    "int8_linear w8a16 M=4096 fp32 per_group=True": 0,
}


@pytest.fixture(scope="module")
def report_rows(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    out = tmp_path_factory.mktemp("compile") / "rows.json"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "triton_compile_report.py"), "--json", str(out)],
                       env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return json.loads(out.read_text())


def test_every_variant_compiles_for_sm80_and_sm90_within_shared_memory(report_rows):
    caps = [r["cap"] for r in report_rows]
    assert caps.count(80) == caps.count(90) > 0
    over = [(r["cap"], r["name"], r["shared"]) for r in report_rows if r["shared"] > r["limit"]]
    assert not over, over


def test_no_register_spills(report_rows):
    got = {(r["cap"], r["name"]): r for r in report_rows}
    budget = {**{n: 0 for n in NO_SPILL_16BIT}, **FP32_SPILL_BUDGET}
    missing = [(cap, n) for n in budget for cap in (80, 90) if (cap, n) not in got]
    assert not missing, f"listed variants no longer in variants.py: {missing}"
    unlisted = sorted({n for _, n in got} - set(budget))
    assert not unlisted, f"new variants: list them in NO_SPILL_16BIT or FP32_SPILL_BUDGET: {unlisted}"
    spills = [f"sm_{cap} {n}: {got[cap, n]['regs']} regs, spill {got[cap, n]['spill_st']}/{got[cap, n]['spill_ld']} B"
              for n, b in budget.items() for cap in (80, 90)
              if max(got[cap, n]["spill_st"], got[cap, n]["spill_ld"]) > b]
    assert not spills, "register spills (see triton_kernels/COMPILE_REPORT.md):\n" + "\n".join(spills)
