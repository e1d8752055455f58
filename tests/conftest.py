"""Shared fixtures: the tiny model (built once, cached) and a real `vlserve serve` process."""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from vlserve.testing.server import ServerProcess, free_port, start_server, stop_server

__all__ = [
    "ServerProcess",
    "free_port",
    "load_checkpoint",
    "mutate",
    "png_data_url",
    "seeds",
    "serve_routes",
    "start_server",
    "stop_server",
]

REPO = Path(__file__).resolve().parent.parent


def mutate(seed: bytes, edits: list[tuple[int, int]], cut: int) -> bytes:
    """``seed`` with each ``(position, value)`` byte edit applied (positions wrap), then cut to
    its first ``cut`` bytes (at least one): the media fuzzers' mutation of real files."""
    data = bytearray(seed)
    for position, value in edits:
        data[position % len(data)] = value
    return bytes(data[: max(cut, 1)])


class QuietHandler(http.server.BaseHTTPRequestHandler):
    """A loopback test server's handler: ``answer`` writes a whole response; no access log."""

    def answer(self, content_type: str, body: bytes, status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def serving(handler: type[QuietHandler]) -> Iterator[str]:
    """Run ``handler`` on a loopback port in a thread; yield the base URL."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@contextlib.contextmanager
def serve_routes(routes: dict[str, tuple[int, bytes]], content_type: str) -> Iterator[str]:
    """Serve ``routes`` (path → (status, body); others 404) on loopback; yield the base URL."""

    class Handler(QuietHandler):
        def do_GET(self) -> None:  # noqa: N802
            status, body = routes.get(self.path, (404, b""))
            self.answer(content_type, body, status)

    with serving(Handler) as url:
        yield url


def seeds(*fixed: int) -> list[int]:
    """Seeds for a randomized test: the fixed ones, which keep its strength the same from run
    to run, then one drawn for this run (``VLSERVE_TEST_SEED`` when set, to reproduce a
    failure: the test's id shows the seed)."""
    drawn = int(os.environ.get("VLSERVE_TEST_SEED") or random.randrange(2**31))
    return [*fixed, drawn]


def png_data_url(
    width: int = 448,
    height: int = 448,
    color: tuple[int, int, int] = (200, 30, 30),
    fmt: str = "PNG",
) -> str:
    from PIL import Image

    image = Image.new("RGB", (width, height), color)
    for x in range(0, width, 7):  # some structure, so different images give different features
        image.putpixel((x, (x * 3) % height), (x % 256, 255 - x % 256, 90))
    buf = io.BytesIO()
    image.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def load_checkpoint(path: Path):  # type: ignore[no-untyped-def]
    """A checkpoint in fp32, checked to load every weight it should and nothing else."""
    import torch
    import transformers

    loaded, info = transformers.Qwen3VLForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    return loaded.eval()


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    from vlserve.testing import ensure_tiny_model

    return ensure_tiny_model()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_path: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


@pytest.fixture(scope="session")
def server(
    tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    srv = start_server(tiny_model_path, tmp_path_factory.mktemp("server"))
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def client(server: ServerProcess):  # type: ignore[no-untyped-def]
    import openai

    return openai.OpenAI(
        base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120
    )


def pytest_report_header(config: pytest.Config) -> str:
    try:
        import transformers

        return f"transformers {transformers.__version__}; VLSERVE_CACHE_DIR={os.environ.get('VLSERVE_CACHE_DIR', '~/.cache/vlserve')}"
    except ImportError:
        return "transformers not installed (client-only environment)"
