"""Local media files (images, videos), read only from below the configured directory."""

from __future__ import annotations

import os
import stat
from urllib.parse import unquote, urlsplit

from vlserve.errors import MediaError


def is_local_reference(url: str) -> bool:
    """True for ``file:`` URLs and absolute paths, the two spellings of a local file."""
    return url[:5].lower() == "file:" or url.startswith("/")


def read_local_file(url: str, root: str | None, max_bytes: int, what: str = "image") -> bytes:
    """The bytes of the regular file ``url`` names, if it resolves to a path below ``root``.

    Symlinks and ``..`` are resolved before the check, and the resolved path is the one opened
    (``O_NOFOLLOW``), so a link inside ``root`` cannot lead outside it. Blocking: call it in a
    worker thread. Raises only ``MediaError``; ``what`` ("image", "video") words its messages.
    """
    if root is None:
        raise MediaError(
            f"local {what} files are not allowed (the server was started without "
            "--allowed-local-media-path)"
        )
    path = _path_of(url)
    try:
        real_root = os.path.realpath(root)
        real_path = os.path.realpath(path)
        inside = os.path.commonpath([real_root, real_path]) == real_root
    except (OSError, ValueError):
        raise MediaError("not a valid local file path") from None
    if not inside or real_path == real_root:
        raise MediaError(f"local {what} file is outside the allowed media directory")
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(real_path, flags)
    except FileNotFoundError:
        raise MediaError(f"local {what} file not found") from None
    except OSError:
        raise MediaError(f"local {what} file could not be opened") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # a directory, FIFO or device
        os.close(fd)
        raise MediaError(f"local {what} path is not a regular file")
    with os.fdopen(fd, "rb") as file:
        try:
            data = file.read(max_bytes + 1)
        except OSError:
            raise MediaError(f"local {what} file could not be read") from None
    if len(data) > max_bytes:
        raise MediaError(f"{what} is larger than the {max_bytes} bytes allowed")
    return data


def _path_of(url: str) -> str:
    if url.startswith("/"):
        path = url
    else:
        try:
            parts = urlsplit(url)
            path = unquote(parts.path, errors="strict")
        except ValueError:  # a malformed netloc, or %-escapes that are not UTF-8
            raise MediaError("not a valid file URL") from None
        if parts.netloc not in ("", "localhost"):
            raise MediaError("file URLs must name a local path (file:///path)")
        if parts.query or parts.fragment:
            raise MediaError("file URLs may not carry a query or fragment")
    if not path.startswith("/") or "\x00" in path:
        raise MediaError("not a valid local file path")
    return path
