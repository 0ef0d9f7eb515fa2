#!/usr/bin/env bash
# The README's fresh-machine test command (what .ci/run runs): set up (scripts/setup.sh), then run
# the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${LLMKERN_VENV:-.venv}
"$VENV/bin/python" -m pytest -q "$@"
