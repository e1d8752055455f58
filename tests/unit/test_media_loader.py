"""vlserve.media MediaLoader: routing by scheme, local files, several images, and fuzzing."""

from __future__ import annotations

import asyncio
import base64
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.conftest import mutate
from vlserve.errors import MediaError
from vlserve.media import MediaConfig, MediaLoader


def png_url(size: tuple[int, int] = (8, 6)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (0, 128, 0)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


async def _with_loader(config: MediaConfig, urls: Sequence[str], many: bool) -> Any:
    loader = MediaLoader(config)
    try:
        return await (loader.load_many(urls) if many else loader.load(urls[0]))
    finally:
        await loader.aclose()


def load(url: str, config: MediaConfig | None = None) -> Image.Image:
    return asyncio.run(_with_loader(config or MediaConfig(), [url], many=False))


def load_many(urls: Sequence[str], config: MediaConfig | None = None) -> list[Image.Image]:
    return asyncio.run(_with_loader(config or MediaConfig(), urls, many=True))


def message_of(url: str, config: MediaConfig | None = None) -> str:
    with pytest.raises(MediaError) as info:
        load(url, config)
    return info.value.message


# --- routing ------------------------------------------------------------------------------------


def test_data_url_loads_as_rgb() -> None:
    image = load(png_url((8, 6)))
    assert image.mode == "RGB" and image.size == (8, 6) and image.getpixel((0, 0)) == (0, 128, 0)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "image URL is empty"),
        ("ftp://example.com/a.png", "image URL scheme 'ftp' is not supported"),
        ("gopher://x", "image URL scheme 'gopher' is not supported"),
        ("javascript:alert(1)", "image URL scheme 'javascript' is not supported"),
        ("relative/a.png", "not a valid image URL"),
        (" http://example.com/a.png", "not a valid image URL"),
        ("1http://example.com/a.png", "not a valid image URL"),
        ("C:\\images\\a.png", "image URL scheme 'c' is not supported"),
        ("http://", "not a valid image URL"),
        ("data:image/png;base64,%%%%", "not a valid base64 data URL"),
    ],
)
def test_unusable_urls_are_refused_clearly(url: str, message: str) -> None:
    assert message in message_of(url)


def test_non_string_url_is_refused() -> None:
    assert message_of(None) == "image URL must be a string"  # type: ignore[arg-type]


# --- several images -----------------------------------------------------------------------------


def test_load_many_keeps_order() -> None:
    sizes = [(30, 10), (5, 5), (12, 40), (7, 3)]
    images = load_many([png_url(size) for size in sizes])
    assert [image.size for image in images] == sizes
    assert load_many([]) == []


def test_load_many_names_the_failing_image() -> None:
    with pytest.raises(MediaError) as info:
        load_many([png_url(), "data:image/png;base64,!!!!", "data:image/tiff;base64,AAAA"])
    assert info.value.message.startswith("image 2: not a valid base64 data URL")
    assert info.value.code == "invalid_image"


@pytest.mark.parametrize(("cache_bytes", "decodes"), [(1 << 20, 1), (0, 3)])
def test_the_same_bytes_are_decoded_once(
    monkeypatch: pytest.MonkeyPatch, cache_bytes: int, decodes: int
) -> None:
    import vlserve.media.loader as loader_module

    calls: list[int] = []
    real = loader_module.decode_image

    def counting(data: bytes, config: MediaConfig, **kwargs: Any) -> Image.Image:
        calls.append(len(data))
        return real(data, config, **kwargs)

    monkeypatch.setattr(loader_module, "decode_image", counting)
    url = png_url((20, 10))

    async def three_turns() -> list[Image.Image]:
        loader = MediaLoader(MediaConfig(decoded_cache_bytes=cache_bytes))
        try:
            return [await loader.load(url) for _ in range(3)]
        finally:
            await loader.aclose()

    images = asyncio.run(three_turns())
    assert len(calls) == decodes
    assert all(im.size == (20, 10) and im.mode == "RGB" for im in images)
    other = load_many([url, png_url((10, 20))], MediaConfig(decoded_cache_bytes=1 << 20))
    assert [im.size for im in other] == [(20, 10), (10, 20)]  # other bytes: another image


