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
#       already there), then, in under 8 minutes,
#         1. the engine exactness test on CUDA in fp32 (greedy tokens == model.generate),
#         2. the tiny model served on CUDA in bf16, driven by `vlserve bench` at concurrency
#            1, 8 and 32, with and without the encoder thread,
#         3. benchmarks/gpu_realsize.py (the real 8B dimensions, random weights),
#         4. benchmarks/prefix_cache.py at the 8B dimensions (--load-format dummy): multi-turn
#            TTFT with and without the prefix and encoder caches,
#       and write every result into one JSON file (--out, default device_check.json).
#       --dry-run: the same steps on the CPU, shrunk (a subset of the exactness test, one server
#       at concurrency 1 with 4 requests, gpu_realsize --smoke, the prefix cache on the tiny
#       model with 2 conversations), so CI checks the script without a GPU
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
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
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
    DEVICE=cpu; DTYPE=float32; LEVELS=(1); REQUESTS=4; K="chunked"; SMOKE=(--smoke --batches 1)
    PREFIX=(--shapes tiny --conversations 2 --rounds 1 --concurrency 2 --max-tokens 4)
else
    DEVICE=cuda; DTYPE=bfloat16; LEVELS=(1 8 32); REQUESTS=64; K=""; SMOKE=()
    PREFIX=(--shapes 8b --conversations 8 --concurrency 4)
    "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device")'
fi
started=$(date +%s)
"$PY" -c 'import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")' | tee "$WORK/env.txt"

echo "== 1. exactness on $DEVICE (fp32)"
set +e
VLSERVE_TEST_DEVICE=$DEVICE timeout 300 "$PY" -m pytest -q -p no:cacheprovider \
    tests/integration/test_engine_exactness.py ${K:+-k "$K"} 2>&1 | tee "$WORK/exactness.txt"
echo "${PIPESTATUS[0]}" > "$WORK/exactness.rc"
set -e

echo "== 2. the tiny model served on $DEVICE ($DTYPE), vlserve bench"
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
serve_and_bench encoder-thread
[ "$DRY" = 1 ] || serve_and_bench no-encoder-thread --no-encoder-thread

echo "== 3. gpu_realsize"
set +e
timeout 420 "$PY" benchmarks/gpu_realsize.py --device "$DEVICE" ${SMOKE[@]+"${SMOKE[@]}"} 2>&1 | tee "$WORK/realsize.txt"
echo "${PIPESTATUS[0]}" > "$WORK/realsize.rc"
set -e

echo "== 4. prefix and encoder caches, multi-turn"
set +e
timeout 240 "$PY" benchmarks/prefix_cache.py --device "$DEVICE" --dtype "$DTYPE" "${PREFIX[@]}" 2>&1 | tee "$WORK/prefix.txt"
echo "${PIPESTATUS[0]}" > "$WORK/prefix.rc"
set -e

"$PY" - "$WORK" "$OUT" "$DEVICE" "$DRY" "$(( $(date +%s) - started ))" <<'EOF'
import json, pathlib, sys
work, out, device, dry, seconds = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
keep = ("request_throughput", "output_token_throughput", "ttft_ms", "tpot_ms", "e2el_ms", "completed", "failed", "duration_s")
bench = {}
for f in sorted(work.glob("bench-*.summary.json")):
    summary = json.loads(f.read_text())
    bench[f.name.removesuffix(".summary.json")] = {k: v for k, v in summary.items() if k.startswith(keep)}
result = {
    "device": device,
    "dry_run": dry == "1",
    "seconds": int(seconds),
    "env": (work / "env.txt").read_text().strip(),
    "exactness": {"exit_code": int((work / "exactness.rc").read_text()),
                  "tail": (work / "exactness.txt").read_text()[-1500:]},
    "bench": bench,
    "gpu_realsize": {"exit_code": int((work / "realsize.rc").read_text()),
                     "output": (work / "realsize.txt").read_text()[-4000:]},
    "prefix_cache": {"exit_code": int((work / "prefix.rc").read_text()),
                     "output": (work / "prefix.txt").read_text()[-3000:]},
}
pathlib.Path(out).write_text(json.dumps(result, indent=1))
codes = [result[k]["exit_code"] for k in ("exactness", "gpu_realsize", "prefix_cache")]
ok = not any(codes) and bench
print(f"results in {out} ({seconds} s): {'OK' if ok else 'FAILED'}")
sys.exit(0 if ok else 1)
EOF
