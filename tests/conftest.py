"""Shared fixtures: the tiny model (built once, cached) and a real `vlserve serve` process."""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


@dataclass
class ServerProcess:
    base_url: str  # http://127.0.0.1:PORT
    model: str  # the served model name
    model_path: Path
    proc: subprocess.Popen
    log_path: Path
    media_dir: Path

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def start_server(
    model_path: Path, tmp: Path, *extra: str, name: str = "tiny-qwen3-vl", timeout_s: float = 240.0
) -> ServerProcess:
    """Start `vlserve serve` on a free port and wait until /health says ready."""
    import httpx

    port = free_port()
    media_dir = tmp / "media"
    media_dir.mkdir(parents=True, exist_ok=True)
    log_path = tmp / f"server-{port}.log"
    cmd = [
        sys.executable,
        "-m",
        "vlserve",
        "serve",
        "--model",
        str(model_path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--served-model-name",
        name,
        "alias-model",
        "--device",
        "cpu",
        "--allowed-local-media-path",
        str(media_dir),
        "--allow-private-media-urls",
        *extra,
    ]
    log = log_path.open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    server = ServerProcess(f"http://127.0.0.1:{port}", name, model_path, proc, log_path, media_dir)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(server.base_url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server not ready after {timeout_s} s:\n{server.log_tail()}")


def stop_server(server: ServerProcess) -> int:
    server.proc.terminate()
    try:
        return server.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        return server.proc.wait()


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
