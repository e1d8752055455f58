#!/usr/bin/env bash
# Start vlserve in a container on an Ascend, NVIDIA or CPU host and wait until it is ready.
# With --engine vllm it starts vLLM (vLLM-Ascend on NPUs) instead, with the same checks, so that
# both can be benchmarked side by side behind the same OpenAI API.
#
# Every setting has a flag and an environment variable named VLSERVE_<NAME> (flags win); run
# with --help for the list. Only these prefixed names are read: an unrelated CONTAINER_NAME or
# IMAGE in the environment changes nothing (the prototype's names are reported and ignored).
# Nothing is installed at container start: build the image first (docs/DEPLOY.md). With
# --dry-run, read-only checks (image, device holders, ports) still run, and every docker command
# that would change something is printed instead of run.
#
# The server listens on 0.0.0.0: VLSERVE_API_KEY, when set, is passed into the container by name
# (docker reads its value from this environment; it never appears in a command line or the dry
# run), as VLLM_API_KEY for --engine vllm.
set -euo pipefail

# The prototype's run_server_container.sh read these unprefixed names; set, they are reported.
PROTOTYPE_SET=()
for _name in IMAGE CONTAINER_NAME HOST_PORT SERVER_PORT HOST_MODEL_PATH HOST_TEST_DATA \
    HOST_CODE_DIR CONTAINER_MODEL_PATH CONTAINER_TEST_DATA CONTAINER_CODE_DIR; do
    if [[ -n "${!_name+set}" ]]; then PROTOTYPE_SET+=("${_name}"); fi
done

ENGINE=${VLSERVE_ENGINE:-vlserve}                      # vlserve | vllm
PLATFORM=${VLSERVE_PLATFORM:-auto}                     # npu | cuda | cpu | auto
IMAGE=${VLSERVE_IMAGE:-}                               # repository:tag; default vlserve:<platform>
CONTAINER_NAME=${VLSERVE_CONTAINER_NAME:-vlserve}
HOST_PORT=${VLSERVE_HOST_PORT:-9000}
SERVER_PORT=${VLSERVE_SERVER_PORT:-${HOST_PORT}}
NETWORK=${VLSERVE_NETWORK:-host}                       # host | bridge (bridge publishes HOST_PORT only)
DEVICES=${VLSERVE_DEVICES:-all}                        # all | 0,1,4-7 (host numbering)
MODE=${VLSERVE_MODE:-auto}                             # serve | launch | auto (launch when >1 device)
CPU_INSTANCES=${VLSERVE_CPU_INSTANCES:-1}              # instances in launch mode on CPU
HOST_MODEL_PATH=${VLSERVE_HOST_MODEL_PATH:-/mnt/model_weights}
CONTAINER_MODEL_PATH=${VLSERVE_CONTAINER_MODEL_PATH:-/models/model}
HOST_TEST_DATA=${VLSERVE_HOST_TEST_DATA:-}             # optional, mounted read-only
CONTAINER_TEST_DATA=${VLSERVE_CONTAINER_TEST_DATA:-/data}
HOST_CODE_DIR=${VLSERVE_HOST_CODE_DIR:-}               # optional, mounted read-only
CONTAINER_CODE_DIR=${VLSERVE_CONTAINER_CODE_DIR:-/workspace/app}
SERVED_MODEL_NAME=${VLSERVE_SERVED_MODEL_NAME:-}
VLLM_TP=${VLSERVE_VLLM_TP:-1}                          # vllm: devices per model copy (tensor parallel)
VLLM_MAX_MODEL_LEN=${VLSERVE_VLLM_MAX_MODEL_LEN:-16384}  # vllm: bounds the KV cache it reserves
READY_TIMEOUT_S=${VLSERVE_READY_TIMEOUT_S:-1800}       # an 8B model takes minutes to load
PROGRESS_INTERVAL_S=${VLSERVE_PROGRESS_INTERVAL_S:-15}
POLL_INTERVAL_S=${VLSERVE_POLL_INTERVAL_S:-2}
SHM_SIZE=${VLSERVE_SHM_SIZE:-16g}
RESTART_POLICY=${VLSERVE_RESTART_POLICY:-unless-stopped}  # back after a crash or a host reboot
STOP_TIMEOUT_S=${VLSERVE_STOP_TIMEOUT_S:-120}          # docker stop waits this long for the drain
REPLACE=${VLSERVE_REPLACE:-0}                          # 1: remove an existing container of the same name
IGNORE_BUSY=${VLSERVE_IGNORE_BUSY:-0}                  # 1: start even if the devices are in use
DRY_RUN=${VLSERVE_DRY_RUN:-0}
ASCEND_DRIVER_DIR=${VLSERVE_ASCEND_DRIVER_DIR:-/usr/local/Ascend/driver}
DEV_DIR=${VLSERVE_DEV_DIR:-/dev}
EXTRA_ARGS=()

