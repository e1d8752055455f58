"""vlserve.media MediaConfig validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vlserve.media import MediaConfig


def test_defaults_match_the_prototype() -> None:
    config = MediaConfig()
    assert config.max_image_pixels == 2_621_440
    assert config.allowed_local_media_path is None
    assert config.allowed_media_domains == ()
    assert config.allow_private_networks is False
    assert (config.max_video_frames, config.max_videos_per_request) == (64, 4)
    assert (config.max_video_bytes, config.video_pixel_budget) == (64 << 20, 25_165_824)


def test_a_count_of_zero_turns_a_kind_off() -> None:
    config = MediaConfig(max_images_per_request=0, max_videos_per_request=0)
    assert (config.max_images_per_request, config.max_videos_per_request) == (0, 0)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_image_pixels", 0, "max_image_pixels must be an integer >= 1"),
        ("max_image_pixels", 1.5, "max_image_pixels must be an integer"),
        ("max_image_pixels", True, "max_image_pixels must be an integer"),
        ("max_decode_pixels", -1, "max_decode_pixels must be an integer >= 1"),
        ("max_image_bytes", 0, "max_image_bytes must be an integer >= 1"),
        ("max_images_per_request", -1, "max_images_per_request must be an integer >= 0"),
        ("max_videos_per_request", -1, "max_videos_per_request must be an integer >= 0"),
        ("max_video_frames", 1, "max_video_frames must be an integer >= 2"),
        ("max_video_bytes", 0, "max_video_bytes must be an integer >= 1"),
        ("max_video_seconds", 0, "max_video_seconds must be a finite number > 0"),
        ("max_video_seconds", float("inf"), "max_video_seconds must be a finite number > 0"),
        ("video_pixel_budget", 8191, "video_pixel_budget must be an integer >= 8192"),
        ("video_decode_timeout_s", -1, "video_decode_timeout_s must be a finite number > 0"),
        ("max_concurrent_fetches", 0, "max_concurrent_fetches must be"),
        ("max_concurrent_decodes", 0, "max_concurrent_decodes must be"),
        ("max_concurrent_video_decodes", 0, "max_concurrent_video_decodes must be"),
        ("max_redirects", -1, "max_redirects must be an integer >= 0"),
        ("fetch_timeout_s", 0, "fetch_timeout_s must be a finite number > 0"),
        ("fetch_timeout_s", float("inf"), "fetch_timeout_s must be a finite number > 0"),
        ("fetch_timeout_s", float("nan"), "fetch_timeout_s must be a finite number > 0"),
        ("fetch_timeout_s", "10", "fetch_timeout_s must be a finite number > 0"),
        ("max_aspect_ratio", 0.5, "max_aspect_ratio must be >= 1"),
        ("allow_private_networks", 1, "allow_private_networks must be True or False"),
        ("allowed_local_media_path", "relative/dir", "must be absolute"),
        ("allowed_local_media_path", "/no/such/dir/anywhere", "is not an existing directory"),
        ("allowed_local_media_path", "", "non-empty string or None"),
        ("allowed_media_domains", "example.com", "not a string"),
        ("allowed_media_domains", ("*.example.com",), "'*.example.com' is not a host name"),
        ("allowed_media_domains", ("exa mple.com",), "is not a host name"),
        ("allowed_media_domains", ("",), "is not a host name"),
        ("allowed_media_domains", (None,), "is not a host name"),
    ],
)
def test_invalid_values_are_refused_with_the_field_name(
    field: str, value: Any, message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("*", r"\*")):
        MediaConfig(**{field: value})


def test_downsize_limit_may_not_exceed_decode_limit() -> None:
    with pytest.raises(ValueError, match="must not exceed max_decode_pixels"):
        MediaConfig(max_image_pixels=100, max_decode_pixels=99)


def test_domains_are_normalised(tmp_path: Path) -> None:
    config = MediaConfig(
        allowed_media_domains=["Images.Example.COM.", " cdn.example.org"],  # type: ignore[arg-type]
        allowed_local_media_path=str(tmp_path),
    )
    assert config.allowed_media_domains == ("images.example.com", "cdn.example.org")
    assert config.allowed_local_media_path == str(tmp_path)


def test_config_is_frozen() -> None:
    with pytest.raises(AttributeError):
        MediaConfig().max_image_pixels = 1  # type: ignore[misc]
