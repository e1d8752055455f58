"""Image loading costs: event-loop stalls with and without worker threads, and JPEG draft decoding.

Prints two ratios:

* loop stall: the longest time the event loop could not run while 8 camera-size PNG data URLs
  were decoded on the loop itself (what a naive handler does) vs through ``MediaLoader``
  (worker threads). The loader's figure is what other requests see meanwhile.
* 12 MP JPEG: the prototype's path (full decode, ``convert("RGB")``, ``thumbnail``) vs
  ``decode_image`` (libjpeg draft at a reduced scale, then resize), both to MAX_IMAGE_PIXELS.

Usage: ``.venv/bin/python benchmarks/media_decode.py [--images 8] [--repeats 3] [--decodes 4]``
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import statistics
import time
from collections.abc import Awaitable, Callable

from PIL import Image

from vlserve.media import MediaConfig, MediaLoader, decode_image, parse_data_url


def photo(width: int, height: int, fmt: str) -> bytes:
    """A noisy picture (compresses like a photo, unlike a flat colour)."""
    image = Image.effect_noise((width // 4, height // 4), 40).convert("RGB").resize((width, height))
    buffer = io.BytesIO()
    image.save(buffer, fmt, quality=90) if fmt == "JPEG" else image.save(buffer, fmt)
    return buffer.getvalue()


async def max_stall_s(work: Callable[[], Awaitable[object]]) -> float:
    """The longest gap between ticks of a 1 ms ticker while ``work`` runs."""
    worst = 0.0
    running = True

    async def ticker() -> None:
        nonlocal worst
        last = time.perf_counter()
        while running:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            worst = max(worst, now - last)
            last = now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    await work()
    running = False
    await task
    return worst


async def stalls(urls: list[str], config: MediaConfig) -> tuple[float, float]:
    async def on_loop() -> None:
        for url in urls:
            decode_image(parse_data_url(url, max_bytes=config.max_image_bytes)[1], config)
            await asyncio.sleep(0)

    loader = MediaLoader(config)
    try:
        return await max_stall_s(on_loop), await max_stall_s(lambda: loader.load_many(urls))
    finally:
        await loader.aclose()


def prototype_decode(data: bytes, max_pixels: int) -> Image.Image:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    if image.width * image.height > max_pixels:
        image.thumbnail((int(max_pixels**0.5),) * 2)
    return image


def best_of(repeats: int, function: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decodes", type=int, default=MediaConfig().max_concurrent_decodes,
                        help="max_concurrent_decodes (fewer threads: shorter GIL stalls)")  # fmt: skip
    args = parser.parse_args()
    config = MediaConfig(max_concurrent_decodes=args.decodes)

    png = base64.b64encode(photo(1920, 1080, "PNG")).decode()
    urls = [f"data:image/png;base64,{png}"] * args.images
    results = [asyncio.run(stalls(urls, config)) for _ in range(args.repeats)]
    on_loop = statistics.median(r[0] for r in results)
    loader = statistics.median(r[1] for r in results)
    print(f"loop stall, {args.images} x 1920x1080 PNG, {args.decodes} decode threads: on the loop {on_loop * 1000:.1f} ms, "
          f"MediaLoader {loader * 1000:.1f} ms -> {on_loop / loader:.1f}x shorter")  # fmt: skip

    jpeg = photo(4000, 3000, "JPEG")
    ours = decode_image(jpeg, config)
    theirs = prototype_decode(jpeg, config.max_image_pixels)
    t_ours = best_of(args.repeats, lambda: decode_image(jpeg, config))
    t_theirs = best_of(args.repeats, lambda: prototype_decode(jpeg, config.max_image_pixels))
    print(f"4000x3000 JPEG -> prototype {theirs.size} in {t_theirs * 1000:.0f} ms, "
          f"decode_image {ours.size} in {t_ours * 1000:.0f} ms -> {t_theirs / t_ours:.1f}x faster")  # fmt: skip


if __name__ == "__main__":
    main()
