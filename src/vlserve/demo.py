"""`python -m vlserve.demo`: the whole job end to end on the tiny model, with timings.

Builds (or reuses) the tiny checkpoint, starts `vlserve serve`, sends a text and an image request
through the official `openai` client (one of them streamed), runs `vlserve bench` on the bundled
sample dataset, prints everything, and stops the server.
"""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _image_url() -> str:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (448, 448), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((80, 80, 368, 368), fill=(220, 40, 40))
    draw.rectangle((180, 20, 268, 120), fill=(30, 90, 220))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _wait_ready(base_url: str, proc: subprocess.Popen, timeout_s: float = 300) -> float:
    import httpx

    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with code {proc.returncode}")
        try:
            if httpx.get(base_url + "/health", timeout=2).status_code == 200:
                return time.perf_counter() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"server not ready after {timeout_s:.0f} s")


def _requests(base_url: str, model: str) -> None:
    import openai

    client = openai.OpenAI(base_url=base_url + "/v1", api_key="demo")
    t0 = time.perf_counter()
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is 2 plus 2?"}],
        max_tokens=24, temperature=0,
    )
    print(f"\n[text]  {time.perf_counter() - t0:.2f} s, usage {r.usage.model_dump()}, "
          f"finish_reason={r.choices[0].finish_reason}")
    print(f"        answer: {r.choices[0].message.content!r}")
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "Describe this image."},
        {"type": "image_url", "image_url": {"url": _image_url()}},
    ]}]
    t0 = time.perf_counter()
    ttft = None
    pieces = []
    usage = None
    for chunk in client.chat.completions.create(
        model=model, messages=messages, max_tokens=32, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            ttft = ttft or time.perf_counter() - t0
            pieces.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    print(f"[image] streamed, TTFT {ttft or 0:.3f} s, total {time.perf_counter() - t0:.2f} s, "
          f"usage {usage.model_dump() if usage else None}")
    print(f"        answer: {''.join(pieces)!r}")
    print("        (random weights: the words are noise; the plumbing is real)")


def main() -> int:
    from vlserve.testing import ensure_tiny_model

    t0 = time.perf_counter()
    model_path = ensure_tiny_model()
    print(f"tiny Qwen3-VL checkpoint: {model_path} ({time.perf_counter() - t0:.1f} s)")
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    model = "qwen3-vl-tiny"
    with tempfile.TemporaryDirectory(prefix="vlserve-demo-") as tmp:
        log_path = Path(tmp) / "server.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "vlserve", "serve", "--model", str(model_path), "--host",
                 "127.0.0.1", "--port", str(port), "--served-model-name", model],
                stdout=log, stderr=subprocess.STDOUT,
            )
        try:
            print(f"server ready on {base_url} after {_wait_ready(base_url, proc):.1f} s")
            _requests(base_url, model)
            print("\n[bench] vlserve bench on the bundled sample dataset:")
            bench = subprocess.run(
                [sys.executable, "-m", "vlserve", "bench", "--dataset", "sample", "--url",
                 base_url, "--model", model, "--max-tokens", "16", "--max-concurrency", "4",
                 "--output", str(Path(tmp) / "results.jsonl"), "--no-progress"],
                check=False,
            )
            if bench.returncode != 0:
                print(f"bench exited with {bench.returncode}")
                return bench.returncode
        except BaseException:
            print(log_path.read_text(errors="replace")[-3000:], file=sys.stderr)
            raise
        finally:
            proc.terminate()
            code = proc.wait(timeout=60)
            print(f"\nserver stopped (exit code {code})")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
