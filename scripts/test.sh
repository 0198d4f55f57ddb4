#!/usr/bin/env bash
# The whole test suite: environment, lint, format, types, protos, tests. `make test` runs this.
set -euo pipefail
cd "$(dirname "$0")/.."
uv() { scripts/uv.sh "$@"; }

echo "== environment (uv sync --locked)"
uv sync --locked --quiet
echo "== ruff check";         uv run ruff check .
echo "== ruff format --check"; uv run ruff format --check .
echo "== mypy --strict";      uv run mypy
echo "== buf lint";           uv run buf lint
echo "== buf breaking (against the previous commit)"
if git rev-parse -q --verify HEAD~1 >/dev/null 2>&1; then
  uv run buf breaking --against '.git#ref=HEAD~1'
else
  echo "no previous commit to compare with"
fi
echo "== generated stubs";    uv run python scripts/gen_protos.py --check
echo "== pytest";             uv run pytest "$@"
