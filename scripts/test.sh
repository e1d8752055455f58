#!/usr/bin/env bash
# Install (once) everything the tests need, from the lock, and run the whole suite: lint, unit
# and integration tests on Python 3.11 or whichever python3 is first; then a smoke on
# transformers 4.57.1, and a smoke on Python 3.12 (PyAV 19 and the newest locked releases).
# Arguments go to the main pytest run only.
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
"$VENV/bin/ruff" check src tests benchmarks scripts
echo "[vlserve] tests ($("$PY" -c 'import sys, transformers, av; print(f"Python {sys.version.split()[0]}, transformers {transformers.__version__}, PyAV {av.__version__}")'))"
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

# Python 3.12 resolves other releases (PyAV 19 needs it): video, prompts, exactness, startup.
if ! PY312="$(find_python312)"; then
    if [ -n "${CI:-}" ]; then
        echo "[vlserve] no Python 3.12 found: CI needs it for the Python 3.12 smoke" >&2
        exit 1
    fi
    echo "[vlserve] no Python 3.12 found: skipping its smoke (set VLSERVE_PYTHON312)"
    exit 0
fi
ensure_venv .venv-py312 "$PY312" server,test
echo "[vlserve] smoke on $(.venv-py312/bin/python -c 'import sys, transformers, av; print(f"Python {sys.version.split()[0]}, transformers {transformers.__version__}, PyAV {av.__version__}")')"
.venv-py312/bin/python -m pytest -q -p no:cacheprovider \
    tests/unit/test_lock.py \
    tests/unit/test_media_video.py \
    tests/unit/test_video_prompt.py \
    tests/unit/test_api_fake_engine.py \
    tests/unit/test_api_special_tokens.py \
    tests/integration/test_video_api.py \
    tests/integration/test_engine_exactness.py \
    tests/integration/test_serve_startup.py
