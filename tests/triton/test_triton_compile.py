"""Compile every Triton kernel variant for sm_80 and sm_90 (no GPU needed) and check shared memory.

Runs scripts/triton_compile_report.py --check in a child process without TRITON_INTERPRET (the compiler
must be the real one): any compile error, or a variant whose metadata.shared exceeds the target's
per-block limit, fails. Compiled kernels are cached by Triton (~/.triton/cache), so reruns are quick.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton not installed")

REPO = Path(__file__).resolve().parents[2]


def test_every_variant_compiles_for_sm80_and_sm90_within_shared_memory():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "triton_compile_report.py"), "--check"],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert r.stdout.count("sm_80 ") == r.stdout.count("sm_90 ") > 0
