#!/usr/bin/env bash
# Install what the tests need, check lint and formatting, and run the test suite on 2 workers.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k restore`).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
bash scripts/install.sh
# The system tools the tests run (mount tools, strace, gdb), up front, so that the tests rarely
# need apt themselves. Nothing is done without root or apt-get (those tests then skip with the
# reason, or fail in CI); when apt fails, the tests that need a tool try again and say why.
"$PYTHON" -m tests.apt || echo "installing the test tools failed: continuing with the tests"
"$PYTHON" -m ruff check distckpt tests scripts launch
"$PYTHON" -m ruff format --check distckpt tests scripts launch
# worksteal: a worker that runs out of tests takes some of the other's, so the long
# end-to-end tests do not leave one core idle at the end of the run.
exec "$PYTHON" -m pytest -n 2 --dist worksteal "$@"
