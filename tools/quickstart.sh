#!/usr/bin/env bash
# README command 1: set up .venv (idempotent) and run the default job, which
# instruction-tunes the default model on the built-in task suite on CPU and prints a
# per-task results table. Running it again resumes (or, when finished, re-evaluates).
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/setup_env.sh
exec .venv/bin/jit-tune train --config configs/tiny.py --workdir runs/tiny "$@"
