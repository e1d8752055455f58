"""vlserve.media data-URL parsing and image decoding, on real images made with Pillow."""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.conftest import mutate
from vlserve.errors import MediaError
from vlserve.media import MediaConfig, decode_image, fit_within, parse_data_url
from vlserve.media.decode import decode_cost

CONFIG = MediaConfig()
MB = 1024 * 1024
SRC = str(Path(__file__).resolve().parents[2] / "src")


def encode(image: Image.Image, fmt: str, **save_args: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, followed by an empty IDAT: no pixel data at all."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def test_header_only_png_is_truncated_when_small() -> None:
    with pytest.raises(MediaError, match="truncated or corrupt"):
        decode_image(png_header_only(100, 100), CONFIG)


RED = Image.new("RGB", (40, 30), (255, 0, 0))
PNG = encode(RED, "PNG")


# --- data URLs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mime", "fmt"),
    [
        ("image/png", "png"),
        ("image/jpeg", "jpeg"),
        ("image/jpg", "jpeg"),
        ("image/webp", "webp"),
        ("image/gif", "gif"),
        ("image/bmp", "bmp"),
        ("IMAGE/PNG", "png"),
        ("image/png;name=a.png", "png"),
        ('image/png;name="a b.png"', "png"),
    ],
)
def test_data_url_accepts_allowed_types(mime: str, fmt: str) -> None:
    assert parse_data_url(data_url(PNG, mime), max_bytes=MB) == (fmt, PNG)


def test_data_url_scheme_and_base64_marker_are_case_insensitive() -> None:
    url = "DATA:image/png;BASE64," + base64.b64encode(PNG).decode()
    assert parse_data_url(url, max_bytes=MB) == ("png", PNG)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("data:image/png;base64", "no ','"),
        ("data:image/png," + "abcd", "only ';base64'"),
        ("data:;base64,abcd", "media type is missing"),
        ("data:image/png;x;base64,abcd", "parameter is malformed"),
        ("data:text/plain;base64,abcd", "'text/plain' is not an image"),
        ("data:image/tiff;base64,abcd", "image format 'tiff' is not allowed"),
        ("data:image/svg+xml;base64,abcd", "image format 'svg+xml' is not allowed"),
        ("data:image/png;base64,abc", "not standard padded base64"),
        ("data:image/png;base64,ab\ncd", "not standard padded base64"),
        ("data:image/png;base64,ab cd", "not standard padded base64"),
        ("data:image/png;base64,ab-_", "not standard padded base64"),
        ("data:image/png;base64,a=bc", "not standard padded base64"),
        ("data:image/png;base64,abé=", "not standard padded base64"),
        ("data:image/png;base64,", "image data is empty"),
        ("http://example.com/a.png", "must start with 'data:'"),
    ],
)
def test_data_url_refusals_are_clear(url: str, message: str) -> None:
    with pytest.raises(MediaError) as info:
        parse_data_url(url, max_bytes=MB)
    assert message in info.value.message
    assert "binascii" not in info.value.message and "Traceback" not in info.value.message


def test_data_url_too_large_is_refused_before_decoding() -> None:
    # 10 MB of characters that are not even base64: the size check must come first.
    with pytest.raises(MediaError, match="larger than the 1000 bytes allowed"):
        parse_data_url("data:image/png;base64," + "!" * 10_000_000, max_bytes=1000)
    exact = base64.b64encode(b"x" * 1000).decode()
    assert parse_data_url("data:image/png;base64," + exact, max_bytes=1000)[1] == b"x" * 1000
    over = base64.b64encode(b"x" * 1001).decode()
    with pytest.raises(MediaError, match="larger than"):
        parse_data_url("data:image/png;base64," + over, max_bytes=1000)


# --- decoding ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_each_allowed_format_decodes_to_rgb(fmt: str) -> None:
    image = decode_image(encode(RED, fmt), CONFIG)
    assert image.mode == "RGB" and image.size == (40, 30)
    red, green, blue = image.getpixel((20, 15))  # type: ignore[misc]
    assert red > 200 and green < 60 and blue < 60


