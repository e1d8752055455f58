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
if ! PY312="$(find_python312)"; then
    if [ -n "${CI:-}" ]; then
        echo "[vlserve] no Python 3.12 found: CI needs it for the Python 3.12 smoke" >&2
        exit 1
    fi
    echo "[vlserve] no Python 3.12 found: its smoke will be skipped (set VLSERVE_PYTHON312)"
    PY312=""
fi

# The whole suite (no arguments): what waits on the network or the disk more than on the CPU
# runs beside it, one after the other (both build vlserve from this tree): the Python 3.12
# install, then the wheelhouse tests (PyPI). Their output is shown after the suite.
BESIDE="$(mktemp -d)"
BESIDE_PID=""
kill_tree() {  # PID: it and everything it started
    local child
    for child in $(pgrep -P "$1" 2>/dev/null); do kill_tree "$child"; done
    kill "$1" 2>/dev/null || true
}
trap '[ -z "$BESIDE_PID" ] || kill_tree "$BESIDE_PID"; rm -rf "$BESIDE"' EXIT
step() {  # NAME COMMAND...: run COMMAND (stopping at its first error), keep its output and code
    set +e
    (set -e; "${@:2}") >"$BESIDE/$1.log" 2>&1
    echo $? >"$BESIDE/$1.rc"
    set -e
}
finish() {  # NAME: wait for it, show its output, fail if it failed
    wait "$BESIDE_PID" 2>/dev/null || true
    echo "[vlserve] $1 (run beside the suite):"
    cat "$BESIDE/$1.log" 2>/dev/null || true
    if [ ! -f "$BESIDE/$1.rc" ]; then
        echo "[vlserve] $1 did not finish" >&2
        return 1
    fi
    return "$(cat "$BESIDE/$1.rc")"
}
WHEELHOUSE=tests/integration/test_wheelhouse.py
FULL=0
if [ $# -eq 0 ]; then
    FULL=1
    (
        if [ -n "$PY312" ]; then step py312-install ensure_venv .venv-py312 "$PY312" server,test; fi
        step wheelhouse "$PY" -m pytest -q -p no:cacheprovider "$WHEELHOUSE"
    ) &
    BESIDE_PID=$!
    set -- tests/unit tests/integration --ignore="$WHEELHOUSE"
fi
echo "[vlserve] ruff"
"$VENV/bin/ruff" check src tests benchmarks scripts
echo "[vlserve] tests ($("$PY" -c 'import sys, transformers, av; print(f"Python {sys.version.split()[0]}, transformers {transformers.__version__}, PyAV {av.__version__}")'))"
"$PY" -m pytest -q -p no:cacheprovider "$@"

# The smokes leave out what their versions do not change: the Triton kernel under its
# interpreter (28 s a run) and the refusal of a missing device.
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
    tests/integration/test_chat_api.py \
    -k "(exactness or pressure or health or images or stream_deltas or logits or hit or processor or tool or mask or never_appear or video or dummy) and not interpreter"

if [ "$FULL" = 1 ]; then finish wheelhouse; fi

# Python 3.12 resolves other releases (PyAV 19 needs it): video, prompts, exactness, startup.
[ -n "$PY312" ] || exit 0
if [ "$FULL" = 1 ]; then
    finish py312-install
else
    ensure_venv .venv-py312 "$PY312" server,test
fi
echo "[vlserve] smoke on $(.venv-py312/bin/python -c 'import sys, transformers, av; print(f"Python {sys.version.split()[0]}, transformers {transformers.__version__}, PyAV {av.__version__}")')"
.venv-py312/bin/python -m pytest -q -p no:cacheprovider \
    tests/unit/test_lock.py \
    tests/unit/test_media_video.py \
    tests/unit/test_video_prompt.py \
    tests/unit/test_api_fake_engine.py \
    tests/unit/test_api_special_tokens.py \
    tests/integration/test_video_api.py \
    tests/integration/test_engine_exactness.py \
    tests/integration/test_serve_startup.py -k "not interpreter and not unusable_device"
