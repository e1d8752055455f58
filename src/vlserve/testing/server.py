"""Start and stop a real `vlserve serve` process, for tests, the demo and benchmarks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    base_url: str  # http://127.0.0.1:PORT
    model: str  # the served model name
    model_path: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    media_dir: Path

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 (loopback only)
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def start_server(
    model_path: Path,
    workdir: Path,
    *extra: str,
    name: str = "tiny-qwen3-vl",
    timeout_s: float = 240.0,
    env: dict[str, str] | None = None,
    private_media_urls: bool = True,
) -> ServerProcess:
    """Start `vlserve serve` on a free loopback port and wait until /health says ready.

    The server runs on CPU with local files allowed from ``workdir/media`` and, unless
    ``private_media_urls`` is false, private image URLs allowed (tests serve images from
    loopback); ``extra`` flags are appended, ``env`` entries are added to the environment.
    """
    port = free_port()
    media_dir = workdir / "media"
    media_dir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"server-{port}.log"
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
        *(["--allow-private-media-urls"] if private_media_urls else []),
        *extra,
    ]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env={**os.environ, **(env or {})},
        )
    server = ServerProcess(f"http://127.0.0.1:{port}", name, model_path, proc, log_path, media_dir)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log_tail()}")
        if _healthy(server.base_url + "/health"):
            return server
        time.sleep(0.5)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"server not ready after {timeout_s} s:\n{server.log_tail()}")


def stop_server(server: ServerProcess, timeout_s: float = 60.0) -> int:
    """SIGTERM, wait (graceful drain), SIGKILL if it does not exit; returns the exit code."""
    server.proc.terminate()
    try:
        return server.proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        return server.proc.wait()
