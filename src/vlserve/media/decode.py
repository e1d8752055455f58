"""Untrusted image bytes → one RGB PIL image, with format, pixel and aspect limits checked first."""

from __future__ import annotations

import contextlib
import io
import math
import re
from collections.abc import Callable

from PIL import Image, ImageOps

from vlserve.errors import MediaError, VLServeError
from vlserve.media.config import ALLOWED_FORMATS, MediaConfig
from vlserve.media.dataurl import format_not_allowed

# Pillow plugins tried when opening; no other decoder ever sees the bytes.
_PIL_PLUGINS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
# Image.format -> our format name (cameras write multi-picture JPEGs, which Pillow calls MPO).
_PIL_FORMATS: dict[str, str] = {
    "PNG": "png",
    "JPEG": "jpeg",
    "MPO": "jpeg",
    "WEBP": "webp",
    "GIF": "gif",
    "BMP": "bmp",
}
# Signatures of formats we refuse, only to word the refusal: (offset, magic, name).
_REFUSED_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"II*\x00", "tiff"),
    (0, b"MM\x00*", "tiff"),
    (0, b"II+\x00", "tiff"),
    (0, b"MM\x00+", "tiff"),
    (0, b"8BPS", "psd"),
    (0, b"%PDF", "pdf"),
    (0, b"%!PS", "postscript"),
    (0, b"\x00\x00\x01\x00", "ico"),
    (0, b"icns", "icns"),
    (0, b"\xff\x4f\xff\x51", "jpeg2000"),
    (0, b"\x00\x00\x00\x0cjP  ", "jpeg2000"),
    (0, b"\xff\x0a", "jpegxl"),
    (0, b"\x00\x00\x00\x0cJXL ", "jpegxl"),
    (0, b"DDS ", "dds"),
    (0, b"qoif", "qoi"),
    (0, b"gimp xcf", "xcf"),
    (0, b"\x76\x2f\x31\x01", "openexr"),
    (0, b"#?RADIANCE", "hdr"),
    (4, b"ftypavif", "avif"),
    (4, b"ftypavis", "avif"),
    (4, b"ftypheic", "heic"),
    (4, b"ftypheix", "heic"),
    (4, b"ftypmif1", "heif"),
)
_WHITE = (255, 255, 255)
_ORIENTATION = 0x0112  # the EXIF tag


def decode_image(
    data: bytes, config: MediaConfig, *, reserve: Callable[[int], None] | None = None
) -> Image.Image:
    """Decode ``data`` into an RGB image of at most ``config.max_image_pixels`` pixels.

    Only PNG, JPEG, WebP, GIF and BMP are decoded; the pixel count and aspect ratio are read
    from the header and refused before any pixel is decoded; animated images give their first
    frame; EXIF orientation is applied; alpha is composited on white. ``reserve`` is called
    with ``decode_cost`` before any pixel is decoded (the loader's memory budget; it may wait,
    or raise). Blocking and CPU-bound: call it in a worker thread. Raises ``MediaError``, and
    whatever ``reserve`` raises.
    """
    if not data:
        raise MediaError("image data is empty")
    if len(data) > config.max_image_bytes:
        raise MediaError(f"image is larger than the {config.max_image_bytes} bytes allowed")
    image = _open(data, config.max_decode_pixels)
    try:
        _check_header(image, config)
        target = fit_within(image.size, config.max_image_pixels)
        if target != image.size:
            # JPEG only: let libjpeg decode at 1/2, 1/4 or 1/8 scale, never below target.
            image.draft(None, target)
        if reserve is not None:
            reserve(decode_cost(image.mode, image.size, target))
        image.load()
    except VLServeError:
        raise
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, struct.error, ...
        raise MediaError("image data is truncated or corrupt") from exc
    try:
        return _normalise(image, target)
    except Exception as exc:
        raise MediaError("image data could not be converted to RGB") from exc


def decode_cost(mode: str, size: tuple[int, int], target: tuple[int, int]) -> int:
    """Bytes decoding an image of ``mode`` and ``size`` (after JPEG draft scaling) down to
    ``target`` holds at its peak, with Pillow's 4 bytes a pixel for every mode but L and P:
    the decoded pixels, one full-size copy where the mode is converted or alpha premultiplied
    before resizing, the 1/4-size intermediate of ``reduce`` and the result (7000x7000 RGB PNG:
    255 MB; measured 266 MiB peak RSS, benchmarks/media_memory.py)."""
    pixels = size[0] * size[1]
    stored = 1 if mode in ("L", "P", "1") else 4
    copies = 0 if mode in ("RGB", "L") else 1
    return pixels * stored + pixels * 4 * copies + pixels + target[0] * target[1] * 4


