"""`vlserve launch` end to end: instances up, nginx in front, wait for a signal, drain in order."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Mapping

from vlserve.errors import VLServeError
from vlserve.launch import metrics
from vlserve.launch.config import LaunchConfig, instance_specs, nginx_read_timeout_s, nginx_spec
from vlserve.launch.nginx import (
    NginxConfig,
    check_nginx_conf,
    find_nginx,
    nginx_command,
    write_nginx_files,
)
from vlserve.launch.supervisor import RestartPolicy, Supervisor

logger = logging.getLogger("vlserve.launch")

# nginx reads a config it has already validated: it is up in well under this.
_NGINX_READY_TIMEOUT_S = 60.0


def run_launch(config: LaunchConfig, env: Mapping[str, str] | None = None) -> int:
    """Blocking entry point; returns the process exit code."""
    return asyncio.run(launch(config, dict(os.environ) if env is None else env))


async def launch(config: LaunchConfig, env: Mapping[str, str]) -> int:
    check_ports_free(config)
    nginx_argv = _prepare_nginx(config)
    supervisor = Supervisor(
        RestartPolicy(
            stop_timeout_s=config.stop_timeout_s,
            max_startup_failures=config.max_startup_failures,
            health_interval_s=config.health_interval_s,
            health_timeout_s=config.health_timeout_s,
            hung_after=config.hung_after,
        )
    )
    _install_signal_handlers(supervisor)
    specs = instance_specs(config, env)
    names = [spec.name for spec in specs]
    for spec in specs:
        supervisor.start(spec)
    publisher = asyncio.ensure_future(
        metrics.publish(
            supervisor, names, config.state_dir / metrics.METRICS_FILE, config.health_interval_s
        )
    )
    logger.info(
        "starting %d %s instance(s) of %s on ports %d-%d; logs in %s",
        config.num_instances, config.device, config.model, config.instance_ports[0],
        config.instance_ports[-1], config.state_dir / "logs",
    )  # fmt: skip
    exit_code = 1
    try:
        await supervisor.wait_ready(names, config.ready_timeout_s)
        if nginx_argv is not None:
            supervisor.start(nginx_spec(nginx_argv, config, env))
            await supervisor.wait_ready(["nginx"], _NGINX_READY_TIMEOUT_S)
        _announce_ready(config, serving_front=nginx_argv is not None)
        exit_code = 0 if await supervisor.wait_stop_or_failure() else 1
    except VLServeError as exc:
        exit_code = 0 if supervisor.stop_requested else 1
        if exit_code:
            logger.error("launch failed: %s", exc.message)
    finally:
        logger.info("stopping: nginx first (finishes open requests), then the instances")
        await supervisor.stop([["nginx"], names])
        publisher.cancel()
    return exit_code


def check_ports_free(config: LaunchConfig) -> None:
    """Refuse ports someone already listens on: a stale server there would answer our health
    checks and pass for a new instance."""
    wanted = [(config.host, config.port)] + [
        (config.instance_host, p) for p in config.instance_ports
    ]
    busy = [port for host, port in wanted if not _can_listen(host, port)]
    if busy:
        raise VLServeError(
            f"port(s) already in use: {', '.join(map(str, busy))}; stop what listens there "
            "(an earlier launch?) or choose --port / --base-port"
        )


def _can_listen(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As servers do: connections lingering in TIME_WAIT do not make a port busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host if host not in ("", "*") else "0.0.0.0", port))
        except OSError:
            return False
    return True


def _prepare_nginx(config: LaunchConfig) -> list[str] | None:
    """Write the nginx files always; return nginx's argv if we are to run it ourselves."""
    upstreams = tuple(
        f"{config.instance_url(i).removeprefix('http://')}" for i in range(config.num_instances)
    )
    nginx_config = NginxConfig(
        listen_host=config.host,
        listen_port=config.port,
        upstreams=upstreams,
        read_timeout_s=nginx_read_timeout_s(config, os.environ),
        launch_metrics_file=config.state_dir / metrics.METRICS_FILE,
    )
    prefix = (config.state_dir / "nginx").resolve()
    conf, snippet = write_nginx_files(nginx_config, prefix)
    binary = (
        None
        if config.nginx == "off"
        else find_nginx(None if config.nginx == "auto" else config.nginx)
    )
    if binary is None:
        if config.nginx == "auto":
            logger.warning("nginx not found: clients must use the instances directly")
        logger.info("nginx config written to %s (conf.d snippet: %s)", conf, snippet)
        return None
    # Fail now, not after minutes of model loading.
    check_nginx_conf(binary, prefix)
    return nginx_command(binary, prefix)


def _announce_ready(config: LaunchConfig, *, serving_front: bool) -> None:
    endpoints = ",".join(f"{config.instance_url(i)}/v1" for i in range(config.num_instances))
    if serving_front:
        logger.info("ready: %d instance(s) behind %s/v1", config.num_instances, config.front_url)
    else:
        logger.info("ready: %d instance(s), no load balancer running", config.num_instances)
    logger.info("instances: %s", endpoints)
    logger.info("benchmark them directly with: vlserve bench --endpoints %s ...", endpoints)


def _install_signal_handlers(supervisor: Supervisor) -> None:
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if supervisor.stop_requested:
            # A second Ctrl-C: the user does not want to wait for the drain.
            logger.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(130)
        logger.info("%s received: draining", signal.Signals(signum).name)
        supervisor.request_stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