def test_the_same_video_is_decoded_once_per_sampling(monkeypatch: pytest.MonkeyPatch) -> None:
    """The next turn of a chat about one video skips decoding; another fps decodes again."""
    import vlserve.media.loader as loader_module
    from vlserve.testing.video import make_clip

    calls: list[float] = []
    real = loader_module.decode_video

    def counting(
        data: bytes, config: Any, fps: float = 2.0, max_frames: Any = None, **kwargs: Any
    ) -> Any:
        calls.append(fps)
        return real(data, config, fps, max_frames, **kwargs)

    monkeypatch.setattr(loader_module, "decode_video", counting)
    url = "data:video/mp4;base64," + base64.b64encode(make_clip(frames=40)).decode()

    async def turns() -> list[Any]:
        loader = MediaLoader(MediaConfig())
        limits = loader_module.video_limits(loader.config, 1)
        try:
            return [
                await loader.load(url, loader.video_kind(limits, fps, 64))
                for fps in (2.0, 2.0, 2.0, 1.0)
            ]
        finally:
            await loader.aclose()

    videos = asyncio.run(turns())
    assert calls == [2.0, 1.0]
    assert videos[0] is videos[1] is videos[2] and videos[0].key
    assert len(videos[3].frames) < len(videos[0].frames) and videos[3].key != videos[0].key


def test_image_count_is_capped() -> None:
    config = MediaConfig(max_images_per_request=2)
    with pytest.raises(MediaError, match="too many images: 3, at most 2 allowed per request"):
        load_many([png_url()] * 3, config)
    assert len(load_many([png_url()] * 2, config)) == 2


def test_decoding_does_not_block_the_event_loop() -> None:
    """A ticker keeps running while large images decode: the work is in worker threads."""

    async def scenario() -> int:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0)
                ticks += 1

        loader = MediaLoader(MediaConfig(max_image_pixels=10_000))
        task = asyncio.create_task(ticker())
        await loader.load_many([png_url((2000, 1500))] * 2)
        task.cancel()
        await loader.aclose()
        return ticks

    assert asyncio.run(scenario()) > 0


# --- local files --------------------------------------------------------------------------------


@pytest.fixture()
def media_root(tmp_path: Path) -> Path:
    root = tmp_path / "media"
    (root / "sub dir").mkdir(parents=True)
    Image.new("RGB", (9, 4), "red").save(root / "sub dir" / "a b.png")
    Image.new("RGB", (3, 3), "red").save(tmp_path / "secret.png")
    return root


def local_config(root: Path) -> MediaConfig:
    return MediaConfig(allowed_local_media_path=str(root))


def test_local_files_below_the_root_load(media_root: Path) -> None:
    config = local_config(media_root)
    path = media_root / "sub dir" / "a b.png"
    assert load(str(path), config).size == (9, 4)
    assert load(path.as_uri(), config).size == (9, 4)  # file:///.../sub%20dir/a%20b.png
    assert load("file://localhost" + str(path), config).size == (9, 4)


def test_local_files_are_refused_without_a_root(media_root: Path) -> None:
    path = str(media_root / "sub dir" / "a b.png")
    assert "--allowed-local-media-path" in message_of(path)


def test_local_files_outside_the_root_are_refused(media_root: Path) -> None:
    config = local_config(media_root)
    outside = "local image file is outside the allowed media directory"
    secret = media_root.parent / "secret.png"
    assert message_of(str(secret), config) == outside
    assert message_of(f"{media_root}/../secret.png", config) == outside
    assert message_of(f"{media_root}/sub%20dir/../../secret.png", config) != ""  # %-escapes literal
    assert message_of("file://" + str(media_root) + "/%2e%2e/secret.png", config) == outside
    assert message_of("/etc/passwd", config) == outside
    assert message_of(str(media_root), config) == outside
    # A sibling whose name starts with the root's name is not below the root.
    sibling = media_root.parent / (media_root.name + "-other")
    sibling.mkdir()
    Image.new("RGB", (2, 2)).save(sibling / "x.png")
    assert message_of(str(sibling / "x.png"), config) == outside


