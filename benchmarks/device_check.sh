#!/usr/bin/env bash
# The accelerator check in one command, for a machine with one NVIDIA GPU and no network.
#
#   benchmarks/device_check.sh --prepare DIR [--python-version 3.12]
#       on a networked machine: scripts/wheelhouse.sh for the GPU machine (manylinux x86-64):
#       the whole closure of vlserve[server] at the lock's versions, less what that machine has
#       (benchmarks/h200_host.txt: torch, triton, transformers), checked complete offline. The
#       device tool carries 64 MiB a call, the working tree included, so the wheels are split
#       into DIR/part-1, DIR/part-2, ... of at most 40 MiB: carry one part a call, the first
#       with --install-only (what a call installs stays in .device-deps on a warm machine).
#   benchmarks/device_check.sh [--wheels DIR] [--install-only] [--out FILE] [--dry-run]
#       on the GPU machine: install every wheel under DIR (into .device-deps, never online; none
#       already there), then, in about 7 minutes, each step within its own time budget:
#         1. exactness on CUDA in fp32 (greedy tokens == model.generate), with the decode
#            graphs (the default there) and with --enforce-eager,
#         2. benchmarks/decode_step.py: one 8B decode step at batch 1 and 64 by forward (HF /
#            ours), attention (gather / paged kernel) and graph, against the HBM floor, and
#            torch.profiler's top 15 operations of a step at batch 1 and 64; then
#            benchmarks/sampling_step.py: the sampler at 32 and 256 rows per filter mix,
#         3. benchmarks/gpu_realsize.py: the in-process engine at the 8B dimensions, 1 and 64
#            users (448x448 image + 64 tokens each),
#         4. the tiny model served in bf16 under `vlserve bench` at concurrency 1, 8 and 32,
#            and at 1 with --enforce-eager,
#         5. benchmarks/prefix_cache.py at the 8B dimensions: multi-turn TTFT with and without
#            the prefix and encoder caches,
#       rewriting one JSON file (--out, default device_check.json) after every step, so a run
#       cut short keeps what it measured (benchmarks/_device_summary.py).
#       --dry-run: the same steps on the CPU, shrunk, so CI checks the script without a GPU
#       (tests/integration/test_device_check.py).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=""
OUT="device_check.json"
DRY=0
PREPARE=""
PYVER="3.12"
INSTALL_ONLY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --prepare) PREPARE="$2"; shift 2 ;;
        --python-version) PYVER="$2"; shift 2 ;;
        --wheels) WHEELS="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --dry-run) DRY=1; shift ;;
        --install-only) INSTALL_ONLY=1; shift ;;
        -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
PY="${PYTHON:-python3}"
if [ -n "$PREPARE" ]; then
    scripts/wheelhouse.sh --python "$PYVER" --platform manylinux_2_28_x86_64 \
        --have-file benchmarks/h200_host.txt --out "$PREPARE"
    "$PY" scripts/lockfile.py split "$PREPARE" --max-mib 40
    exit 0
fi

WORK="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
DEPS="$PWD/.device-deps"
if [ -n "$WHEELS" ]; then
    # every wheel under the folder (one part of the wheelhouse, or all), only from it (the
    # machine has no network), none twice; vlserve itself runs from src/
    mapfile -t wheels < <(find "$WHEELS" -name '*.whl' ! -name 'vlserve-*' | sort)
    todo=()
    for w in "${wheels[@]}"; do
        dist=$(basename "$w" | cut -d- -f1)
        compgen -G "$DEPS/${dist}-*.dist-info" >/dev/null || todo+=("$w")
    done
    if [ "${#todo[@]}" -gt 0 ]; then
        "$PY" -m pip install --quiet --no-index --no-deps --target "$DEPS" "${todo[@]}"
    fi
    echo "installed ${#todo[@]} of ${#wheels[@]} wheels from $WHEELS into $DEPS"
fi
[ "$INSTALL_ONLY" = 1 ] && exit 0
export PYTHONPATH="$PWD/src:$PWD:$DEPS${PYTHONPATH:+:$PYTHONPATH}"
export VLSERVE_CACHE_DIR="$WORK/cache" TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

if [ "$DRY" = 1 ]; then
    DEVICE=cpu; DTYPE=float32; LEVELS=(1); REQUESTS=4; K=(-k chunked)
    DECODE=(--smoke --batches 1 4 --steps 3 --variants transformers vlserve-gather)
    REALSIZE=(--smoke --batches 1)
    PREFIX=(--shapes tiny --conversations 2 --rounds 1 --concurrency 2 --max-tokens 4)
    SAMPLING=(--rows 4 --repeats 2)