@pytest.mark.parametrize(
    ("fmt", "name"), [("TIFF", "tiff"), ("ICO", "ico"), ("PPM", None), ("TGA", None)]
)
def test_other_formats_are_refused(fmt: str, name: str | None) -> None:
    with pytest.raises(MediaError) as info:
        decode_image(encode(RED, fmt), CONFIG)
    expected = f"image format '{name}' is not allowed" if name else "not a recognised image"
    assert expected in info.value.message


def test_svg_is_refused_by_name() -> None:
    svg = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>'
    with pytest.raises(MediaError, match="image format 'svg' is not allowed"):
        decode_image(svg, CONFIG)


def test_declared_png_that_is_tiff_is_refused_by_the_decoder() -> None:
    _, data = parse_data_url(data_url(encode(RED, "TIFF"), "image/png"), max_bytes=MB)
    with pytest.raises(MediaError, match="'tiff' is not allowed"):
        decode_image(data, CONFIG)


def test_decompression_bomb_is_refused_from_the_header() -> None:
    # No pixel data follows the header: a decode attempt would fail as "truncated" instead.
    with pytest.raises(MediaError) as info:
        decode_image(png_header_only(8000, 8000), CONFIG)
    assert info.value.message == "image is 8000x8000 pixels, more than the 50000000 allowed"


def test_bomb_above_pillows_own_limit_is_refused_cleanly() -> None:
    with pytest.raises(MediaError) as info:
        decode_image(png_header_only(30000, 30000), CONFIG)
    assert info.value.message == "image has 900000000 pixels, more than the 50000000 allowed"


