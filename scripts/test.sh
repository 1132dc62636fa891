#!/usr/bin/env bash
# Install what the tests need, check lint and formatting, and run the test suite on 2 workers.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k restore`).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
bash scripts/install.sh
"$PYTHON" -m ruff check distckpt tests scripts launch
"$PYTHON" -m ruff format --check distckpt tests scripts launch
exec "$PYTHON" -m pytest -n 2 "$@"
