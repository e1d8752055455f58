#!/usr/bin/env bash
# Install (once) everything the tests need and run the whole suite: lint, unit and integration
# tests on the newest transformers, then a smoke on transformers 4.57.1.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/_env.sh
source scripts/_env.sh
ensure_venv
ensure_tf457
if ! command -v nginx >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "[vlserve] installing nginx (for the load-balancer test)"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null
    else
        echo "[vlserve] nginx not found and cannot be installed: its test will be skipped"
    fi
fi
export TOKENIZERS_PARALLELISM=false
echo "[vlserve] ruff"
"$VENV/bin/ruff" check src tests benchmarks
echo "[vlserve] tests (transformers $("$PY" -c 'import transformers; print(transformers.__version__)'))"
"$PY" -m pytest -q -p no:cacheprovider "$@"
echo "[vlserve] smoke on transformers 4.57.1"
PYTHONPATH=.venv-tf457 "$PY" -m pytest -q -p no:cacheprovider \
    tests/integration/test_engine_exactness.py \
    tests/integration/test_prefix_cache.py \
    tests/unit/test_api_special_tokens.py \
    tests/unit/test_video_prompt.py \
    tests/unit/test_guided.py \
    tests/integration/test_tools_scripted.py \
    tests/integration/test_video_api.py \
    tests/integration/test_serve_startup.py \
    tests/integration/test_chat_api.py -k "exactness or pressure or health or images or stream_deltas or logits or hit or processor or tool or mask or never_appear or video or dummy"
