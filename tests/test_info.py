"""`llmkern.info()` and `llmkern info` list every op with its backends, the CPU ISA, torch, CUDA and GPU."""
import io
import os
import subprocess
import sys

import torch

import llmkern
from llmkern.ops import OPS


def test_info_lists_every_op_with_reference_and_cpu_int8_linear():
    buf = io.StringIO()
    d = llmkern.info(file=buf)
    text = buf.getvalue()
    assert set(d["ops"]) == set(OPS)
    for name, backends in d["ops"].items():
        assert "reference" in backends, name
        assert name in text
    assert "cpu" in d["ops"]["int8_linear"], d["backend_errors"]
    assert d["cpu_isa"] in ("avx512_vnni", "avx2", "scalar")
    assert d["torch"] == torch.__version__
    assert "GPU:" in text and "ISA used:" in text


def test_cli_info_runs():
    env = dict(os.environ)
    res = subprocess.run([sys.executable, "-m", "llmkern", "info"], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert "int8_linear" in res.stdout and "reference" in res.stdout
