"""LaunchConfig and the pure functions that turn it into per-instance commands and environments."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from vlserve.launch.devices import VISIBLE_DEVICES_VAR
from vlserve.launch.supervisor import ProcessSpec

DEVICE_TYPES = ("npu", "cuda", "cpu")
DEFAULT_SERVE_COMMAND = (sys.executable, "-m", "vlserve", "serve")


@dataclass(frozen=True)
class LaunchConfig:
    """Everything ``vlserve launch`` needs, with devices already resolved (no ``auto`` here)."""

    model: str
    device: str
    # One entry per instance: the device id it is pinned to (empty for CPU instances).
    device_ids: tuple[str, ...]
    num_instances: int
    host: str = "0.0.0.0"
    port: int = 9000
    base_port: int = 9001
    instance_host: str = "127.0.0.1"
    # "auto": start nginx if installed; "off": only write its config; else a path to nginx.
    nginx: str = "auto"
    state_dir: Path = Path("vlserve-launch")
    ready_timeout_s: float = 1800.0
    stop_timeout_s: float = 60.0
    max_startup_failures: int = 3
    # Liveness of ready instances (see launch/health.py): poll /health every interval; this many
    # checks in a row without any answer make an instance hung: killed and restarted (0: never).
    health_interval_s: float = 2.0
    health_timeout_s: float = 5.0
    hung_after: int = 3
    threads_per_instance: int | None = None
    serve_command: tuple[str, ...] = DEFAULT_SERVE_COMMAND
    serve_args: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
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
        if not (0 < self.port < 65536 and ports[0] > 0 and ports[-1] < 65536):
            raise ValueError(
                f"ports out of range: front {self.port}, instances {ports[0]}-{ports[-1]}"
            )
        if self.port in ports:
            raise ValueError(
                f"front port {self.port} collides with instance ports {ports[0]}-{ports[-1]}"
            )
        if self.ready_timeout_s <= 0 or self.stop_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        if self.health_interval_s <= 0 or self.health_timeout_s <= 0:
            raise ValueError("health_interval_s and health_timeout_s must be positive")
        if self.hung_after < 0:
            raise ValueError("hung_after must be 0 (off) or more")
        if self.threads_per_instance is not None and self.threads_per_instance < 1:
            raise ValueError("threads_per_instance must be at least 1")

    @property
    def instance_ports(self) -> tuple[int, ...]:
        return tuple(self.base_port + i for i in range(self.num_instances))

    def instance_url(self, index: int) -> str:
        return f"http://{_url_host(self.instance_host)}:{self.instance_ports[index]}"

    @property
    def front_url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.port}"


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
