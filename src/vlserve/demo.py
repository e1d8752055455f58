"""`python -m vlserve.demo`: the whole job end to end on the tiny model, with timings.

Builds (or reuses) the tiny checkpoint, starts `vlserve serve`, sends a text, an image and a video
request through the official `openai` client (the image one streamed), runs `vlserve bench` on the bundled
sample dataset, prints everything, and stops the server.
"""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _image_url() -> str:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (448, 448), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((80, 80, 368, 368), fill=(220, 40, 40))
    draw.rectangle((180, 20, 268, 120), fill=(30, 90, 220))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _requests(base_url: str, model: str) -> None:
    import openai

    client = openai.OpenAI(base_url=base_url + "/v1", api_key="demo")
    t0 = time.perf_counter()
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is 2 plus 2?"}],
        max_tokens=24,
        temperature=0,
    )
    print(
        f"\n[text]  {time.perf_counter() - t0:.2f} s, usage {r.usage.model_dump()}, "
        f"finish_reason={r.choices[0].finish_reason}"
    )
    print(f"        answer: {r.choices[0].message.content!r}")
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Describe this image."},
                {"type": "image_url", "image_url": {"url": _image_url()}},
            ],
        }
    ]
    t0 = time.perf_counter()
    ttft = None
    pieces = []
    usage = None
    for chunk in client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=32,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            ttft = ttft or time.perf_counter() - t0
            pieces.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    print(
        f"[image] streamed, TTFT {ttft or 0:.3f} s, total {time.perf_counter() - t0:.2f} s, "
        f"usage {usage.model_dump() if usage else None}"
    )
    print(f"        answer: {''.join(pieces)!r}")
    _video_request(client, model)
    print("        (random weights: the words are noise; the plumbing is real)")


def _video_request(client, model: str) -> None:  # type: ignore[no-untyped-def]
    from vlserve.testing.video import make_clip

    clip = make_clip(320, 240, frames=120, fps=30, gradient=True)  # 4 s
    url = "data:video/mp4;base64," + base64.b64encode(clip).decode()
    t0 = time.perf_counter()
    r = client.chat.completions.create(
        model=model,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "video_url", "video_url": {"url": url}},
                    {"type": "text", "text": "What happens in this video?"},
                ],
            }
        ],
        max_tokens=24,
        temperature=0,
        extra_body={"mm_processor_kwargs": {"fps": 2}},
    )
    print(
        f"[video] 4 s 320x240 clip at 2 fps, {time.perf_counter() - t0:.2f} s, "
        f"usage {r.usage.model_dump() if r.usage else None}"
    )
    print(f"        answer: {r.choices[0].message.content!r}")


def main() -> int:
    from vlserve.testing import ensure_tiny_model
    from vlserve.testing.server import start_server, stop_server

    t0 = time.perf_counter()
    model_path = ensure_tiny_model()
    print(f"tiny Qwen3-VL checkpoint: {model_path} ({time.perf_counter() - t0:.1f} s)")
    with tempfile.TemporaryDirectory(prefix="vlserve-demo-") as tmp:
        t0 = time.perf_counter()
        server = start_server(model_path, Path(tmp), name="qwen3-vl-tiny")
        print(f"server ready on {server.base_url} after {time.perf_counter() - t0:.1f} s")
        try:
            _requests(server.base_url, server.model)
            print("\n[bench] vlserve bench on the bundled sample dataset:")
            bench = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "vlserve",
                    "bench",
                    "--dataset",
                    "sample",
                    "--url",
                    server.base_url,
                    "--model",
                    server.model,
                    "--max-tokens",
                    "16",
                    "--max-concurrency",
                    "4",
                    "--output",
                    str(Path(tmp) / "results.jsonl"),
                    "--no-progress",
                ],
                check=False,
            )
        except BaseException:
            print(server.log_tail(60), file=sys.stderr)
            raise
        finally:
            print(f"\nserver stopped (exit code {stop_server(server)})")
    if bench.returncode != 0:
        print(f"bench exited with {bench.returncode}")
    return bench.returncode


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