def test_gif_bomb_header_is_refused() -> None:
    gif = bytearray(encode(Image.new("P", (2, 2)), "GIF"))
    gif[6:10] = struct.pack("<HH", 7500, 7500)  # logical screen size
    with pytest.raises(MediaError, match="7500x7500 pixels, more than the 50000000 allowed"):
        decode_image(bytes(gif), CONFIG)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_truncated_files_are_rejected(fmt: str) -> None:
    noisy = Image.effect_noise((64, 64), 80).convert("RGB")
    data = encode(noisy, fmt)
    with pytest.raises(MediaError, match="truncated or corrupt|not a recognised image"):
        decode_image(data[: len(data) // 2], CONFIG)


def test_corrupt_png_crc_is_rejected() -> None:
    data = bytearray(encode(Image.effect_noise((32, 32), 80), "PNG"))
    data[60] ^= 0xFF  # inside the IDAT chunk: its CRC no longer matches
    with pytest.raises(MediaError, match="truncated or corrupt|not a recognised image"):
        decode_image(bytes(data), CONFIG)


@pytest.mark.parametrize(
    "data", [b"", b"hello", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"\xff\xd8\xff", b"RIFF\0\0\0\0WEBP"]
)
def test_garbage_is_rejected(data: bytes) -> None:
    with pytest.raises(MediaError):
        decode_image(data, CONFIG)


def test_byte_cap_applies_to_decoder_input() -> None:
    with pytest.raises(MediaError, match="larger than the 100 bytes allowed"):
        decode_image(
            encode(Image.effect_noise((32, 32), 80), "PNG"), MediaConfig(max_image_bytes=100)
        )


def test_extreme_aspect_ratio_is_refused() -> None:
    with pytest.raises(MediaError, match="1000x2 pixels: its aspect ratio is above the 200"):
        decode_image(encode(Image.new("RGB", (1000, 2)), "PNG"), CONFIG)


def test_alpha_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (0, 0, 0, 128))  # half-transparent black
    image = decode_image(encode(rgba, "PNG"), CONFIG)
    assert image.mode == "RGB"
    assert image.getpixel((5, 5)) == (255, 255, 255)
    assert all(120 <= c <= 135 for c in image.getpixel((0, 0)))  # type: ignore[union-attr]


def test_palette_transparency_and_la_are_composited_on_white() -> None:
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    assert decode_image(encode(palette, "PNG", transparency=1), CONFIG).getpixel((0, 0)) == (
        255,
        255,
        255,
    )
    grey_alpha = Image.new("LA", (4, 4), (0, 0))
    assert decode_image(encode(grey_alpha, "PNG"), CONFIG).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_greyscale_keeps_its_brightness() -> None:
    image = decode_image(encode(Image.new("I;16", (4, 4), 40000), "PNG"), CONFIG)
    assert image.getpixel((0, 0)) == (156, 156, 156)  # 40000 / 256, not clipped to white


def test_cmyk_jpeg_becomes_rgb() -> None:
    image = decode_image(encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"), CONFIG)
    red, green, blue = image.getpixel((4, 4))  # type: ignore[misc]
    assert image.mode == "RGB" and red > 200 and green < 60 and blue < 60


def test_exif_orientation_is_applied() -> None:
    # Stored 40x20, left half red; orientation 6 means "rotate 90 degrees clockwise to view".
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    image = decode_image(encode(stored, "JPEG", exif=exif.tobytes(), quality=95), CONFIG)
    assert image.size == (20, 40)
    top = image.getpixel((10, 5))
    assert top[0] > 200 and top[2] < 60  # type: ignore[index]  # the red half is now on top


def test_animated_images_give_their_first_frame() -> None:
    frames = [Image.new("RGB", (16, 16), color) for color in ("red", "lime", "blue")]
    for fmt in ("GIF", "WEBP", "PNG"):
        data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50)
        assert Image.open(io.BytesIO(data)).n_frames == 3  # type: ignore[attr-defined]
        red, green, blue = decode_image(data, CONFIG).getpixel((8, 8))  # type: ignore[misc]
        assert red > 200 and green < 60 and blue < 60, fmt


def test_large_images_are_downsized_keeping_aspect() -> None:
    config = MediaConfig(max_image_pixels=10_000)
    image = decode_image(encode(Image.new("RGB", (400, 100)), "PNG"), config)
    assert image.size == (200, 50)
    small = decode_image(encode(Image.new("RGB", (100, 100)), "PNG"), config)
    assert small.size == (100, 100)


def test_large_jpeg_is_draft_decoded_to_the_same_target_size() -> None:
    config = MediaConfig(max_image_pixels=10_000)
    photo = Image.effect_noise((1203, 601), 60).convert("RGB")
    image = decode_image(encode(photo, "JPEG"), config)
    assert image.size == fit_within((1203, 601), 10_000)


def test_prototype_default_limit_downsizes_a_4k_frame() -> None:
    image = decode_image(encode(Image.new("RGB", (3840, 2160)), "PNG"), CONFIG)
    assert image.width * image.height <= 2_621_440
    assert abs(image.width / image.height - 3840 / 2160) < 0.01


@given(
    width=st.integers(1, 100_000),
    height=st.integers(1, 100_000),
    max_pixels=st.integers(1, 10_000_000),
)
@example(width=30000, height=150, max_pixels=2_621_440)
@example(width=150, height=30000, max_pixels=2_621_440)
@example(width=23000, height=115, max_pixels=2_621_440)
def test_fit_within_never_exceeds_and_never_upscales(
    width: int, height: int, max_pixels: int
) -> None:
    new_width, new_height = fit_within((width, height), max_pixels)
    assert 1 <= new_width <= width and 1 <= new_height <= height
    assert new_width * new_height <= max(max_pixels, 1)
    if width * height <= max_pixels:
        assert (new_width, new_height) == (width, height)
    elif min(new_width, new_height) > 1:  # never more elongated (the processor's 200:1 limit)
        ratio = max(width, height) / min(width, height)
        assert max(new_width, new_height) / min(new_width, new_height) <= ratio


@pytest.mark.parametrize("size", [(30000, 150), (150, 30000), (23000, 115), (29999, 150)])
def test_thin_images_within_the_ratio_stay_within_it_when_downsized(size: tuple[int, int]) -> None:
    image = decode_image(encode(Image.new("RGB", size), "PNG"), CONFIG)
    assert image.width * image.height <= CONFIG.max_image_pixels
    assert max(image.size) / min(image.size) <= 200


# --- fuzzing: only MediaError, whatever comes in -------------------------------------------------

_B64_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=-_ \n%é"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_parse_data_url_fuzz_arbitrary_text(text: str) -> None:
    for url in (text, "data:" + text, "data:image/png;base64," + text):
        try:
            fmt, data = parse_data_url(url, max_bytes=MB)
        except MediaError:
            continue
        assert fmt in {"png", "jpeg", "webp", "gif", "bmp"} and data


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=_B64_CHARS, max_size=64))
def test_parse_data_url_fuzz_near_base64(payload: str) -> None:
    try:
        _, data = parse_data_url("data:image/gif;base64," + payload, max_bytes=MB)
    except MediaError:
        return
    assert base64.b64encode(data).decode() == payload  # accepted only if it round-trips


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_parse_data_url_round_trips_any_bytes(data: bytes) -> None:
    url = data_url(data, "image/webp")
    if data:
        assert parse_data_url(url, max_bytes=MB) == ("webp", data)
    else:
        with pytest.raises(MediaError):
            parse_data_url(url, max_bytes=MB)