usage() {
    cat <<'EOF'
Usage: run_server_container.sh [options] [-- extra arguments for vlserve serve/launch]

Every option also reads VLSERVE_<NAME> from the environment, NAME in brackets; flags win.

  --engine E           vlserve | vllm [ENGINE; default vlserve]
  --platform P         npu | cuda | cpu | auto [PLATFORM; default auto]
  --image REPO:TAG     image to run [IMAGE; default vlserve:<platform>, none for vllm];
                       must exist locally
  --name NAME          container name [CONTAINER_NAME; default vlserve]
  --port N             port clients use on the host [HOST_PORT; default 9000]
  --server-port N      port inside the container [SERVER_PORT; default = --port]
  --network host|bridge  [NETWORK; default host]
  --devices LIST       all | 0,1,4-7 [DEVICES; default all]
  --mode M             serve | launch | auto: one server, or one per device behind nginx
                       [MODE; default auto = launch when more than one device]
  --cpu-instances N    instances in launch mode on CPU [CPU_INSTANCES; default 1]
  --model-path DIR     model weights on the host [HOST_MODEL_PATH; default /mnt/model_weights]
  --container-model-path DIR   [CONTAINER_MODEL_PATH; default /models/model]
  --test-data DIR      host test data, mounted read-only [HOST_TEST_DATA]
  --container-test-data DIR    [CONTAINER_TEST_DATA; default /data]
  --code-dir DIR       host code dir, mounted read-only [HOST_CODE_DIR]
  --container-code-dir DIR     [CONTAINER_CODE_DIR; default /workspace/app]
  --served-model-name NAME     [SERVED_MODEL_NAME]
  --restart POLICY     docker restart policy: unless-stopped | always | on-failure[:N] | no
                       [RESTART_POLICY; default unless-stopped: back after a crash or reboot]
  --stop-timeout S     seconds docker stop gives the drain [STOP_TIMEOUT_S; default 120]
  --shm-size SIZE      /dev/shm of the container [SHM_SIZE; default 16g]
  --ready-timeout S    seconds to wait for /health [READY_TIMEOUT_S; default 1800]
  --progress-interval S  seconds between progress lines [PROGRESS_INTERVAL_S; default 15]
  --poll-interval S    seconds between health checks [POLL_INTERVAL_S; default 2]
  --vllm-tp N          vllm: tensor-parallel size [VLLM_TP; default 1]; the devices
                       are split into data-parallel replicas of N devices each
  --vllm-max-model-len N  [VLLM_MAX_MODEL_LEN; default 16384]
  --ascend-driver-dir DIR  [ASCEND_DRIVER_DIR; default /usr/local/Ascend/driver]
  --dev-dir DIR        where the device nodes are [DEV_DIR; default /dev]
  --replace            remove an existing container with the same name [REPLACE=1]
  --ignore-busy        start even if the devices are held by others [IGNORE_BUSY=1]
  --dry-run            print the docker commands instead of running them [DRY_RUN=1]
  -h, --help           this text

The API key: export VLSERVE_API_KEY (several: comma-separated) and the server requires it as
'Authorization: Bearer KEY'. It is passed to the container by name, never printed. Without it
the server on 0.0.0.0 answers anyone who reaches the port (the script warns).
EOF
}

log() { printf '[INFO] %s\n' "$*"; }
warn() { printf '[WARN] %s\n' "$*" >&2; }
die() { printf '[ERROR] %s\n' "$*" >&2; exit 1; }

# Run a command that changes something; under --dry-run only print it, shell-quoted.
run() {
    if [[ "${DRY_RUN}" == 1 ]]; then
        printf '+'
        printf ' %q' "$@"
        printf '\n'
    else
        "$@"
    fi
}

