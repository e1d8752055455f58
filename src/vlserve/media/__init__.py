"""Untrusted image input (data URLs, http(s) URLs, allowed local files) → safe RGB PIL images."""

from __future__ import annotations

from vlserve.media.config import ALLOWED_FORMATS, MediaConfig
from vlserve.media.dataurl import parse_data_url
from vlserve.media.decode import decode_image, fit_within
from vlserve.media.loader import MediaLoader
from vlserve.media.netguard import is_public_address

__all__ = [
    "ALLOWED_FORMATS",
    "MediaConfig",
    "MediaLoader",
    "decode_image",
    "fit_within",
    "is_public_address",
    "parse_data_url",
]