_SEEDS = [
    encode(Image.effect_noise((24, 16), 60).convert(mode), fmt)
    for fmt, mode in (
        ("PNG", "RGBA"),
        ("JPEG", "RGB"),
        ("WEBP", "RGB"),
        ("GIF", "P"),
        ("BMP", "RGB"),
    )
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.sampled_from(_SEEDS),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
    cut=st.integers(0, 10_000),
)
def test_decode_fuzz_mutated_real_images(
    seed: bytes, edits: list[tuple[int, int]], cut: int
) -> None:
    _decode_or_media_error(mutate(seed, edits, cut))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512))
def test_decode_fuzz_arbitrary_bytes(data: bytes) -> None:
    _decode_or_media_error(data)


def _decode_or_media_error(data: bytes) -> None:
    config = MediaConfig(max_image_pixels=256)
    try:
        image = decode_image(data, config)
    except MediaError:
        return
    assert image.mode == "RGB" and image.width * image.height <= 256


@pytest.mark.parametrize("payload", ["AB==", "AAB=", "0000001="])
def test_non_canonical_base64_padding_is_refused(payload: str) -> None:
    with pytest.raises(MediaError):
        parse_data_url("data:image/gif;base64," + payload, max_bytes=MB)


# --- decoding memory (issue #22 item 3) ----------------------------------------------------------

_PEAK_SCRIPT = """
import io, json, sys
from PIL import Image
from vlserve.media import MediaConfig, decode_image

def rss_mib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024

image = Image.linear_gradient("L").resize((4000, 4000))
if sys.argv[1] != "L":
    image = image.convert(sys.argv[1])
exif = Image.Exif()
exif[0x0112] = 6
buffer = io.BytesIO()
image.save(buffer, "PNG", exif=exif.tobytes())
data = buffer.getvalue()
del image, buffer
base = rss_mib("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
costs = []
out = decode_image(data, MediaConfig(), reserve=costs.append)
print(json.dumps({"peak": rss_mib("VmHWM") - base, "cost": costs[0] / 2**20, "size": out.size}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc")
@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_a_huge_image_peaks_within_its_reserved_cost(mode: str) -> None:
    """A 4000x4000 PNG with an EXIF rotation, downsized to 1619x1619: the process's peak RSS
    stays within the ``decode_cost`` reserved for it (plus the decoder's buffers). Before, the
    full-size image was copied by ``exif_transpose`` and greyscale converted to RGB at full
    size: L peaked at 118 MiB and RGB at 157, against costs of 40 and 86 (now 44 and 95)."""
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, mode],
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": SRC},
    ).stdout  # fmt: skip
    result = json.loads(out)
    assert result["size"] == [1619, 1619]  # rotated by 90 degrees: square either way
    assert result["peak"] <= result["cost"] + 24, result


def test_the_reserved_cost_follows_jpeg_draft_decoding() -> None:
    """A 4000x3000 JPEG for a 10,000-pixel budget is decoded by libjpeg at 1/8 scale: what it
    reserves is that (500x375), not the full size."""
    data = encode(Image.new("RGB", (4000, 3000), (10, 200, 30)), "JPEG")
    costs: list[int] = []
    image = decode_image(data, MediaConfig(max_image_pixels=10_000), reserve=costs.append)
    assert image.size == (114, 87)
    assert costs == [decode_cost("RGB", (500, 375), (114, 87))]
    assert costs[0] < 4000 * 3000  # a quarter of the full-size RGB pixels


def test_a_refusing_reserve_stops_the_decode() -> None:
    def refuse(nbytes: int) -> None:
        raise MediaError(f"no room for {nbytes}")

    with pytest.raises(MediaError, match="no room for"):
        decode_image(encode(Image.new("RGB", (64, 64)), "PNG"), CONFIG, reserve=refuse)
