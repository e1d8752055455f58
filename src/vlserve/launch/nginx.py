"""nginx in front of the instances: config rendering, validation and the command that runs it."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from vlserve.errors import VLServeError

# Debian puts nginx in /usr/sbin, which is not on a normal user's PATH.
_FALLBACK_PATHS = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
_TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


@dataclass(frozen=True)
class NginxConfig:
    """What the front endpoint looks like; ``upstreams`` are ``host:port`` of the instances."""

    listen_host: str
    listen_port: int
    upstreams: tuple[str, ...]
    # Generation can run for minutes: nginx waits this long for the next bytes of an answer. The
    # instances' own --request-timeout ends every request sooner (launch sets it just above).
    read_timeout_s: int = 3600
    # /health and /v1/models answer in milliseconds: silence this long means a frozen instance,
    # and the request goes to another one.
    quick_timeout_s: int = 5
    connect_timeout_s: int = 5
    # Base64 images make request bodies large; nginx's default of 1 MB rejects them with 413.
    max_body_mb: int = 100
    keepalive_connections: int = 64
    # A few hundred requests per second at most: two workers are plenty, even on 192 cores.
    worker_processes: str = "2"
    worker_connections: int = 4096
    # The launcher's own series (launch/metrics.py), served as /metrics on the front port.
    launch_metrics_file: Path | None = None

    def __post_init__(self) -> None:
        if not self.upstreams:
            raise ValueError("nginx needs at least one upstream")
        if not 0 < self.listen_port < 65536:
            raise ValueError(f"listen port out of range: {self.listen_port}")
        if min(self.read_timeout_s, self.quick_timeout_s, self.connect_timeout_s) < 1:
            raise ValueError("nginx timeouts must be at least 1 s")


def render_http_block(config: NginxConfig, *, upstream_name: str = "vlserve") -> str:
    """The ``upstream`` and ``server`` blocks: what goes into a system nginx's ``conf.d/``."""
    servers = "\n".join(
        f"    server {addr} max_fails=1 fail_timeout=5s;" for addr in config.upstreams
    )
    listen = _listen_address(config.listen_host, config.listen_port)
    tries = len(config.upstreams)
    return f"""\
# The client's X-Request-Id, or nginx's own: the same id in nginx's log, the instance's log
# and the response header.
map $http_x_request_id $vlserve_request_id {{
    default $http_x_request_id;
    "" $request_id;
}}

upstream {upstream_name} {{
    # An image request can take seconds: send each new request to the least busy instance.
    # The shared zone makes the count of open requests (and failed instances) common to all
    # workers; without it each worker balances only its own requests.
    least_conn;
    zone {upstream_name} 1m;
{servers}
    keepalive {config.keepalive_connections};
}}

server {{
    listen {listen};
    client_max_body_size {config.max_body_mb}m;
    client_body_buffer_size 1m;

    # HTTP/1.1 with an empty Connection header keeps upstream connections alive.
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host $host;
    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    proxy_set_header X-Request-Id $vlserve_request_id;
    # Server-sent events must reach the client token by token.
    proxy_buffering off;
    proxy_cache off;
    proxy_connect_timeout {config.connect_timeout_s}s;
    proxy_next_upstream_tries {tries};

    location / {{
        proxy_pass http://{upstream_name};
        proxy_read_timeout {config.read_timeout_s}s;
        proxy_send_timeout {config.read_timeout_s}s;
        # A dead, loading or draining instance sends the request to another one. Chat
        # completions have no side effects, so retrying a POST that got no answer is safe.
        # Not on "timeout": a generation that outlived the read timeout must not run twice.
        proxy_next_upstream error http_502 http_503 non_idempotent;
    }}

    # Reads that answer at once and change nothing: a frozen instance's silence is retried
    # on another instance after {config.quick_timeout_s} s (and marks it failed for 5 s).
    location ~ ^/(health|v1/models)(/|$) {{
        proxy_pass http://{upstream_name};
        proxy_read_timeout {config.quick_timeout_s}s;
        proxy_send_timeout {config.quick_timeout_s}s;
        proxy_next_upstream error timeout http_502 http_503 http_504;
    }}
{_metrics_locations(config)}}}
"""


