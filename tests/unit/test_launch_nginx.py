"""The nginx config writer: what the rendered config says, and that real nginx accepts it."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import socket
import stat
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from vlserve.errors import VLServeError
from vlserve.launch.nginx import (
    NginxConfig,
    check_nginx_conf,
    find_nginx,
    nginx_command,
    render_http_block,
    render_nginx_conf,
    write_nginx_files,
)

CONFIG = NginxConfig(
    listen_host="127.0.0.1",
    listen_port=9000,
    upstreams=("127.0.0.1:9001", "127.0.0.1:9002"),
    launch_metrics_file=Path("/srv/launch/launch.prom"),
)


def directives(text: str) -> list[str]:
    """Non-comment lines, stripped: what nginx actually reads."""
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line]


def test_upstream_is_least_conn_with_keepalive_and_every_instance() -> None:
    lines = directives(render_http_block(CONFIG))
    assert "least_conn;" in lines
    assert "zone vlserve 1m;" in lines  # least_conn across workers, not per worker
    assert "server 127.0.0.1:9001 max_fails=1 fail_timeout=5s;" in lines
    assert "server 127.0.0.1:9002 max_fails=1 fail_timeout=5s;" in lines
    assert "keepalive 64;" in lines


def test_proxy_settings_suit_long_streaming_requests() -> None:
    lines = directives(render_http_block(CONFIG))
    for expected in (
        "listen 127.0.0.1:9000;",
        "proxy_buffering off;",
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";',
        "proxy_read_timeout 3600s;",
        "proxy_send_timeout 3600s;",
        "client_max_body_size 100m;",
        "proxy_next_upstream_tries 2;",
    ):
        assert expected in lines, expected
    general = locations(render_http_block(CONFIG))["location /"]
    retry = next(line for line in general if line.startswith("proxy_next_upstream "))
    assert "http_503" in retry and "non_idempotent" in retry
    # A generation that outlived the read timeout must not be run again elsewhere.
    assert "timeout" not in retry.split()


def locations(text: str) -> dict[str, list[str]]:
    """Each ``location`` line → the directives of its block (no nesting inside them here)."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in directives(text):
        if line.startswith("location "):
            current = blocks.setdefault(line.removesuffix("{").strip(), [])
        elif line == "}":
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def test_each_instance_has_its_own_scrape_path_and_metrics_is_the_launchers() -> None:
    """Through ``location /`` a scrape reaches whichever instance least_conn picks."""
    blocks = locations(render_http_block(CONFIG))
    assert "proxy_pass http://127.0.0.1:9001/metrics;" in blocks["location = /instances/0/metrics"]
    assert "proxy_pass http://127.0.0.1:9002/metrics;" in blocks["location = /instances/1/metrics"]
    assert "location = /instances/2/metrics" not in blocks
    front = blocks["location = /metrics"]
    assert "alias /srv/launch/launch.prom;" in front
    assert 'default_type "text/plain; version=0.0.4; charset=utf-8";' in front
    assert not any(line.startswith("proxy_pass") for line in front)
    # Only /metrics of an instance: the rest of its API stays behind the balancer.
    assert not any(key.startswith("location /instances") for key in blocks)


def test_without_a_launch_metrics_file_the_front_has_no_metrics_location() -> None:
    config = NginxConfig(listen_host="127.0.0.1", listen_port=9000, upstreams=("127.0.0.1:1",))
    blocks = locations(render_http_block(config))
    assert "location = /metrics" not in blocks
    assert "location = /instances/0/metrics" in blocks


def test_a_frozen_instance_fails_quick_reads_over_to_another() -> None:
    """/health and /v1/models answer at once: silence is retried elsewhere after a few seconds
    (a frozen instance accepts connections but never answers), unlike a generation."""
    quick = locations(render_http_block(CONFIG))["location ~ ^/(health|v1/models)(/|$)"]
    assert "proxy_read_timeout 5s;" in quick
    retry = next(line for line in quick if line.startswith("proxy_next_upstream "))
    assert {"error", "timeout", "http_503"} <= set(retry.rstrip(";").split())
    assert "non_idempotent" not in retry