def test_symlinks_out_of_the_root_are_refused(media_root: Path) -> None:
    config = local_config(media_root)
    (media_root / "link.png").symlink_to(media_root.parent / "secret.png")
    (media_root / "linkdir").symlink_to(media_root.parent)
    outside = "local image file is outside the allowed media directory"
    assert message_of(str(media_root / "link.png"), config) == outside
    assert message_of(str(media_root / "linkdir" / "secret.png"), config) == outside
    (media_root / "inner.png").symlink_to(media_root / "sub dir" / "a b.png")
    assert load(str(media_root / "inner.png"), config).size == (9, 4)


def test_odd_local_paths_are_refused(media_root: Path) -> None:
    config = local_config(media_root)
    os.mkfifo(media_root / "fifo.png")
    assert message_of(str(media_root / "fifo.png"), config) == (
        "local image path is not a regular file"
    )
    assert message_of(str(media_root / "sub dir"), config) in (
        "local image path is not a regular file",
        "local image file could not be opened",
    )
    assert message_of(str(media_root / "missing.png"), config) == "local image file not found"
    assert "must name a local path" in message_of("file://otherhost/x.png", config)
    assert "query or fragment" in message_of(f"file://{media_root}/a.png?x=1", config)
    assert message_of(f"{media_root}/\x00.png", config) == "not a valid local file path"
    assert message_of(f"file://{media_root}/%ff.png", config) == "not a valid file URL"


def test_local_file_byte_cap(media_root: Path) -> None:
    big = media_root / "noise.png"
    Image.effect_noise((64, 64), 80).save(big)
    config = MediaConfig(allowed_local_media_path=str(media_root), max_image_bytes=1000)
    assert message_of(str(big), config) == "image is larger than the 1000 bytes allowed"


# --- fuzzing: the loader raises only MediaError, and never touches the network ------------------


async def _no_dns(host: str, port: int) -> list[str]:
    raise OSError("fuzzing: no lookups")


_PREFIXES = ["", "data:", "data:image/png;base64,", "http://", "https://", "file://", "/", "ftp:"]


def test_loader_fuzz_only_media_errors() -> None:
    # One loop and one loader for every example: the loader is long-lived in the server too.
    loop = asyncio.new_event_loop()
    loader = MediaLoader(MediaConfig(fetch_timeout_s=2.0), resolver=_no_dns)

    async def attempt(url: str) -> None:
        try:
            await loader.load(url)
        except MediaError as error:
            assert error.message and "Traceback" not in error.message

    @settings(max_examples=300, deadline=None)
    @given(prefix=st.sampled_from(_PREFIXES), text=st.text(max_size=80))
    def check(prefix: str, text: str) -> None:
        loop.run_until_complete(attempt(prefix + text))

    try:
        check()
    finally:
        loop.run_until_complete(loader.aclose())
        loop.close()


_VIDEO_PREFIXES = [
    "",
    "data:",
    "data:video/mp4;base64,",
    "data:video/webm;base64,",
    "data:image/png;base64,",
    "http://",
    "file://",
    "/",
]


def test_loader_fuzz_videos_only_media_errors() -> None:
    """The same shared path with the video kind: random URLs, and real clips mutated and cut,
    as data URLs, never give anything but MediaError (or a decoded video)."""
    from vlserve.media.video import DecodedVideo, VideoLimits
    from vlserve.testing.video import make_clip

    seeds = [
        make_clip(32, 24, frames=6),
        make_clip(16, 16, 6, codec="libvpx-vp9", container="webm"),
    ]
    loop = asyncio.new_event_loop()
    loader = MediaLoader(MediaConfig(fetch_timeout_s=2.0), resolver=_no_dns)
    kind = loader.video_kind(VideoLimits(max_pixels=256, deadline_s=5), fps=2.0, max_frames=4)

    async def attempt(url: str) -> None:
        try:
            video = await loader.load(url, kind)
        except MediaError as error:
            assert error.message and "Traceback" not in error.message
        else:
            assert isinstance(video, DecodedVideo) and 1 <= len(video.frames) <= 4

    @settings(max_examples=150, deadline=None)
    @given(prefix=st.sampled_from(_VIDEO_PREFIXES), text=st.text(max_size=80))
    def random_urls(prefix: str, text: str) -> None:
        loop.run_until_complete(attempt(prefix + text))

    @settings(max_examples=100, deadline=None)
    @given(
        seed=st.sampled_from(seeds),
        edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
        cut=st.integers(1, 10_000),
        mime=st.sampled_from(["video/mp4", "video/webm", "video/quicktime"]),
    )
    def mutated_clips(seed: bytes, edits: list[tuple[int, int]], cut: int, mime: str) -> None:
        payload = base64.b64encode(mutate(seed, edits, cut)).decode()
        loop.run_until_complete(attempt(f"data:{mime};base64,{payload}"))

    try:
        random_urls()
        mutated_clips()
    finally:
        loop.run_until_complete(loader.aclose())
        loop.close()


