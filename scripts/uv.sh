#!/usr/bin/env bash
# Run uv, installing it first on a fresh machine (python3 -m pip install uv).
set -euo pipefail
if ! command -v uv >/dev/null 2>&1 && ! python3 -m uv --version >/dev/null 2>&1; then
  echo "uv not found; installing it with: python3 -m pip install uv" >&2
  python3 -m pip install --quiet uv
fi
if command -v uv >/dev/null 2>&1; then
  exec uv "$@"
fi
exec python3 -m uv "$@"