parse_args() {
    local value
    while (($#)); do
        case "$1" in
            --replace) REPLACE=1 ;;
            --ignore-busy) IGNORE_BUSY=1 ;;
            --dry-run) DRY_RUN=1 ;;
            -h | --help) usage; exit 0 ;;
            --) shift; EXTRA_ARGS=("$@"); break ;;
            --*)
                value=${2-}
                case "$1" in
                    --engine) ENGINE=${value} ;;
                    --platform) PLATFORM=${value} ;;
                    --image) IMAGE=${value} ;;
                    --name) CONTAINER_NAME=${value} ;;
                    --port) HOST_PORT=${value}; SERVER_PORT=${value} ;;
                    --server-port) SERVER_PORT=${value} ;;
                    --network) NETWORK=${value} ;;
                    --devices) DEVICES=${value} ;;
                    --mode) MODE=${value} ;;
                    --cpu-instances) CPU_INSTANCES=${value} ;;
                    --model-path) HOST_MODEL_PATH=${value} ;;
                    --container-model-path) CONTAINER_MODEL_PATH=${value} ;;
                    --test-data) HOST_TEST_DATA=${value} ;;
                    --container-test-data) CONTAINER_TEST_DATA=${value} ;;
                    --code-dir) HOST_CODE_DIR=${value} ;;
                    --container-code-dir) CONTAINER_CODE_DIR=${value} ;;
                    --served-model-name) SERVED_MODEL_NAME=${value} ;;
                    --restart) RESTART_POLICY=${value} ;;
                    --stop-timeout) STOP_TIMEOUT_S=${value} ;;
                    --shm-size) SHM_SIZE=${value} ;;
                    --ready-timeout) READY_TIMEOUT_S=${value} ;;
                    --progress-interval) PROGRESS_INTERVAL_S=${value} ;;
                    --poll-interval) POLL_INTERVAL_S=${value} ;;
                    --vllm-tp) VLLM_TP=${value} ;;
                    --vllm-max-model-len) VLLM_MAX_MODEL_LEN=${value} ;;
                    --ascend-driver-dir) ASCEND_DRIVER_DIR=${value} ;;
                    --dev-dir) DEV_DIR=${value} ;;
                    *) usage >&2; die "unknown option: $1" ;;
                esac
                (($# >= 2)) || die "$1 needs a value"
                shift
                ;;
            *) usage >&2; die "unknown option: $1" ;;
        esac
        shift
    done
    [[ "${ENGINE}" == vlserve || "${ENGINE}" == vllm ]] || die "--engine must be vlserve or vllm"
    [[ "${NETWORK}" == host || "${NETWORK}" == bridge ]] || die "--network must be host or bridge"
    [[ "${MODE}" =~ ^(serve|launch|auto)$ ]] || die "--mode must be serve, launch or auto"
    [[ "${READY_TIMEOUT_S}" =~ ^[0-9]+$ ]] || die "--ready-timeout must be a number of seconds"
    [[ "${STOP_TIMEOUT_S}" =~ ^[0-9]+$ ]] || die "--stop-timeout must be a number of seconds"
    [[ "${RESTART_POLICY}" =~ ^(no|always|unless-stopped|on-failure(:[0-9]+)?)$ ]] ||
        die "--restart must be unless-stopped, always, on-failure[:N] or no"
}

# Said, not silently ignored: the prototype's unprefixed names are no longer read.
report_prototype_names() {
    local name
    for name in "${PROTOTYPE_SET[@]}"; do
        warn "${name} is set in the environment and ignored: set VLSERVE_${name} or use the flag"
    done
    return 0
}

# "0,2,4-6" -> "0 2 4 5 6"
expand_ids() {
    local part parts i out=()
    IFS=',' read -ra parts <<<"$1"
    for part in "${parts[@]}"; do
        if [[ "${part}" =~ ^([0-9]+)-([0-9]+)$ ]]; then
            for ((i = BASH_REMATCH[1]; i <= BASH_REMATCH[2]; i++)); do out+=("${i}"); done
        elif [[ "${part}" =~ ^[0-9]+$ ]]; then
            out+=("${part}")
        else
            die "bad device list: $1 (want all or e.g. 0,1,4-7)"
        fi
    done
    echo "${out[*]}"
}

