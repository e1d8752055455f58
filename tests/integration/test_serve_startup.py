"""`vlserve serve` refuses to start half-alive: a bad device or model exits at once, non-zero."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vlserve", "serve", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("device", "reason"),
    [
        ("npu", "torch_npu"),
        ("cuda", "no CUDA device is available"),
    ],
)
def test_unusable_device_exits_at_once(tiny_model_path: Path, device: str, reason: str) -> None:
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    r = _serve("--model", str(tiny_model_path), "--device", device)
    assert r.returncode == 3, r.stderr
    assert f"--device {device} was requested" in r.stderr and reason in r.stderr


def test_missing_model_directory_exits_2(tmp_path: Path) -> None:
    r = _serve("--model", str(tmp_path / "nope"), "--device", "cpu")
    assert r.returncode == 2
    assert "does not exist" in r.stderr
