#!/usr/bin/env bash
# The quick-start demo: a server on a fresh SQLite file, the quick start against it, then stop.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/uv.sh sync --locked --quiet
workdir=$(mktemp -d)
port=${ERGON_DEMO_PORT:-50051}
scripts/uv.sh run ergon-server --listen "127.0.0.1:$port" --db "sqlite:///$workdir/ergon.db" \
  >"$workdir/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$workdir"' EXIT
for _ in $(seq 100); do
  grep -q "ready on" "$workdir/server.log" && break
  kill -0 $server 2>/dev/null || { cat "$workdir/server.log"; exit 1; }
  sleep 0.1
done
scripts/uv.sh run python examples/quickstart.py --address "127.0.0.1:$port"
