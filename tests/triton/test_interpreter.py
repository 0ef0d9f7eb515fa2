"""Without a GPU: run the Triton kernel tests (test_k_*.py) on the CPU under TRITON_INTERPRET=1.

The interpreter must be switched on before triton is imported, and must not leak into the rest of the
suite, so the kernel tests run in a child pytest whose environment alone sets it. On a GPU machine the
kernel tests run directly (through the ops with backend="triton") and this test skips.
"""
import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton not installed")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the kernel tests run on it directly")
def test_kernels_under_interpreter():
    files = sorted(glob.glob(str(HERE / "test_k_*.py")))
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore", *files],
                       env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    tail = r.stdout[-6000:] + r.stderr[-2000:]
    assert r.returncode == 0, tail
    assert " passed" in r.stdout and " skipped" not in r.stdout.splitlines()[-1], tail
