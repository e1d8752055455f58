"""`--log-format json` and W3C trace context against a real server: one JSON object per line,
the request line's fields with the client address and trace id, and the client's traceparent
passed on to the media host the request makes the server fetch from."""

from __future__ import annotations

import base64
import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess, png_data_url, start_server, stop_server

pytestmark = pytest.mark.integration

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
PNG = base64.b64decode(png_data_url(64, 64).split(",", 1)[1])


@pytest.fixture(scope="module")
def media_host() -> Iterator[tuple[str, list[str | None]]]:
    seen: list[str | None] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            seen.append(self.headers.get("traceparent"))
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG)

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def json_server(
    tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    srv = start_server(tiny_model_path, tmp_path_factory.mktemp("jsonlog"), "--log-format", "json")
    yield srv
    stop_server(srv)


def _chat(srv: ServerProcess, content: object, headers: dict[str, str]) -> httpx.Response:
    body = {"model": srv.model, "max_tokens": 2, "messages": [{"role": "user", "content": content}]}
    return httpx.post(srv.base_url + "/v1/chat/completions", json=body, headers=headers, timeout=60)


def _request_line(srv: ServerProcess, request_id: str) -> dict:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for line in srv.log_path.read_text().splitlines():
            if f'"id": "{request_id}"' in line:
                return json.loads(line)
        time.sleep(0.1)
    raise AssertionError(f"no log line for {request_id}:\n{srv.log_tail()}")


def test_every_line_is_one_json_object(json_server: ServerProcess) -> None:
    assert _chat(json_server, "hi", {"x-request-id": "j1"}).status_code == 200
    entry = _request_line(json_server, "j1")
    lines = json_server.log_path.read_text().splitlines()
    objects = [json.loads(line) for line in lines if line.startswith("{")]
    # the startup lines, uvicorn's included, are JSON too (a traceback may follow a line)
    assert len(objects) >= 3 and objects[0]["level"] in ("info", "warning")
    assert {"time", "level", "logger", "message"} <= set(entry)
    assert entry["logger"] == "vlserve.request" and entry["message"] == "request"
    assert entry["status"] == 200 and entry["completion_tokens"] == 2
    assert entry["client"].startswith("127.0.0.1:")
    assert len(entry["trace_id"]) == 32 and "traceparent" not in entry  # a new trace


def test_traceparent_is_logged_and_passed_on_to_the_media_host(
    json_server: ServerProcess, media_host: tuple[str, list[str | None]]
) -> None:
    url, seen = media_host
    content = [
        {"type": "text", "text": "what is it?"},
        {"type": "image_url", "image_url": {"url": f"{url}/cat.png"}},
    ]
    r = _chat(json_server, content, {"x-request-id": "j2", "traceparent": TRACEPARENT})
    assert r.status_code == 200, r.text
    entry = _request_line(json_server, "j2")
    assert entry["trace_id"] == TRACE_ID and entry["traceparent"] == TRACEPARENT
    sent = seen[-1]
    assert sent is not None and sent.startswith(f"00-{TRACE_ID}-") and sent.endswith("-01")
    assert sent != TRACEPARENT  # the server's own span is the media request's parent


def test_a_malformed_traceparent_starts_a_new_trace(json_server: ServerProcess) -> None:
    bad = "00-" + "0" * 32 + "-00f067aa0ba902b7-01"  # an all-zero trace id is invalid
    assert _chat(json_server, "hi", {"x-request-id": "j3", "traceparent": bad}).status_code == 200
    entry = _request_line(json_server, "j3")
    assert entry["trace_id"] != "0" * 32 and "traceparent" not in entry
