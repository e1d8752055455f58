# Sourced by demo.sh and test.sh: create or update the project's virtual environment, idempotently.
# shellcheck shell=bash

VENV="${VLSERVE_VENV:-.venv}"
PY="$VENV/bin/python"

_torch_spec() {
    # The torch + torchvision pair known to work here (FACTS.md); override with VLSERVE_TORCH_SPEC.
    if [ -n "${VLSERVE_TORCH_SPEC:-}" ]; then
        echo "$VLSERVE_TORCH_SPEC"
    elif [ "$(uname -m)" = "aarch64" ]; then
        echo "torch==2.9.1 torchvision==0.24.1"
    else
        echo "torch==2.14.1 torchvision==0.29.1"
    fi
}

_check_disk() {
    # Fail early and say why when the disk cannot take the install (x86_64 torch is ~5.5 GB).
    local free_gb
    free_gb="$(df -Pk "$1" | awk 'NR == 2 { print int($4 / 1048576) }')"
    if [ "$free_gb" -lt "$2" ]; then
        echo "[vlserve] only ${free_gb} GB free under $1; installing torch needs about $2 GB" >&2
        return 1
    fi
}

ensure_venv() {
    if [ ! -x "$PY" ]; then
        echo "[vlserve] creating $VENV"
        "${PYTHON:-python3}" -m venv "$VENV"
    fi
    local want have
    want="$(cat pyproject.toml scripts/_env.sh | sha256sum | cut -d' ' -f1)"
    have="$(cat "$VENV/.vlserve-stamp" 2>/dev/null || true)"
    if [ "$want" != "$have" ]; then
        if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
            _check_disk "$VENV" 7
            echo "[vlserve] installing $(_torch_spec)"
            # shellcheck disable=SC2046
            "$PY" -m pip install -q $(_torch_spec)
        fi
        echo "[vlserve] installing vlserve[server,test,plot] (editable)"
        "$PY" -m pip install -q -e ".[server,test,plot]"
        echo "$want" >"$VENV/.vlserve-stamp"
    fi
}

# transformers 4.57.1 (the Ascend container's pin) beside the newest one, for the compatibility
# smoke: a --target folder put first on PYTHONPATH, sharing torch with the main venv.
ensure_tf457() {
    local dir=.venv-tf457
    if [ ! -f "$dir/.stamp" ]; then
        echo "[vlserve] installing transformers 4.57.1 into $dir"
        rm -rf "$dir"
        "$PY" -m pip install -q --no-deps -t "$dir" transformers==4.57.1 \
            'huggingface_hub>=0.34,<1.0' 'tokenizers>=0.22,<=0.23.0'
        touch "$dir/.stamp"
    fi
}