else
    DEVICE=cuda; DTYPE=bfloat16; LEVELS=(1 8 32); REQUESTS=64
    K=(-k "not inner and not interpreter")
    DECODE=(--batches 1 64)
    REALSIZE=(--batches 1 64 --budget-s 70)
    PREFIX=(--shapes 8b --conversations 4 --rounds 1 --concurrency 4 --max-tokens 16)
    SAMPLING=(--rows 32 256 --repeats 20)
    "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device")'
fi
started=$(date +%s)
"$PY" -c 'import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")' | tee "$WORK/env.txt"

summarize() {  # the results file as it stands: a run cut short keeps what it measured
    "$PY" benchmarks/_device_summary.py "$WORK" "$OUT" "$DEVICE" "$DRY" "$(( $(date +%s) - started ))"
}
step() {  # NAME BUDGET_S COMMAND...: run within its own budget, keep its output and exit code
    local name=$1 budget=$2; shift 2
    echo "== $name (at most ${budget} s)"
    local begin; begin=$(date +%s)
    set +e
    timeout "$budget" "$@" 2>&1 | tee "$WORK/$name.txt"
    echo "${PIPESTATUS[0]} $(( $(date +%s) - begin ))" > "$WORK/$name.rc"
    set -e
    summarize >/dev/null || true
}

# 1. greedy tokens == model.generate in fp32, with the decode graphs (CUDA's default) and without
step exactness-graphs 70 env VLSERVE_TEST_DEVICE="$DEVICE" \
    "$PY" -m pytest -q -p no:cacheprovider tests/integration/test_engine_exactness.py "${K[@]}"
step exactness-eager 60 env VLSERVE_TEST_DEVICE="$DEVICE" VLSERVE_TEST_DECODE_GRAPH=none \
    "$PY" -m pytest -q -p no:cacheprovider tests/integration/test_engine_exactness.py "${K[@]}"
# 2. one 8B decode step by forward, attention and graph, against the HBM floor; profiler tables
step decode-step 120 "$PY" benchmarks/decode_step.py --device "$DEVICE" --dtype "$DTYPE" \
    --jsonl "$WORK/decode-step.jsonl" "${DECODE[@]}"
# 2b. the sampler per filter mix over the real vocabulary (Qwen3-VL's defaults: top-k 20, top-p 0.8)
step sampling 20 "$PY" benchmarks/sampling_step.py --device "$DEVICE" "${SAMPLING[@]}"
# 3. the in-process engine at the 8B dimensions, 448x448 image + 64 tokens per request
step realsize 80 "$PY" benchmarks/gpu_realsize.py --device "$DEVICE" --dtype "$DTYPE" "${REALSIZE[@]}"

# 4. the tiny model served, vlserve bench (TPOT: what the host costs per token)
MODEL=$("$PY" -c 'from vlserve.testing import ensure_tiny_model; print(ensure_tiny_model())')
serve_and_bench() {  # $1: label, then extra serve flags
    local label=$1; shift
    local port
    port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    "$PY" -m vlserve serve --model "$MODEL" --served-model-name tiny --host 127.0.0.1 \
        --port "$port" --device "$DEVICE" --dtype "$DTYPE" --log-level warning "$@" \
        > "$WORK/serve-$label.log" 2>&1 &
    local pid=$!
    for _ in $(seq 240); do
        curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
        kill -0 "$pid" 2>/dev/null || { tail -20 "$WORK/serve-$label.log"; return 1; }
        sleep 0.5
    done
    for c in "${LEVELS[@]}"; do
        "$PY" -m vlserve bench --url "http://127.0.0.1:$port" --model tiny --dataset random \
            --random-images 1 --random-image-size 448x448 --random-input-len 16 \
            --max-concurrency "$c" --num-requests "$REQUESTS" --warmup 2 --max-tokens 64 \
            --ignore-eos --temperature 0 --seed "$c" --output "$WORK/bench-$label-c$c.jsonl" \
            --summary "$WORK/bench-$label-c$c.summary.json" --no-plots --no-progress \
            --log-level WARNING
    done
    kill -TERM "$pid"; wait "$pid" || true
}
export -f serve_and_bench
export PY MODEL DEVICE DTYPE WORK REQUESTS
export LEVELS_WORDS="${LEVELS[*]}"
# shellcheck disable=SC2016  # expanded by the inner bash
step served 50 bash -c 'read -ra LEVELS <<< "$LEVELS_WORDS"; serve_and_bench default'
if [ "$DRY" != 1 ]; then
    # shellcheck disable=SC2016
    step served-eager 25 bash -c 'LEVELS=(1); serve_and_bench eager --enforce-eager'
fi

# 5. prefix and encoder caches, multi-turn, at the 8B dimensions
step prefix 60 "$PY" benchmarks/prefix_cache.py --device "$DEVICE" --dtype "$DTYPE" "${PREFIX[@]}"

summarize