def test_a_cancelled_load_frees_its_decode_slot_when_the_decode_ends() -> None:
    async def scenario() -> Image.Image:
        loader = MediaLoader(MediaConfig(max_concurrent_decodes=1, max_image_pixels=10_000))
        try:
            abandoned = asyncio.create_task(loader.load(png_url((2000, 1500))))
            await asyncio.sleep(0.01)
            abandoned.cancel()  # the client went away mid-decode
            return await asyncio.wait_for(loader.load(png_url((4, 4))), 30)
        finally:
            await loader.aclose()

    assert asyncio.run(scenario()).size == (4, 4)


def test_slow_videos_never_hold_an_image_decode_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every video slot taken by decodes that have not finished: an image still loads at once
    (videos and images have their own worker slots)."""
    import threading

    import vlserve.media.loader as loader_module
    from vlserve.testing.video import make_clip

    release = threading.Event()
    real = loader_module.decode_video

    def stuck(
        data: bytes, config: Any, fps: float = 2.0, max_frames: Any = None, **kwargs: Any
    ) -> Any:
        release.wait(10)
        return real(data, config, fps, max_frames, **kwargs)

    monkeypatch.setattr(loader_module, "decode_video", stuck)
    clip = "data:video/mp4;base64," + base64.b64encode(make_clip()).decode()

    async def main() -> tuple[bool, Any]:
        loader = MediaLoader(MediaConfig(max_concurrent_decodes=1, max_concurrent_video_decodes=1))
        kind = loader.video_kind(loader_module.video_limits(loader.config, 1))
        try:
            videos = [asyncio.ensure_future(loader.load(clip, kind)) for _ in range(2)]
            image = await asyncio.wait_for(loader.load(png_url()), timeout=5)
            waiting = not any(v.done() for v in videos)
            release.set()
            await asyncio.gather(*videos)
            return waiting, image
        finally:
            release.set()
            await loader.aclose()

    waiting, image = asyncio.run(main())
    assert waiting and image.mode == "RGB"


# --- decoding memory (issue #22 item 3) ----------------------------------------------------------


def test_media_over_the_request_budget_are_refused_naming_the_item() -> None:
    config = MediaConfig(media_memory_mb=1, max_request_media_mb=1)
    message = message_of(png_url((700, 700)), config)  # about 4.2 MiB to decode
    assert message.startswith("decoding it needs about 5 MiB") and "--max-request-media-mb" in message
    with pytest.raises(MediaError) as info:  # 0.8 MiB each: fine alone, too much together
        load_many([png_url((300, 300)), png_url((300, 301))], config)
    assert info.value.code == "invalid_image"
    assert "more than the 1 MiB allowed per request" in info.value.message
    assert info.value.message.startswith(("image 1: ", "image 2: "))


def test_a_decode_waits_for_room_in_the_servers_budget() -> None:
    import threading

    async def scenario() -> tuple[bool, tuple[int, int], int]:
        loader = MediaLoader(MediaConfig(media_memory_mb=1, max_request_media_mb=1))
        try:
            loader.memory.acquire(1 << 20, threading.Event())  # other decodes hold it all
            task = asyncio.ensure_future(loader.load(png_url((300, 300))))
            await asyncio.sleep(0.3)
            waited = not task.done()  # it cannot finish: there is no room
            loader.memory.release(1 << 20)
            image = await asyncio.wait_for(task, 30)
            return waited, image.size, loader.memory.held
        finally:
            await loader.aclose()

    assert asyncio.run(scenario()) == (True, (300, 300), 0)


def test_a_full_budget_answers_429_after_the_wait() -> None:
    import threading

    from vlserve.errors import OverloadedError

    async def scenario() -> int:
        config = MediaConfig(media_memory_mb=1, max_request_media_mb=1, media_wait_timeout_s=0.2)
        loader = MediaLoader(config)
        try:
            loader.memory.acquire(1 << 20, threading.Event())
            with pytest.raises(OverloadedError, match="--media-memory-mb"):
                await loader.load_many([png_url((300, 300))])
            return loader.memory.held
        finally:
            await loader.aclose()

    assert asyncio.run(scenario()) == 1 << 20  # the refused decode holds nothing


def test_a_cancelled_load_stops_waiting_for_memory() -> None:
    import threading

    async def scenario() -> tuple[int, int]:
        loader = MediaLoader(MediaConfig(media_memory_mb=1, max_request_media_mb=1,
                                         max_concurrent_decodes=1))  # fmt: skip
        try:
            held = (1 << 20) - 4096  # room for a 4x4 image, not for 300x300
            loader.memory.acquire(held, threading.Event())
            waiting = asyncio.ensure_future(loader.load(png_url((300, 300))))
            await asyncio.sleep(0.1)
            # the client went away: its thread stops waiting (not after the 30 s wait) and
            # frees the only decode slot
            waiting.cancel()
            small = await asyncio.wait_for(loader.load(png_url((4, 4))), 10)
            return small.size[0], loader.memory.held - held
        finally:
            await loader.aclose()

    assert asyncio.run(scenario()) == (4, 0)


_IDLE_SCRIPT = """
import asyncio, base64, io, json
from PIL import Image
from vlserve.media import MediaConfig, MediaLoader

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