host_npu_ids() {
    local node ids=()
    for node in "${DEV_DIR}"/davinci[0-9]*; do
        [[ -e "${node}" ]] && ids+=("${node##*davinci}")
    done
    ((${#ids[@]})) || return 0
    printf '%s\n' "${ids[@]}" | sort -n | tr '\n' ' '
}

host_gpu_ids() {
    command -v nvidia-smi >/dev/null || return 0
    nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | tr -d ' ' | tr '\n' ' '
}

resolve_platform() {
    if [[ "${PLATFORM}" == auto ]]; then
        if [[ -n "$(host_npu_ids)" ]]; then PLATFORM=npu
        elif [[ -n "$(host_gpu_ids)" ]]; then PLATFORM=cuda
        else PLATFORM=cpu
        fi
        log "platform: ${PLATFORM} (detected)"
    fi
    [[ "${PLATFORM}" =~ ^(npu|cuda|cpu)$ ]] || die "--platform must be npu, cuda, cpu or auto"
    if [[ "${ENGINE}" == vllm ]]; then
        [[ "${PLATFORM}" != cpu ]] || die "--engine vllm needs npu or cuda devices"
        [[ -n "${IMAGE}" ]] || die "--engine vllm: pass --image, e.g. quay.io/ascend/vllm-ascend:<tag> or vllm/vllm-openai:<tag>"
    fi
    IMAGE=${IMAGE:-vlserve:${PLATFORM}}
}

resolve_devices() {
    DEVICE_IDS=()
    [[ "${PLATFORM}" == cpu ]] && return 0
    local available
    if [[ "${PLATFORM}" == npu ]]; then available=$(host_npu_ids); else available=$(host_gpu_ids); fi
    [[ -n "${available// /}" ]] || die "no ${PLATFORM} devices found on this host"
    if [[ "${DEVICES}" == all ]]; then
        read -ra DEVICE_IDS <<<"${available}"
    else
        local expanded id
        # Assigned first, so that set -e stops here if the list is bad.
        expanded=$(expand_ids "${DEVICES}")
        read -ra DEVICE_IDS <<<"${expanded}"
        for id in "${DEVICE_IDS[@]}"; do
            [[ " ${available} " == *" ${id} "* ]] || die "${PLATFORM} device ${id} not found (host has: ${available})"
        done
    fi
    log "devices: ${PLATFORM} ${DEVICE_IDS[*]}"
}

check_image() {
    local repo=${IMAGE%:*}
    if [[ "${IMAGE##*/}" != *:* ]]; then
        repo=${IMAGE}
        warn "image ${IMAGE} has no tag; there is no implicit :latest here"
    elif docker image inspect "${IMAGE}" >/dev/null 2>&1; then
        return 0
    else
        warn "image ${IMAGE} is not present locally"
    fi
    local tags
    tags=$(docker images --format '{{.Repository}}:{{.Tag}}' "${repo}" 2>/dev/null | grep -v ':<none>$' || true)
    if [[ -n "${tags}" ]]; then
        printf 'Local tags of %s:\n%s\n' "${repo}" "${tags}" >&2
        die "pick one with --image REPO:TAG"
    fi
    die "no local image ${repo}; build it (docs/DEPLOY.md) or docker pull it, then pass --image REPO:TAG"
}

check_existing_container() {
    local status
    status=$(docker ps -a --filter "name=^/${CONTAINER_NAME}\$" --format '{{.Status}}' 2>/dev/null || true)
    [[ -z "${status}" ]] && return 0
    if [[ "${REPLACE}" == 1 ]]; then
        log "removing existing container ${CONTAINER_NAME} (${status})"
        run docker rm -f "${CONTAINER_NAME}"
    else
        die "container ${CONTAINER_NAME} already exists (${status}); use --replace or --name"
    fi
}

# The running container (other than ours) whose processes include host pid $1, if any.
container_of_pid() {
    local name
    for name in $(docker ps --format '{{.Names}}' 2>/dev/null); do
        [[ "${name}" == "${CONTAINER_NAME}" && "${REPLACE}" == 1 ]] && continue
        if docker top "${name}" -eo pid 2>/dev/null | tail -n +2 | tr -d ' ' | grep -qx "$1"; then
            echo "${name}"
            return 0
        fi
    done
}

# Lines "<npu id> <pid> <process name>" from the process table of `npu-smi info`.
npu_processes() {
    command -v npu-smi >/dev/null || return 0
    npu-smi info 2>/dev/null | awk -F'|' '
        /Process id/ { table = 1; next }
        table && NF >= 5 {
            split($2, ids, " "); pid = $3; name = $4
            gsub(/ /, "", pid); gsub(/^ +| +$/, "", name)
            if (ids[1] ~ /^[0-9]+$/ && pid ~ /^[0-9]+$/) print ids[1], pid, name
        }'
}

# Lines "<gpu index> <pid> <process name>" from nvidia-smi.
gpu_processes() {
    command -v nvidia-smi >/dev/null || return 0
    local uuid_to_index
    uuid_to_index=$(nvidia-smi --query-gpu=index,uuid --format=csv,noheader 2>/dev/null || true)
    nvidia-smi --query-compute-apps=gpu_uuid,pid,process_name --format=csv,noheader 2>/dev/null |
        while IFS=', ' read -r uuid pid name; do
            local index
            index=$(awk -F', ' -v u="${uuid}" '$2 == u { print $1 }' <<<"${uuid_to_index}")
            [[ -n "${index}" ]] && echo "${index} ${pid} ${name}"
        done
}

# Containers (other than ours) that were given one of our NPU device nodes.
npu_device_holders() {
    local id name devices
    for name in $(docker ps --format '{{.Names}}' 2>/dev/null); do
        [[ "${name}" == "${CONTAINER_NAME}" && "${REPLACE}" == 1 ]] && continue
        devices=$(docker inspect --format '{{range .HostConfig.Devices}}{{.PathOnHost}} {{end}}' "${name}" 2>/dev/null || true)
        for id in "${DEVICE_IDS[@]}"; do
            [[ " ${devices} " == *"/davinci${id} "* ]] && echo "NPU ${id}: mapped into running container ${name}"
        done
    done
    return 0
}

check_device_holders() {
    [[ "${PLATFORM}" == cpu ]] && return 0
    local findings=() id pid name holder label=GPU processes
    if [[ "${PLATFORM}" == npu ]]; then label=NPU; processes=$(npu_processes); else processes=$(gpu_processes); fi
    while read -r id pid name; do
        [[ -z "${id}" || " ${DEVICE_IDS[*]} " != *" ${id} "* ]] && continue
        holder=$(container_of_pid "${pid}")
        findings+=("${label} ${id}: pid ${pid} (${name}) ${holder:+in container ${holder}}${holder:-on the host}")
    done <<<"${processes}"
    if [[ "${PLATFORM}" == npu ]]; then
        mapfile -t -O "${#findings[@]}" findings < <(npu_device_holders)
    fi
    ((${#findings[@]} == 0)) && return 0
    printf '%s\n' "${findings[@]}" | sort -u >&2
    if [[ "${IGNORE_BUSY}" == 1 ]]; then
        warn "devices are in use; starting anyway (--ignore-busy)"
        return 0
    fi
    die "the devices above are in use; stop the holder (e.g. docker stop NAME), pick others with --devices, or pass --ignore-busy"
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

check_ports() {
    port_in_use "${HOST_PORT}" && die "port ${HOST_PORT} is already in use on this host; choose another with --port"
    return 0
}

device_flags() {
    local id
    case "${PLATFORM}" in
        npu)
            for id in "${DEVICE_IDS[@]}"; do printf '%s\n' "--device=${DEV_DIR}/davinci${id}"; done
            printf '%s\n' "--device=${DEV_DIR}/davinci_manager" "--device=${DEV_DIR}/devmm_svm" "--device=${DEV_DIR}/hisi_hdc"
            printf '%s\n' -v "${ASCEND_DRIVER_DIR}:${ASCEND_DRIVER_DIR}:ro"
            local extra
            for extra in /usr/local/dcmi /usr/local/sbin/npu-smi /usr/local/bin/npu-smi /etc/ascend_install.info; do
                [[ -e "${extra}" ]] && printf '%s\n' -v "${extra}:${extra}:ro"
            done
            ;;
        cuda)
            local joined
            joined=$(IFS=','; echo "${DEVICE_IDS[*]}")
            printf '%s\n' --gpus "\"device=${joined}\""
            ;;
    esac
    return 0
}

# Arguments of the vlserve command inside the container.
vlserve_args() {
    local count=${#DEVICE_IDS[@]} mode=${MODE} extra=()
    [[ "${PLATFORM}" == cpu ]] && count=${CPU_INSTANCES}
    if [[ "${mode}" == auto ]]; then
        if ((count > 1)); then mode=launch; else mode=serve; fi
    fi
    [[ -n "${SERVED_MODEL_NAME}" ]] && extra+=(--served-model-name "${SERVED_MODEL_NAME}")
    [[ -n "${HOST_TEST_DATA}" ]] && extra+=(--allowed-local-media-path "${CONTAINER_TEST_DATA}")
    extra+=("${EXTRA_ARGS[@]}")
    if [[ "${mode}" == serve ]]; then
        printf '%s\n' serve --model "${CONTAINER_MODEL_PATH}" --host 0.0.0.0 --port "${SERVER_PORT}" --device "${PLATFORM}" "${extra[@]}"
    else
        # Inside the container the runtime numbers the devices it was given from 0.
        printf '%s\n' launch --model "${CONTAINER_MODEL_PATH}" --device "${PLATFORM}" --num-instances "${count}" \
            --host 0.0.0.0 --port "${SERVER_PORT}" --state-dir /tmp/vlserve-launch
        ((${#extra[@]})) && printf '%s\n' -- "${extra[@]}"
    fi
    return 0
}

# vLLM serves every device it was given: tensor parallel inside a replica, data parallel across.
vllm_args() {
    local count=${#DEVICE_IDS[@]} extra=()
    [[ -n "${SERVED_MODEL_NAME}" ]] && extra+=(--served-model-name "${SERVED_MODEL_NAME}")
    [[ -n "${HOST_TEST_DATA}" ]] && extra+=(--allowed-local-media-path "${CONTAINER_TEST_DATA}")
    printf '%s\n' vllm serve "${CONTAINER_MODEL_PATH}" --host 0.0.0.0 --port "${SERVER_PORT}" \
        --tensor-parallel-size "${VLLM_TP}" --data-parallel-size "$((count / VLLM_TP))" \
        --max-model-len "${VLLM_MAX_MODEL_LEN}" "${extra[@]}" "${EXTRA_ARGS[@]}"
}

# vLLM images read the CANN environment from login profiles; load it the same way as ours.
# shellcheck disable=SC2016  # expanded by the shell inside the container
readonly VLLM_ENTRY='for f in /usr/local/Ascend/ascend-toolkit/set_env.sh /usr/local/Ascend/nnal/atb/set_env.sh; do if [ -f "$f" ]; then . "$f"; fi; done; exec "$@"'

start_container() {
    [[ -d "${HOST_MODEL_PATH}" || "${DRY_RUN}" == 1 ]] || die "model path ${HOST_MODEL_PATH} does not exist"
    if [[ "${PLATFORM}" == npu && "${DRY_RUN}" != 1 && ! -d "${ASCEND_DRIVER_DIR}" ]]; then
        die "Ascend driver not found at ${ASCEND_DRIVER_DIR} (set ASCEND_DRIVER_DIR)"
    fi
    local args=(docker run -d --name "${CONTAINER_NAME}" --restart "${RESTART_POLICY}"
        --stop-timeout "${STOP_TIMEOUT_S}" --shm-size "${SHM_SIZE}")
    if [[ "${NETWORK}" == host ]]; then args+=(--network host); else args+=(-p "${HOST_PORT}:${SERVER_PORT}"); fi
    mapfile -t -O "${#args[@]}" args < <(device_flags)
    args+=(-v "${HOST_MODEL_PATH}:${CONTAINER_MODEL_PATH}:ro")
    [[ -n "${HOST_TEST_DATA}" ]] && args+=(-v "${HOST_TEST_DATA}:${CONTAINER_TEST_DATA}:ro")
    [[ -n "${HOST_CODE_DIR}" ]] && args+=(-v "${HOST_CODE_DIR}:${CONTAINER_CODE_DIR}:ro")
    # The image's HEALTHCHECK reads SERVER_PORT: it must match the port actually served.
    args+=(-e HF_HUB_OFFLINE=1 -e "SERVER_PORT=${SERVER_PORT}")
    # The key by name only: docker copies the value from this environment (never on the command
    # line, in `ps`, or in the dry run). vLLM reads the same key as VLLM_API_KEY.
    if [[ -n "${VLSERVE_API_KEY:-}" ]]; then
        if [[ "${ENGINE}" == vllm ]]; then
            export VLLM_API_KEY=${VLSERVE_API_KEY}
            args+=(-e VLLM_API_KEY)
        else
            export VLSERVE_API_KEY
            args+=(-e VLSERVE_API_KEY)
        fi
    else
        warn "VLSERVE_API_KEY is not set: the server on 0.0.0.0:${SERVER_PORT} answers anyone who reaches port ${HOST_PORT} of this host"
    fi
    if [[ "${ENGINE}" == vllm ]]; then
        if [[ ! "${VLLM_TP}" =~ ^[1-9][0-9]*$ ]] || ((${#DEVICE_IDS[@]} % VLLM_TP != 0)); then
            die "${#DEVICE_IDS[@]} devices cannot be split into tensor-parallel groups of ${VLLM_TP}"
        fi
        args+=(--entrypoint bash "${IMAGE}" -c "${VLLM_ENTRY}" vllm-entry)
        mapfile -t -O "${#args[@]}" args < <(vllm_args)
    else
        args+=("${IMAGE}")
        mapfile -t -O "${#args[@]}" args < <(vlserve_args)
    fi
    log "starting container ${CONTAINER_NAME} from ${IMAGE}"
    run "${args[@]}"
}

wait_ready() {
    local url="http://127.0.0.1:${HOST_PORT}/health"
    if [[ "${DRY_RUN}" == 1 ]]; then
        log "dry run: would wait up to ${READY_TIMEOUT_S} s for ${url}"
        return 0
    fi
    local start=${SECONDS} next_report=$((SECONDS + PROGRESS_INTERVAL_S)) running restarts
    log "waiting up to ${READY_TIMEOUT_S} s for ${url} (model loading takes minutes)"
    while ((SECONDS - start < READY_TIMEOUT_S)); do
        if curl -fsS --max-time 5 "${url}" >/dev/null 2>&1; then
            log "ready after $((SECONDS - start)) s: ${url}"
            return 0
        fi
        # With a restart policy a crashed server comes back by itself: a restart before the first
        # readiness is a failed start (bad model path, unusable device), not one to loop on.
        read -r running restarts < <(docker inspect --format '{{.State.Running}} {{.RestartCount}}' \
            "${CONTAINER_NAME}" 2>/dev/null || echo false 0)
        if [[ "${running}" != true || "${restarts:-0}" != 0 ]]; then
            [[ "${restarts:-0}" == 0 ]] || warn "container ${CONTAINER_NAME} restarted ${restarts} time(s) before it was ready"
            warn "container ${CONTAINER_NAME} stopped; its last log lines:"
            docker logs --tail 50 "${CONTAINER_NAME}" >&2 || true
            [[ "${RESTART_POLICY}" == no ]] || docker stop "${CONTAINER_NAME}" >/dev/null 2>&1 || true
            die "server failed to start (the container is stopped; docker start ${CONTAINER_NAME} after fixing the cause)"
        fi
        if ((SECONDS >= next_report)); then
            log "still loading after $((SECONDS - start)) s: $(docker logs --tail 1 "${CONTAINER_NAME}" 2>&1 | tail -n 1)"
            next_report=$((SECONDS + PROGRESS_INTERVAL_S))
        fi
        sleep "${POLL_INTERVAL_S}"
    done
    warn "not ready after ${READY_TIMEOUT_S} s; last log lines of ${CONTAINER_NAME}:"
    docker logs --tail 50 "${CONTAINER_NAME}" >&2 || true
    die "server not ready in time (raise --ready-timeout if the model is just slow to load)"
}

main() {
    parse_args "$@"
    report_prototype_names
    command -v docker >/dev/null || die "docker not found"
    [[ "${DRY_RUN}" == 1 ]] || command -v curl >/dev/null || die "curl not found (needed for the health check)"
    resolve_platform
    resolve_devices
    check_image
    check_existing_container
    check_device_holders
    check_ports
    start_container
    wait_ready
    log "logs: docker logs -f ${CONTAINER_NAME}; stop: docker stop ${CONTAINER_NAME}"
    log "try: curl http://127.0.0.1:${HOST_PORT}/v1/models"
}

main "$@"
