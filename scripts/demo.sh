#!/usr/bin/env bash
# Install (once) and run the whole job end to end on the tiny model: server, openai client, bench.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/_env.sh
source scripts/_env.sh
ensure_venv
exec "$PY" -m vlserve.demo
