"""LaunchConfig and the pure functions that turn it into per-instance commands and environments."""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from vlserve import settings
from vlserve.engine.config import EngineConfig
from vlserve.errors import VLServeError
from vlserve.launch.devices import VISIBLE_DEVICES_VAR
from vlserve.launch.supervisor import ProcessSpec
from vlserve.settings import option

DEVICE_TYPES = ("npu", "cuda", "cpu")
DEFAULT_SERVE_COMMAND = (sys.executable, "-m", "vlserve", "serve")


_SECONDS = "SECONDS"


@dataclass(frozen=True)
class LaunchTarget:
    """What to run where, as the user says it (``auto``, a device list); :func:`resolve_target`
    turns it into LaunchConfig's concrete fields."""

    model: str | None = option(
        None, group="instances", env_aliases=("MODEL_PATH",), metavar="PATH",
        help="checkpoint directory (required)",
    )  # fmt: skip
    device: str = option(
        "auto", group="instances", choices=("auto", *DEVICE_TYPES), env_aliases=("DEVICE",),
        help="device type of every instance (auto: detect)",
    )  # fmt: skip
    devices: str | None = option(
        None, group="instances", metavar="IDS",
        help="device ids to use, one instance each, e.g. 0,1,4-7",
        doc_default="every visible device, or ASCEND_RT_VISIBLE_DEVICES / CUDA_VISIBLE_DEVICES",
    )  # fmt: skip
    num_instances: int | None = option(
        None, group="instances", min=1, metavar="N",
        help="number of instances", doc_default="one per device; 1 on CPU",
    )  # fmt: skip
    serve_command: str | None = option(
        None, group="instances", metavar="COMMAND",
        help="command that starts one instance; it gets --model --host --port --device and the "
        "arguments after `--`", doc_default="this Python's `-m vlserve serve`",
    )  # fmt: skip

    def __post_init__(self) -> None:
        settings.check(self)


@dataclass(frozen=True)
class LaunchConfig:
    """Everything ``vlserve launch`` needs, with devices already resolved (no ``auto`` here).
    Its settings are declared once (vlserve.settings): flags, VLSERVE_* variables, checks."""

    model: str
    device: str
    # One entry per instance: the device id it is pinned to (empty for CPU instances).
    device_ids: tuple[str, ...]
    num_instances: int
    host: str = option("0.0.0.0", group="front", help="address nginx listens on")
    port: int = option(
        9000, group="front", min=1, max=65535, env_aliases=("SERVER_PORT",),
        help="the one endpoint clients use",
    )  # fmt: skip
    base_port: int | None = option(
        None, group="front", min=1, max=65535, doc_default="--port + 1",
        help="port of the first instance; the others follow",
    )  # fmt: skip
    instance_host: str = option("127.0.0.1", group="front", help="address the instances listen on")
    nginx: str = option(
        "auto", group="front", metavar="auto|off|PATH",
        help="run nginx in front (auto: if installed; off: only write its config; or its path)",
    )  # fmt: skip
    state_dir: Path = option(
        Path("vlserve-launch"), group="front", help="where logs and the nginx config go"
    )
    ready_timeout_s: float = option(
        1800.0, group="lifecycle", flag="--ready-timeout-s", above=0, metavar=_SECONDS,
        help="give up if the instances are not all ready by then",
    )  # fmt: skip
    stop_timeout_s: float = option(
        60.0, group="lifecycle", flag="--stop-timeout-s", above=0, metavar=_SECONDS,
        help="on SIGTERM, how long each stage may drain before it is killed",
    )  # fmt: skip
    max_startup_failures: int = option(
        3, group="lifecycle", min=1, metavar="N",
        help="crashes in a row before ever being ready that make launch give up",
    )  # fmt: skip
    # Liveness of ready instances (see launch/health.py): poll /health every interval; this many
    # checks in a row without any answer make an instance hung: killed and restarted (0: never).
    # /health is answered by the event loop in milliseconds: 3 x (1 s + 2 s) finds a frozen
    # instance in 9 s or less (it took 21 s with 2 s and 5 s).
    health_interval_s: float = option(
        1.0, group="lifecycle", flag="--health-interval-s", above=0, metavar=_SECONDS,
        help="how often each instance's /health is polled",
    )  # fmt: skip
    health_timeout_s: float = option(
        2.0, group="lifecycle", flag="--health-timeout-s", above=0, metavar=_SECONDS,
        help="a /health check with no HTTP answer by then failed",
    )  # fmt: skip
    hung_after: int = option(
        3, group="lifecycle", min=0, metavar="N",
        help="after an instance was ready, N failed /health checks in a row make it hung: "
        "killed and restarted with the crash backoff; 0: never",
    )  # fmt: skip
    threads_per_instance: int | None = option(
        None, group="cpu instances", min=1, metavar="N",
        help="OMP_NUM_THREADS of each CPU instance", doc_default="cores / instances",
    )  # fmt: skip
    serve_command: tuple[str, ...] = DEFAULT_SERVE_COMMAND
    serve_args: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        settings.check(self)
        if self.device not in DEVICE_TYPES:
            raise ValueError(
                f"device must be one of {', '.join(DEVICE_TYPES)}, not {self.device!r}"
            )
        if self.num_instances < 1:
            raise ValueError("num_instances must be at least 1")
        if self.device != "cpu" and len(self.device_ids) != self.num_instances:
            raise ValueError(
                f"{self.num_instances} instances need {self.num_instances} device ids, "
                f"got {len(self.device_ids)}: {','.join(self.device_ids) or 'none'}"
            )
        ports = self.instance_ports
        if not (ports[0] > 0 and ports[-1] < 65536):
            raise ValueError(
                f"ports out of range: front {self.port}, instances {ports[0]}-{ports[-1]}"
            )
        if self.port in ports:
            raise ValueError(
                f"front port {self.port} collides with instance ports {ports[0]}-{ports[-1]}"
            )

    @property
    def instance_ports(self) -> tuple[int, ...]:
        first = self.port + 1 if self.base_port is None else self.base_port
        return tuple(first + i for i in range(self.num_instances))

    def instance_url(self, index: int) -> str:
        return f"http://{_url_host(self.instance_host)}:{self.instance_ports[index]}"

    @property
    def front_url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.port}"


