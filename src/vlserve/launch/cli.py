"""`vlserve launch`: flags and environment → LaunchConfig → run the instances and nginx."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path

from vlserve.errors import VLServeError
from vlserve.launch.config import DEFAULT_SERVE_COMMAND, LaunchConfig
from vlserve.launch.devices import default_device_ids, detect_device_type, parse_device_ids

logger = logging.getLogger("vlserve.launch")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Arguments after `--` go to every `vlserve serve` instance, e.g. "
        "`vlserve launch --model M -- --dtype bfloat16 --served-model-name qwen3-vl`."
    )
    env = os.environ
    add = parser.add_argument
    add("--model", default=env.get("MODEL_PATH"), help="checkpoint directory (env MODEL_PATH)")
    add("--device", choices=("auto", "npu", "cuda", "cpu"), default=env.get("DEVICE", "auto"),
        help="device type of every instance (env DEVICE; default: auto-detect)")  # fmt: skip
    add("--devices", default=None,
        help="device ids to use, one instance each, e.g. 0,1,4-7 (default: all visible devices, "
        "or the entries of ASCEND_RT_VISIBLE_DEVICES / CUDA_VISIBLE_DEVICES if set)")  # fmt: skip
    add("--num-instances", type=int, default=None,
        help="number of instances (default: one per device; 1 on CPU)")  # fmt: skip
    add("--host", default="0.0.0.0", help="address nginx listens on (default: %(default)s)")
    add("--port", type=int, default=int(env.get("SERVER_PORT", "9000")),
        help="the one endpoint clients use (env SERVER_PORT; default: %(default)s)")  # fmt: skip
    add("--base-port", type=int, default=None,
        help="port of the first instance; the others follow (default: --port + 1)")  # fmt: skip
    add("--instance-host", default="127.0.0.1",
        help="address the instances listen on (default: %(default)s)")  # fmt: skip
    add("--nginx", default="auto", metavar="auto|off|PATH",
        help="run nginx in front (auto: if installed; off: only write its config; or nginx's path)")  # fmt: skip
    add("--state-dir", type=Path, default=Path("vlserve-launch"),
        help="where logs and the nginx config go (default: ./%(default)s)")  # fmt: skip
    add("--ready-timeout-s", type=float, default=1800.0,
        help="give up if the instances are not all ready by then (default: %(default)s)")  # fmt: skip
    add("--stop-timeout-s", type=float, default=60.0,
        help="on SIGTERM, how long each stage may drain before it is killed (default: %(default)s)")  # fmt: skip
    add("--max-startup-failures", type=int, default=3,
        help="crashes in a row before ever being ready that make launch give up (default: %(default)s)")  # fmt: skip
    add("--health-interval-s", type=float, default=2.0,
        help="how often each instance's /health is polled (default: %(default)s)")  # fmt: skip
    add("--health-timeout-s", type=float, default=5.0,
        help="a /health check with no HTTP answer by then failed (default: %(default)s)")  # fmt: skip
    add("--hung-after", type=int, default=3, metavar="N",
        help="after an instance was ready, N failed /health checks in a row make it hung: "
        "killed and restarted with the crash backoff; 0: never (default: %(default)s)")  # fmt: skip
    add("--threads-per-instance", type=int, default=None,
        help="OMP_NUM_THREADS of each CPU instance (default: cores / instances)")  # fmt: skip
    add("--serve-command", default=None,
        help="command that starts one instance; it gets --model --host --port --device and the "
        "arguments after `--` (default: this Python's `-m vlserve serve`)")  # fmt: skip
    add("serve_args", nargs="*", help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace, env: Mapping[str, str]) -> LaunchConfig:
    """Resolve ``auto`` and the device list here, so LaunchConfig holds only concrete values."""
    if not args.model:
        raise VLServeError("--model (or MODEL_PATH) is required")
    device = detect_device_type() if args.device == "auto" else args.device
    device_ids: tuple[str, ...] = ()
    if device != "cpu":
        device_ids = (
            parse_device_ids(args.devices) if args.devices else default_device_ids(device, env)
        )
        if args.num_instances is not None:
            if args.num_instances > len(device_ids):
                raise VLServeError(
                    f"--num-instances {args.num_instances} but only {len(device_ids)} {device} "
                    f"device(s): {','.join(device_ids)}"
                )
            device_ids = device_ids[: args.num_instances]
    num_instances = len(device_ids) if device != "cpu" else (args.num_instances or 1)
    serve_command = shlex.split(args.serve_command) if args.serve_command else DEFAULT_SERVE_COMMAND
    return LaunchConfig(
        model=args.model,
        device=device,
        device_ids=device_ids,
        num_instances=num_instances,
        host=args.host,
        port=args.port,
        base_port=args.base_port if args.base_port is not None else args.port + 1,
        instance_host=args.instance_host,
        nginx=args.nginx,
        state_dir=args.state_dir,
        ready_timeout_s=args.ready_timeout_s,
        stop_timeout_s=args.stop_timeout_s,
        max_startup_failures=args.max_startup_failures,
        health_interval_s=args.health_interval_s,
        health_timeout_s=args.health_timeout_s,
        hung_after=args.hung_after,
        threads_per_instance=args.threads_per_instance,
        serve_command=tuple(serve_command),
        serve_args=tuple(args.serve_args),
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = config_from_args(args, os.environ)
    except (VLServeError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    from vlserve.launch.launcher import run_launch

    try:
        return run_launch(config)
    except VLServeError as exc:
        logger.error("%s", exc.message)
        return 1