def test_the_request_id_is_passed_on_and_logged(tmp_path: Path) -> None:
    lines = directives(render_nginx_conf(CONFIG, tmp_path))
    assert "map $http_x_request_id $vlserve_request_id {" in lines
    assert '"" $request_id;' in lines  # nginx's own when the client sent none
    assert "proxy_set_header X-Request-Id $vlserve_request_id;" in lines
    assert any("request_id=$vlserve_request_id" in line for line in lines)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("0.0.0.0", "listen 8080;"),
        ("127.0.0.1", "listen 127.0.0.1:8080;"),
        ("::1", "listen [::1]:8080;"),
    ],
)
def test_listen_address_forms(host: str, expected: str) -> None:
    config = NginxConfig(listen_host=host, listen_port=8080, upstreams=("127.0.0.1:1",))
    assert expected in directives(render_http_block(config))


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="at least one upstream"):
        NginxConfig(listen_host="127.0.0.1", listen_port=9000, upstreams=())
    with pytest.raises(ValueError, match="port"):
        NginxConfig(listen_host="127.0.0.1", listen_port=70000, upstreams=("a:1",))
    with pytest.raises(ValueError, match="timeouts"):
        NginxConfig(listen_host="127.0.0.1", listen_port=9000, upstreams=("a:1",), quick_timeout_s=0)


def test_standalone_config_keeps_every_path_under_the_prefix(tmp_path: Path) -> None:
    text = render_nginx_conf(CONFIG, tmp_path)
    lines = directives(text)
    assert f"pid {tmp_path.resolve()}/nginx.pid;" in lines
    assert any(line.startswith("error_log " + str(tmp_path.resolve())) for line in lines)
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        assert f"{kind}_temp_path {tmp_path.resolve()}/temp/{kind};" in lines
    # Only root may (and must) name the worker user.
    assert any(line.startswith("user ") for line in lines) == (os.geteuid() == 0)


def test_write_files_and_command(tmp_path: Path) -> None:
    conf, snippet = write_nginx_files(CONFIG, tmp_path)
    assert conf.read_text() == render_nginx_conf(CONFIG, tmp_path)
    assert snippet.read_text() == render_http_block(CONFIG)
    assert (tmp_path / "temp" / "proxy").is_dir()
    argv = nginx_command("/usr/sbin/nginx", tmp_path)
    assert argv[0] == "/usr/sbin/nginx"
    assert argv[argv.index("-c") + 1] == str(conf.resolve())
    assert argv[argv.index("-g") + 1] == "daemon off;"
    assert "-t" not in argv and nginx_command("nginx", tmp_path, test_only=True)[-1] == "-t"


def test_find_nginx_rejects_a_missing_explicit_binary(tmp_path: Path) -> None:
    with pytest.raises(VLServeError, match="not found"):
        find_nginx(str(tmp_path / "no-nginx-here"))
    fake = tmp_path / "nginx"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    assert find_nginx(str(fake)) == str(fake)


NGINX = find_nginx()


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx)")
def test_real_nginx_accepts_the_config(tmp_path: Path) -> None:
    assert NGINX is not None
    write_nginx_files(CONFIG, tmp_path)
    check_nginx_conf(NGINX, tmp_path)


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx)")
def test_real_nginx_rejection_is_reported_with_its_message(tmp_path: Path) -> None:
    assert NGINX is not None
    write_nginx_files(CONFIG, tmp_path)
    (tmp_path / "nginx.conf").write_text("events {}\nhttp { bogus_directive on; }\n")
    with pytest.raises(VLServeError, match="bogus_directive"):
        check_nginx_conf(NGINX, tmp_path)


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx)")
def test_real_nginx_sends_reads_past_a_frozen_instance(tmp_path: Path) -> None:
    """One upstream accepts connections and never answers (what SIGSTOP looks like from
    outside); every GET /v1/models through nginx still gets the other instance's answer, in
    about the quick timeout (it waited 3600 s before)."""
    assert NGINX is not None
    frozen = socket.create_server(("127.0.0.1", 0), backlog=64)  # never accept()ed
    answer = json.dumps({"object": "list", "data": []}).encode()

    class Models(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *_: object) -> None:
            pass

    healthy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Models)
    threading.Thread(target=healthy.serve_forever, daemon=True).start()
    port = _free_port()
    config = NginxConfig(
        listen_host="127.0.0.1",
        listen_port=port,
        upstreams=(f"127.0.0.1:{frozen.getsockname()[1]}", f"127.0.0.1:{healthy.server_port}"),
        quick_timeout_s=1,
    )
    write_nginx_files(config, tmp_path)
    proc = subprocess.Popen(nginx_command(NGINX, tmp_path), stderr=subprocess.PIPE)
    try:
        _wait_listening(port)
        for _ in range(4):  # least_conn: the frozen one is tried too
            started = time.monotonic()
            reply = urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=20)
            assert reply.status == 200 and reply.read() == answer
            assert time.monotonic() - started < 10
    finally:
        proc.terminate()
        proc.wait(10)
        healthy.shutdown()
        frozen.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_listening(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nginx is not listening on {port}")