image = Image.linear_gradient("L").resize((4000, 4000)).convert("RGB")
buffer = io.BytesIO()
image.save(buffer, "PNG")
url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
del image, buffer

async def main():
    loader = MediaLoader(MediaConfig(decoded_cache_bytes=0))
    await loader.load(url)
    base = rss_mib()
    images = await loader.load_many([url, url])
    del images
    await asyncio.sleep(0.1)
    idle = rss_mib() - base
    await loader.aclose()
    return idle

print(json.dumps({"idle": asyncio.run(main())}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux's /proc")
def test_large_decodes_give_their_memory_back() -> None:
    """Two concurrent 4000x4000 PNG decodes (after a first one, so imports and the threads
    exist): the process's RSS is back where it was, not 104 MiB above it (glibc's arenas keep
    freed memory unless trimmed)."""
    import json
    import subprocess
    import sys

    src = str(Path(__file__).resolve().parents[2] / "src")
    out = subprocess.run(
        [sys.executable, "-c", _IDLE_SCRIPT],
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": src},
    ).stdout  # fmt: skip
    assert json.loads(out)["idle"] < 32


def test_decodes_waiting_for_memory_are_admitted_first_come_first_served() -> None:
    """A large decode waiting for room is not overtaken by a small one that would fit now: it
    would never get its turn while small ones keep arriving."""
    import threading

    from vlserve.media.budget import MediaMemory

    memory = MediaMemory(100, wait_s=30)
    memory.acquire(60, threading.Event())
    order: list[str] = []

    def take(name: str, nbytes: int) -> None:
        memory.acquire(nbytes, threading.Event())
        order.append(name)

    large = threading.Thread(target=take, args=("large", 80))
    large.start()
    while not memory.waiting:  # the large one is in line
        threading.Event().wait(0.01)
    small = threading.Thread(target=take, args=("small", 10))  # fits beside the 60 held
    small.start()
    threading.Event().wait(0.2)
    assert order == []  # the small one waits behind the large one
    memory.release(60)
    large.join(10)
    small.join(10)  # 80 held: the small one fits beside it
    assert order == ["large", "small"] and memory.held == 90
