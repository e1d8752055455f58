#!/usr/bin/env bash
# Compile the locks that every install of this project goes through (scripts/_env.sh, the
# Dockerfiles, scripts/wheelhouse.sh), with uv, for every supported Python and platform at once:
#   requirements/lock.txt        pyproject.toml's server, test, plot, video and otel extras, with the
#                                torch pins of requirements/pins.in
#   requirements/lock-tf457.txt  the server and otel extras with transformers 4.57.1 (the Ascend image's pin)
#
#   scripts/lock.sh             after editing pyproject.toml: re-resolve, keeping every pin that fits
#   scripts/lock.sh --upgrade   move every pin to the newest release; then ./scripts/test.sh tests
#                               exactly those (commit the locks only when it passes)
set -euo pipefail
cd "$(dirname "$0")/.."
UPGRADE=()
case "${1:-}" in
    --upgrade) UPGRADE=(--upgrade) ;;
    "") ;;
    *) echo "usage: scripts/lock.sh [--upgrade]" >&2; exit 2 ;;
esac
if [ -n "${UV:-}" ]; then :
elif [ -x .venv/bin/uv ]; then UV=.venv/bin/uv
elif command -v uv >/dev/null 2>&1; then UV=uv
else echo "uv not found: run ./scripts/test.sh once (it installs uv into .venv), or pip install uv" >&2; exit 1
fi
compile() {  # $1: output, then inputs and options
    local out=$1; shift
    "$UV" pip compile --quiet --universal --python-version 3.10 --no-strip-markers \
        --custom-compile-command "scripts/lock.sh" ${UPGRADE[@]+"${UPGRADE[@]}"} \
        --output-file "$out" pyproject.toml requirements/pins.in "$@"
}
compile requirements/lock.txt --extra server --extra test --extra plot --extra video --extra otel
compile requirements/lock-tf457.txt --extra server --extra otel requirements/tf457.in
grep -E '^(torch|torchvision|transformers|av|fastapi|xgrammar)==' requirements/lock.txt
