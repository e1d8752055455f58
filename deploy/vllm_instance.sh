#!/usr/bin/env bash
# One vLLM server per device under `vlserve launch`, which supervises it and puts nginx in front:
#   vlserve launch --model /models/model --serve-command deploy/vllm_instance.sh -- --max-model-len 16384
# launch pins the device (ASCEND_RT_VISIBLE_DEVICES / CUDA_VISIBLE_DEVICES) and passes
# --model --host --port --device; vLLM finds the platform itself, so --device is dropped.
set -euo pipefail

model=""
rest=()
while (($#)); do
    case "$1" in
        --model) model=$2; shift ;;
        --device) shift ;;
        *) rest+=("$1") ;;
    esac
    shift
done
if [[ -z "${model}" ]]; then
    echo "vllm_instance.sh: --model is required" >&2
    exit 2
fi
exec "${VLLM:-vllm}" serve "${model}" "${rest[@]}"
