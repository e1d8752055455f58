"""Local media files (images and videos) → data URLs, each file read and encoded once, before
any timing; the MIME type comes from the file's bytes (its suffix only when they say nothing)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Literal

MediaKind = Literal["image", "video"]

_MAGIC = (
    (b"\x89PNG", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF8", "image/gif"),
    (b"BM", "image/bmp"),
)
# ISO-BMFF (MP4 family) top-level boxes a file may start with; ftyp brands of still images.
_BMFF_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide")
_BMFF_IMAGE_BRANDS = {b"avif": "image/avif", b"avis": "image/avif"}
_BMFF_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"mif1", b"msf1")
_EBML = b"\x1a\x45\xdf\xa3"  # Matroska / WebM
_SUFFIX_MIME = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".mp4": "video/mp4",
    ".m4v": "video/mp4",
    ".mov": "video/quicktime",
    ".webm": "video/webm",
    ".mkv": "video/x-matroska",
    ".avi": "video/x-msvideo",
}
_DEFAULT_SUBTYPE = {"image": "png", "video": "mp4"}


class MediaInliner:
    """Local image and video paths → data URLs, each file read and encoded once."""

    def __init__(self, base_dir: str | None) -> None:
        self.base_dir = Path(base_dir).expanduser() if base_dir else None
        self._cache: dict[Path, str] = {}

    def inline(self, url: str, here: Path, kind: MediaKind = "image") -> str:
        """Keep data: and http(s): URLs; resolve a path (or ``file://`` URL) under base_dir, the
        JSONL's folder, then the working directory, and inline the file."""
        if url.startswith(("data:", "http://", "https://")):
            return url
        path = self.resolve(url.removeprefix("file://"), here, kind)
        cached = self._cache.get(path)
        if cached is None:
            data = path.read_bytes()
            encoded = base64.b64encode(data).decode("ascii")
            cached = f"data:{sniff_mime(data, path, kind)};base64,{encoded}"
            self._cache[path] = cached
        return cached

    def resolve(self, name: str, here: Path, kind: MediaKind = "image") -> Path:
        path = Path(name).expanduser()
        candidates = [path] if path.is_absolute() else []
        if not path.is_absolute():
            if self.base_dir is not None:
                candidates.append(self.base_dir / path)
            candidates += [here / path, path]
        for candidate in candidates:
            if candidate.is_file():
                return candidate.resolve()
        raise ValueError(f"{kind} not found: {name} (looked in {', '.join(map(str, candidates))})")


def sniff_mime(data: bytes, path: Path, kind: MediaKind = "image") -> str:
    """The MIME type of ``data``: from its signature, else from the suffix, else ``kind``'s
    default (PNG for images, MP4 for videos)."""
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return "video/x-msvideo"
    if data[4:8] in _BMFF_BOXES:
        return _bmff_mime(data)
    if data.startswith(_EBML):
        return "video/webm" if b"webm" in data[:64] else "video/x-matroska"
    suffix = path.suffix.lower()
    return _SUFFIX_MIME.get(suffix, f"{kind}/{suffix.lstrip('.') or _DEFAULT_SUBTYPE[kind]}")


def _bmff_mime(data: bytes) -> str:
    brand = data[8:12] if data[4:8] == b"ftyp" else b""
    if brand in _BMFF_IMAGE_BRANDS:
        return _BMFF_IMAGE_BRANDS[brand]
    if brand in _BMFF_HEIF_BRANDS:
        return "image/heic"
    return "video/quicktime" if brand == b"qt  " else "video/mp4"
