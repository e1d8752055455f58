#!/usr/bin/env bash
# Entry point of the Ascend image: load the CANN environment, then run vlserve.
#
# Vendor images set up CANN in login-shell profiles, which `docker run` does not read; without it
# torch_npu cannot find libhccl.so and friends.
set -euo pipefail

for env_script in \
    /usr/local/Ascend/ascend-toolkit/set_env.sh \
    /usr/local/Ascend/nnal/atb/set_env.sh; do
    if [[ -f "${env_script}" ]]; then
        set +u  # vendor scripts read unset variables
        # shellcheck disable=SC1090  # a vendor file, not ours to lint
        source "${env_script}"
        set -u
    fi
done

exec vlserve "$@"
