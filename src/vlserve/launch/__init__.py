"""One server per device behind nginx: `vlserve launch`, its supervisor and config writer."""

from __future__ import annotations

from vlserve.launch.config import LaunchConfig, instance_env, instance_specs
from vlserve.launch.nginx import NginxConfig, render_http_block, render_nginx_conf
from vlserve.launch.supervisor import ChildState, ProcessSpec, RestartPolicy, Supervisor

__all__ = [
    "ChildState",
    "LaunchConfig",
    "NginxConfig",
    "ProcessSpec",
    "RestartPolicy",
    "Supervisor",
    "instance_env",
    "instance_specs",
    "render_http_block",
    "render_nginx_conf",
]
