# Sourced by demo.sh and test.sh: create or update a virtual environment from the lock,
# idempotently. Every install goes through requirements/lock.txt (scripts/lock.sh makes it), so a
# fresh clone next month gets the versions CI tested.
# shellcheck shell=bash

VENV="${VLSERVE_VENV:-.venv}"
PY="$VENV/bin/python"
LOCK=requirements/lock.txt

_check_disk() {
    # Fail early and say why when the disk cannot take the install (x86_64 torch is ~5.5 GB).
    local free_gb
    free_gb="$(df -Pk "$1" | awk 'NR == 2 { print int($4 / 1048576) }')"
    if [ "$free_gb" -lt "$2" ]; then
        echo "[vlserve] only ${free_gb} GB free under $1; installing torch needs about $2 GB" >&2
        return 1
    fi
}

# ensure_venv [DIR PYTHON EXTRAS]: DIR (default $VENV) made with PYTHON (default $PYTHON or
# python3), holding vlserve (editable) with EXTRAS (default server,test,plot), every package at
# its version in the lock. Reinstalls when pyproject.toml, the lock or this file change.
ensure_venv() {
    local dir=${1:-$VENV} python=${2:-${PYTHON:-python3}} extras=${3:-server,test,plot,otel}
    local py="$dir/bin/python" want have
    if [ ! -x "$py" ]; then
        echo "[vlserve] creating $dir ($("$python" --version))"
        "$python" -m venv "$dir"
    fi
    want="$(cat pyproject.toml "$LOCK" scripts/_env.sh <(echo "$extras") | sha256sum | cut -d' ' -f1)"
    have="$(cat "$dir/.vlserve-stamp" 2>/dev/null || true)"
    if [ "$want" != "$have" ]; then
        "$py" -c "import torch" 2>/dev/null || _check_disk . 7
        echo "[vlserve] installing vlserve[$extras] (editable) into $dir from $LOCK"
        "$py" -m pip install -q -c "$LOCK" -e ".[$extras]"
        echo "$want" >"$dir/.vlserve-stamp"
    fi
}

# transformers 4.57.1 (the Ascend container's pin) beside the newest one, for the compatibility
# smoke: a --target folder put first on PYTHONPATH, sharing torch with the main venv; the
# versions of transformers and of the two packages it pins come from requirements/lock-tf457.txt.
ensure_tf457() {
    local dir=.venv-tf457 lock=requirements/lock-tf457.txt want pins
    want="$(sha256sum "$lock" | cut -d' ' -f1)"
    if [ "$(cat "$dir/.stamp" 2>/dev/null || true)" != "$want" ]; then
        pins=$(grep -E '^(transformers|huggingface-hub|tokenizers)==' "$lock" | cut -d' ' -f1 | tr '\n' ' ')
        echo "[vlserve] installing ${pins}into $dir"
        rm -rf "$dir"
        # shellcheck disable=SC2086  # one word per pin
        "$PY" -m pip install -q --no-deps -t "$dir" $pins
        echo "$want" >"$dir/.stamp"
    fi
}

# A Python 3.12 interpreter, or nothing: VLSERVE_PYTHON312, python3.12 on PATH, or pyenv's (whose
# shim exists on PATH but fails unless 3.12 is the selected version).
find_python312() {
    local candidate
    for candidate in "${VLSERVE_PYTHON312:-}" python3.12 \
        "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/3.12*/bin/python3.12; do
        if [ -n "$candidate" ] && "$candidate" -c \
            'import sys; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}