def fit_within(size: tuple[int, int], max_pixels: int) -> tuple[int, int]:
    """The largest size with about the aspect ratio of ``size`` and at most ``max_pixels``
    pixels, never more elongated than ``size``: the short side is rounded up and the long side
    down (flooring both turned a 30000x150 image, 200:1, into 22897x114, 200.85:1, which the
    model's processor refuses)."""
    width, height = size
    if width * height <= max_pixels:
        return size
    scale = math.sqrt(max_pixels / (width * height))
    long_side, short_side = max(width, height), min(width, height)
    new_short = min(max(1, math.ceil(short_side * scale)), short_side)
    new_long = max(1, min(math.floor(long_side * scale), max_pixels // new_short))
    if new_long < new_short:  # max_pixels below new_short: a sliver, square at worst
        new_short = new_long = max(1, min(new_short, math.isqrt(max_pixels)))
    return (new_long, new_short) if width >= height else (new_short, new_long)


def _open(data: bytes, max_pixels: int) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data), formats=_PIL_PLUGINS)
    except Image.DecompressionBombError as exc:
        # Pillow's own, process-wide limit (about 179M pixels) fired before ours could: its
        # message carries the pixel count, ours must not carry its wording.
        found = re.search(r"\((\d+) pixels\)", str(exc))
        count = f"{int(found.group(1))} pixels" if found else "too many pixels"
        raise MediaError(f"image has {count}, more than the {max_pixels} allowed") from None
    except Exception:  # UnidentifiedImageError, or a plugin choking on a broken header
        refused = _sniff_refused_format(data)
        if refused is not None:
            raise MediaError(format_not_allowed(refused)) from None
        allowed = ", ".join(sorted(ALLOWED_FORMATS))
        raise MediaError(f"image data is not a recognised image (allowed: {allowed})") from None
    if _PIL_FORMATS.get(image.format or "") not in ALLOWED_FORMATS:
        raise MediaError(format_not_allowed(str(image.format).lower()))
    return image


def _check_header(image: Image.Image, config: MediaConfig) -> None:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise MediaError(f"image is {width}x{height} pixels: it has no pixels")
    if width * height > config.max_decode_pixels:
        raise MediaError(
            f"image is {width}x{height} pixels, more than the {config.max_decode_pixels} allowed"
        )
    ratio = max(width, height) / min(width, height)
    if ratio > config.max_aspect_ratio:
        raise MediaError(
            f"image is {width}x{height} pixels: its aspect ratio is above the "
            f"{config.max_aspect_ratio:g} allowed"
        )


def _normalise(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    """Size, mode, alpha and orientation, each step on as few pixels as it can: L and RGB are
    resized before anything else (no full-size copy), other modes become RGB or RGBA first
    (Pillow resizes alpha premultiplied), then alpha is composited on white and the EXIF
    orientation applied to the small image (``exif_transpose`` copied the full-size one).

    ``target`` is the final size computed from the header, in stored orientation: JPEG draft
    decoding may have shrunk the image already, and the result must not depend on that.
    """
    orientation = _exif_orientation(image)
    if image.mode not in ("L", "RGB"):
        image = _to_rgb_or_rgba(image)
    if image.size != target:
        image = image.resize(target, Image.Resampling.BICUBIC, reducing_gap=2.0)
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, _WHITE)
        background.paste(image, mask=image.getchannel("A"))
        image = background
    elif image.mode != "RGB":
        image = image.convert("RGB")
    if orientation not in (None, 1):
        image.getexif()[_ORIENTATION] = orientation
        # A broken EXIF block leaves the pixels intact: keep them as stored.
        with contextlib.suppress(Exception):
            image = ImageOps.exif_transpose(image)
    return image


def _exif_orientation(image: Image.Image) -> int | None:
    """The EXIF orientation tag, None without one (or with a broken EXIF block)."""
    try:
        return image.getexif().get(_ORIENTATION)
    except Exception:
        return None


def _to_rgb_or_rgba(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "I" or mode.startswith("I;16"):
        # 16-bit greyscale PNG: scale to 8 bits (a plain convert would clip it to white).
        image = image.convert("I").point(lambda v: v * (1 / 256)).convert("L")
        mode = "L"
    has_alpha = "A" in mode or "a" in mode or "transparency" in image.info
    if has_alpha:
        return image if mode == "RGBA" else image.convert("RGBA")
    return image if mode == "RGB" else image.convert("RGB")


def _sniff_refused_format(data: bytes) -> str | None:
    for offset, magic, name in _REFUSED_MAGIC:
        if data[offset : offset + len(magic)] == magic:
            return name
    head = data[:256].lstrip().lower()
    if head.startswith((b"<svg", b"<?xml")) and b"<svg" in data[:4096].lower():
        return "svg"
    return None
