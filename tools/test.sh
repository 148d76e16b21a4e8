#!/usr/bin/env bash
# README command 2: set up .venv with the test extra (idempotent) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/setup_env.sh test
# Long end-to-end tests are marked slow and left to `tools/test.sh -m slow` (CI has 30 minutes);
# the 30 slowest are listed at the end, to keep it so.
exec .venv/bin/python -m pytest -q -m "not slow" --durations=30 "$@"
