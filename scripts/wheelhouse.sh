#!/usr/bin/env bash
# Wheels for a machine without network (an Ascend container, a GPU host): the closure of
# vlserve[server] at the lock's versions, less what the target has, checked complete offline.
#   scripts/wheelhouse.sh --python 3.12 --platform manylinux_2_28_x86_64 --out wheels \
#       [--have torch==2.11.0 ...] [--have-file FILE] [--extras server]
#   (aarch64, e.g. Kunpeng Ascend hosts: --platform manylinux_2_28_aarch64)
# Without --have torch==..., the target is taken to have the lock's torch. On the target:
#   pip install --no-index --find-links wheels 'vlserve[server]'     (into its environment), or
#   pip install --no-index --no-deps --target DIR wheels/*.whl       (beside it, on PYTHONPATH)
# Details: scripts/lockfile.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
exec "$PY" scripts/lockfile.py wheelhouse "$@"