def instance_request_timeout_s(config: LaunchConfig, env: Mapping[str, str]) -> float | None:
    """The instances' ``--request-timeout``, as `vlserve serve` will read it (the arguments after
    ``--``, else its variable, else its default); None when the command is not vlserve's own."""
    if config.serve_command != DEFAULT_SERVE_COMMAND:
        return None
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    settings.add_arguments(parser, EngineConfig)
    try:
        args, _ = parser.parse_known_args(list(config.serve_args))
        return float(settings.build(EngineConfig, args, env).request_timeout_s)
    except (argparse.ArgumentError, ValueError) as exc:
        raise VLServeError(f"the arguments after `--` are not valid for vlserve serve: {exc}") from None


def nginx_read_timeout_s(config: LaunchConfig, env: Mapping[str, str]) -> int:
    """How long nginx waits on an instance's answer: a little past the instance's own request
    timeout (by then the instance has answered 504), else an hour."""
    timeout_s = instance_request_timeout_s(config, env)
    return 3600 if timeout_s is None else math.ceil(timeout_s) + 30


def _url_host(host: str) -> str:
    """How this host reaches an address we listen on: wildcards through loopback."""
    if host in ("", "0.0.0.0", "*"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def instance_name(index: int) -> str:
    return f"instance-{index}"


def instance_specs(config: LaunchConfig, base_env: Mapping[str, str]) -> list[ProcessSpec]:
    """One server per device (or ``num_instances`` CPU servers), each on its own port."""
    specs = []
    for index, port in enumerate(config.instance_ports):
        argv = (
            *config.serve_command,
            *("--model", config.model, "--host", config.instance_host),
            *("--port", str(port), "--device", config.device),
            *config.serve_args,
        )
        specs.append(
            ProcessSpec(
                name=instance_name(index),
                argv=argv,
                env=instance_env(config, index, base_env),
                log_path=config.state_dir / "logs" / f"{instance_name(index)}.log",
                health_url=f"{config.instance_url(index)}/health",
                stop_signal=signal.SIGTERM,
            )
        )
    return specs


def instance_env(config: LaunchConfig, index: int, base_env: Mapping[str, str]) -> dict[str, str]:
    """The inherited environment, pinned to one device, with the server's own variables agreeing
    with its flags (a stray SERVER_PORT in the user's shell must not confuse anyone)."""
    env = dict(base_env)
    pinned = {
        "HOST": config.instance_host,
        "PORT": str(config.instance_ports[index]),
        "MODEL": config.model,
        "DEVICE": config.device,
    }
    # VLSERVE_* is what `vlserve serve` reads first, the prototype's names next (the flags
    # win over both); both are pinned, for scripts around the server that read the old ones.
    aliases = {"HOST": "SERVER_HOST", "PORT": "SERVER_PORT", "MODEL": "MODEL_PATH"}
    for name, value in pinned.items():
        env[f"VLSERVE_{name}"] = env[aliases.get(name, name)] = value
    if config.device in VISIBLE_DEVICES_VAR:
        env[VISIBLE_DEVICES_VAR[config.device]] = config.device_ids[index]
    else:
        # N CPU instances each using every core would only fight over them.
        threads = config.threads_per_instance or max(
            1, (os.cpu_count() or 1) // config.num_instances
        )
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def nginx_spec(
    binary_argv: list[str], config: LaunchConfig, base_env: Mapping[str, str]
) -> ProcessSpec:
    """nginx as one more supervised child; SIGQUIT is its graceful stop (finish open requests).

    Its /health is proxied to an instance, so it tells about the instances, not nginx: a stopped
    instance would time it out. nginx is therefore not subject to the hung-instance rule.
    """
    return ProcessSpec(
        name="nginx",
        argv=tuple(binary_argv),
        env=dict(base_env),
        log_path=config.state_dir / "logs" / "nginx.log",
        health_url=f"{config.front_url}/health",
        stop_signal=signal.SIGQUIT,
        restart_if_hung=False,
    )