def _metrics_locations(config: NginxConfig) -> str:
    """One scrape path per instance, ``/instances/<i>/metrics`` (through ``location /`` a
    scrape reaches whichever instance least_conn picks: a counter reads 1, 3, 1, 3), and
    ``/metrics``: the launcher's own series, from the file it rewrites."""
    blocks = [
        f"""
    location = /instances/{index}/metrics {{
        proxy_pass http://{addr}/metrics;
        proxy_connect_timeout {config.connect_timeout_s}s;
        proxy_read_timeout 60s;
    }}
"""
        for index, addr in enumerate(config.upstreams)
    ]
    if config.launch_metrics_file is not None:
        blocks.append(f"""
    location = /metrics {{
        types {{ }}
        default_type "text/plain; version=0.0.4; charset=utf-8";
        add_header Cache-Control no-store;
        alias {config.launch_metrics_file.resolve()};
    }}
""")
    return "".join(blocks)


def render_nginx_conf(config: NginxConfig, prefix: Path) -> str:
    """A complete standalone ``nginx.conf`` whose pid, logs and temp files live under ``prefix``."""
    prefix = prefix.resolve()
    temp_paths = "\n".join(f"    {name}_temp_path {prefix / 'temp' / name};" for name in _TEMP_DIRS)
    # As root, nginx would drop its workers to "nobody", who cannot write our temp dirs.
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};\n" if os.geteuid() == 0 else ""
    http_block = _indent(render_http_block(config), "    ")
    return f"""\
# Written by `vlserve launch`; regenerated on every launch.
{user}worker_processes {config.worker_processes};
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} warn;

events {{
    worker_connections {config.worker_connections};
}}

http {{
    default_type application/octet-stream;
    # Which instance served each request, and how long it took: the first thing to look at.
    log_format vlserve '$remote_addr [$time_local] "$request" $status $body_bytes_sent '
                       'rt=$request_time upstream=$upstream_addr urt=$upstream_response_time '
                       'request_id=$vlserve_request_id';
    access_log {prefix / "access.log"} vlserve;
{temp_paths}

{http_block}}}
"""


def write_nginx_files(config: NginxConfig, prefix: Path) -> tuple[Path, Path]:
    """Write ``nginx.conf`` (standalone) and ``vlserve-upstream.conf`` (snippet) under ``prefix``."""
    for name in _TEMP_DIRS:
        (prefix / "temp" / name).mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(render_nginx_conf(config, prefix))
    snippet = prefix / "vlserve-upstream.conf"
    snippet.write_text(render_http_block(config))
    return conf, snippet


def find_nginx(explicit: str | None = None) -> str | None:
    """The nginx binary: ``explicit`` if given (must exist), else PATH, else the usual sbin dirs."""
    if explicit:
        found = shutil.which(explicit)
        if found is None:
            raise VLServeError(f"nginx binary not found or not executable: {explicit}")
        return found
    found = shutil.which("nginx")
    if found:
        return found
    return next((p for p in _FALLBACK_PATHS if os.access(p, os.X_OK)), None)


def nginx_command(binary: str, prefix: Path, *, test_only: bool = False) -> list[str]:
    """argv that runs nginx in the foreground with everything under ``prefix``."""
    prefix = prefix.resolve()
    # -e: without it nginx first opens the compiled-in /var/log/nginx/error.log.
    argv = [binary, "-p", str(prefix), "-c", str(prefix / "nginx.conf")]
    argv += ["-e", str(prefix / "error.log"), "-g", "daemon off;"]
    if test_only:
        argv.append("-t")
    return argv


def check_nginx_conf(binary: str, prefix: Path) -> None:
    """Run ``nginx -t`` on the written config; raise VLServeError with nginx's words if rejected."""
    proc = subprocess.run(
        nginx_command(binary, prefix, test_only=True),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if proc.returncode != 0:
        raise VLServeError(f"nginx rejected {prefix / 'nginx.conf'}:\n{proc.stderr.strip()}")


def _listen_address(host: str, port: int) -> str:
    if host in ("", "0.0.0.0", "*"):
        return str(port)
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def _indent(text: str, prefix: str) -> str:
    return "".join(prefix + line if line.strip() else line for line in text.splitlines(True))
