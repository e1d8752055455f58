"""Host memory of decoding hostile-size media: peak and idle RSS, each case in a fresh process.

tracemalloc misses C allocations (libjpeg, zlib, FFmpeg), so each case runs in a child process
that resets its peak (``/proc/self/clear_refs``), loads the media through ``MediaLoader`` (data
URLs, worker threads, as the server does) and reports ``VmHWM`` (peak RSS) and ``VmRSS`` (idle,
once the results are dropped), all minus the RSS before loading. The decoded-media cache is off,
so "idle" is what the process keeps of memory it no longer uses.

Cases (issue #22 item 3): one 5888x5888 H.264 clip of 16 frames; two concurrent requests of 4
such clips; four and six 7000x7000 PNGs in one request; one 7000x7000 JPEG.

``--server``: the same shapes sent to a real ``vlserve serve`` on the tiny model (the decoded-
media cache on, the PNGs all different), and the server's RSS after each step, its peak, and
its memory gauges from /metrics at the end.

Usage: ``.venv/bin/python benchmarks/media_memory.py [--cases video1,video2x4,png6,jpeg]
[--server]`` (about a minute on 2 cores: the clip is encoded once, into a temporary folder).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CASES = ("video1", "video2x4", "png4", "png6", "jpeg")


def rss_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def make_inputs(folder: Path) -> None:
    from PIL import Image

    from vlserve.testing.video import make_clip

    if not (folder / "clip.mp4").exists():
        (folder / "clip.mp4").write_bytes(make_clip(5888, 5888, 16, 8, gradient=False))
    for fmt in ("PNG", "JPEG"):
        path = folder / f"big.{fmt.lower()}"
        if not path.exists():
            image = Image.linear_gradient("L").resize((7000, 7000)).convert("RGB")
            buffer = io.BytesIO()
            image.save(buffer, fmt)
            path.write_bytes(buffer.getvalue())


def data_url(path: Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


async def load_case(case: str, folder: Path) -> str:
    from vlserve.api.chat import MediaRef
    from vlserve.api.multimodal import load_parts
    from vlserve.media import MediaConfig, MediaLoader

    loader = MediaLoader(MediaConfig(decoded_cache_bytes=0))
    video = MediaRef("video", data_url(folder / "clip.mp4", "video/mp4"), "v")
    png = MediaRef("image", data_url(folder / "big.png", "image/png"), "i")
    jpeg = MediaRef("image", data_url(folder / "big.jpeg", "image/jpeg"), "i")
    requests = {
        "video1": [[video]],
        "video2x4": [[video] * 4, [video] * 4],
        "png4": [[png] * 4],
        "png6": [[png] * 6],
        "jpeg": [[jpeg]],
    }[case]
    try:
        results = await asyncio.gather(
            *(load_parts(loader, refs, None) for refs in requests), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        del results
        return f"refused: {errors[0]}" if errors else "loaded"
    finally:
        await loader.aclose()


def child(case: str, folder: Path) -> None:
    import ctypes

    import av  # noqa: F401  (imports before the baseline)
    import PIL.Image  # noqa: F401

    import vlserve.api.multimodal  # noqa: F401

    asyncio.run(asyncio.sleep(0))  # imports and the event loop's own memory before the baseline
    base = rss_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset VmHWM to the current RSS
    outcome = asyncio.run(load_case(case, folder))
    idle = rss_mib("VmRSS")
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    print(json.dumps({
        "peak": rss_mib("VmHWM") - base, "idle": idle - base, "trimmed": rss_mib("VmRSS") - base,
        "outcome": outcome[:70],
    }))  # fmt: skip


def server_run(folder: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from PIL import Image

    from vlserve.testing import ensure_tiny_model
    from vlserve.testing.server import start_server, stop_server

    def png(i: int) -> dict:
        image = Image.linear_gradient("L").resize((7000, 7000)).convert("RGB")
        image.putpixel((i, i), (255, 0, 0))  # ten different images: no cache hits
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        url = f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"
        return {"type": "image_url", "image_url": {"url": url}}

    pngs = [png(i) for i in range(10)]
    clip = {"type": "video_url", "video_url": {"url": data_url(folder / "clip.mp4", "video/mp4")}}
    steps = [
        ("1 clip", [[clip]]),
        ("2 x 4 clips", [[clip] * 4] * 2),
        ("6 PNGs", [pngs[:6]]),
        ("2 x 2 PNGs", [pngs[6:8], pngs[8:10]]),
    ]
    server = start_server(ensure_tiny_model(), folder / "server")
    pid = server.proc.pid

    def status(field: str) -> float:
        with open(f"/proc/{pid}/status") as lines:
            return next(int(x.split()[1]) / 1024 for x in lines if x.startswith(field + ":"))

    def post(parts: list[dict]) -> int:
        content = [{"type": "text", "text": "x"}, *parts]
        body = {"model": server.model, "max_tokens": 1,
                "messages": [{"role": "user", "content": content}]}  # fmt: skip
        url = server.base_url + "/v1/chat/completions"
        return httpx.post(url, json=body, timeout=600).status_code

    try:
        start = status("VmRSS")
        print(f"server RSS at start {start:.0f} MiB; after each step (MiB above the start):")
        for name, requests in steps:
            with ThreadPoolExecutor(len(requests)) as pool:
                codes = list(pool.map(post, requests))
            print(f"  {name:<12} statuses {codes}: RSS +{status('VmRSS') - start:.0f}, "
                  f"peak +{status('VmHWM') - start:.0f}")  # fmt: skip
        metrics = httpx.get(server.base_url + "/metrics").text.splitlines()
        for line in metrics:
            if line.startswith(("vlserve_cache_bytes{", "vlserve_media_decoding_bytes ")):
                name, value = line.rsplit(" ", 1)
                print(f"  {name} {float(value) / 2**20:.0f} MiB")
    finally:
        stop_server(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--server", action="store_true", help="against a real tiny-model server")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, Path(args.folder))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_inputs(folder)
        if args.server:
            server_run(folder)
            return
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        print(f"{'case':<10} {'peak MiB':>9} {'idle MiB':>9} {'after malloc_trim':>18}  outcome")
        for case in args.cases.split(","):
            out = subprocess.run(
                [sys.executable, __file__, "--child", case, "--folder", str(folder)],
                check=True, capture_output=True, text=True, env=env,
            ).stdout  # fmt: skip
            r = json.loads(out.strip().splitlines()[-1])
            print(f"{case:<10} {r['peak']:>9.0f} {r['idle']:>9.0f} {r['trimmed']:>18.0f}  "
                  f"{r['outcome']}")  # fmt: skip


if __name__ == "__main__":
    main()
