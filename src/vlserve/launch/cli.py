"""`vlserve launch`: flags and environment → LaunchConfig → run the instances and nginx."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Mapping

from vlserve import settings
from vlserve.errors import VLServeError
from vlserve.launch.config import DEFAULT_SERVE_COMMAND, LaunchConfig, LaunchTarget
from vlserve.launch.devices import default_device_ids, detect_device_type, parse_device_ids

logger = logging.getLogger("vlserve.launch")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (parser.description or "") + (
        ". Every flag has a VLSERVE_* environment variable (the flag wins); MODEL_PATH, DEVICE "
        "and SERVER_PORT still work."
    )
    parser.epilog = (
        "Arguments after `--` go to every `vlserve serve` instance, e.g. "
        "`vlserve launch --model M -- --dtype bfloat16 --served-model-name qwen3-vl`."
    )
    settings.add_arguments(parser, LaunchTarget)
    settings.add_arguments(parser, LaunchConfig)
    parser.add_argument("serve_args", nargs="*", help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace, env: Mapping[str, str]) -> LaunchConfig:
    """Resolve ``auto`` and the device list here, so LaunchConfig holds only concrete values."""
    target = settings.build(LaunchTarget, args, env)
    if not target.model:
        raise VLServeError("--model (or VLSERVE_MODEL, MODEL_PATH) is required")
    device = detect_device_type() if target.device == "auto" else target.device
    device_ids: tuple[str, ...] = ()
    if device != "cpu":
        device_ids = (
            parse_device_ids(target.devices) if target.devices else default_device_ids(device, env)
        )
        if target.num_instances is not None:
            if target.num_instances > len(device_ids):
                raise VLServeError(
                    f"--num-instances {target.num_instances} but only {len(device_ids)} "
                    f"{device} device(s): {','.join(device_ids)}"
                )
            device_ids = device_ids[: target.num_instances]
    command = shlex.split(target.serve_command) if target.serve_command else DEFAULT_SERVE_COMMAND
    return settings.build(
        LaunchConfig,
        args,
        env,
        model=target.model,
        device=device,
        device_ids=device_ids,
        num_instances=len(device_ids) if device != "cpu" else (target.num_instances or 1),
        serve_command=tuple(command),
        serve_args=tuple(getattr(args, "serve_args", ())),
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
