"""Strict parsing of ``data:image/...;base64,...`` and ``data:video/...;base64,...`` URLs into
raw bytes."""

from __future__ import annotations

import base64
import binascii
import re

from vlserve.errors import MediaError
from vlserve.media.config import ALLOWED_FORMATS

# MIME subtypes clients send for the allowed formats, mapped to our format names.
_MIME_ALIASES: dict[str, str] = {
    "png": "png",
    "apng": "png",
    "jpeg": "jpeg",
    "jpg": "jpeg",
    "pjpeg": "jpeg",
    "webp": "webp",
    "gif": "gif",
    "bmp": "bmp",
    "x-bmp": "bmp",
    "x-ms-bmp": "bmp",
}
# Video MIME subtypes, mapped to the container names the messages use; the decoder sniffs the
# real container again (media/video.py).
_VIDEO_MIME: dict[str, str] = {
    "mp4": "mp4",
    "x-m4v": "mp4",
    "quicktime": "mov",
    "webm": "webm",
    "x-matroska": "mkv",
    "matroska": "mkv",
}
VIDEO_FORMATS: frozenset[str] = frozenset(_VIDEO_MIME.values())
# RFC 2045 token characters, the grammar of a MIME type and of its parameters.
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_MEDIA_TYPE = re.compile(rf"({_TOKEN})/({_TOKEN})")
_PARAMETER = re.compile(rf"{_TOKEN}=(?:{_TOKEN}|\"[^\"\\]*\")")
_NOT_BASE64 = "not a valid base64 data URL"


def parse_data_url(url: str, *, max_bytes: int, kind: str = "image") -> tuple[str, bytes]:
    """Return ``(format, data)`` of an image (or, with ``kind="video"``, a video) data URL,
    e.g. ``("png", b"\\x89PNG...")``.

    Strict: the media type must be an allowed type of ``kind``, the payload must be standard base64
    (no whitespace, no URL-safe alphabet, correct padding) and decode to at most ``max_bytes``.
    The declared type is only a first filter: the decoder checks the real format again.
    """
    if not url[:5].lower() == "data:":
        raise MediaError(f"{_NOT_BASE64}: it must start with 'data:'")
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise MediaError(f"{_NOT_BASE64}: there is no ',' before the data")
    media_format = _parse_header(header, kind)
    too_large = f"{kind} is larger than the {max_bytes} bytes allowed"
    # Refuse an oversized payload before decoding it: 4 base64 characters carry 3 bytes.
    if len(payload) > 4 * ((max_bytes + 2) // 3):
        raise MediaError(too_large)
    not_base64 = f"{_NOT_BASE64}: the data is not standard padded base64"
    # The length check refuses missing padding; validate=True refuses anything outside the
    # standard alphabet (whitespace included) and misplaced padding.
    if len(payload) % 4:
        raise MediaError(not_base64)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(not_base64) from None
    # Only the canonical spelling: nonzero bits before the padding ("AB==" vs "AA==") decode
    # to the same bytes, so a second spelling of one image is refused rather than normalised.
    if (
        payload.endswith("=")
        and base64.b64encode(data[-(len(data) % 3) :]).decode() != payload[-4:]
    ):
        raise MediaError(not_base64)
    if not data:
        raise MediaError(f"{kind} data is empty")
    if len(data) > max_bytes:
        raise MediaError(too_large)
    return media_format, data


def _parse_header(header: str, kind: str) -> str:
    """Check ``<kind>/<type>[;param=value]*;base64`` and return the format name."""
    parts = header.split(";")
    if len(parts) < 2 or parts[-1].lower() != "base64":
        raise MediaError(f"{_NOT_BASE64}: only ';base64' {kind} data URLs are accepted")
    match = _MEDIA_TYPE.fullmatch(parts[0])
    if match is None:
        raise MediaError(f"{_NOT_BASE64}: the media type is missing or malformed")
    if not all(_PARAMETER.fullmatch(p) for p in parts[1:-1]):
        raise MediaError(f"{_NOT_BASE64}: a media type parameter is malformed")
    declared, subtype = match.group(1).lower(), match.group(2).lower()
    if declared != kind:
        article = "an" if kind[0] in "aeiou" else "a"
        raise MediaError(
            f"data URL media type '{declared}/{subtype}' is not {article} {kind}"
            + (" (send videos as video_url parts)" if declared == "video" else "")
            + (" (send images as image_url parts)" if declared == "image" else "")
        )
    if kind == "video":
        video_format = _VIDEO_MIME.get(subtype)
        if video_format is None:
            allowed = ", ".join(sorted(VIDEO_FORMATS))
            raise MediaError(
                f"video format '{_printable(subtype)}' is not allowed (allowed: {allowed})"
            )
        return video_format
    image_format = _MIME_ALIASES.get(subtype)
    if image_format is None or image_format not in ALLOWED_FORMATS:
        raise MediaError(format_not_allowed(subtype))
    return image_format


def format_not_allowed(name: str) -> str:
    """The one wording for a refused format, shared by the data URL parser and the decoder."""
    allowed = ", ".join(sorted(ALLOWED_FORMATS))
    return f"image format '{_printable(name)}' is not allowed (allowed: {allowed})"


def _printable(text: str, limit: int = 32) -> str:
    # The name comes from the client: keep it short and free of control characters.
    cleaned = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return cleaned + ("..." if len(text) > limit else "")
