"""Which accelerators this host (or container) shows, found without importing torch."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

from vlserve.errors import VLServeError

# The variable that pins a process to some devices, per device type.
VISIBLE_DEVICES_VAR: dict[str, str] = {
    "npu": "ASCEND_RT_VISIBLE_DEVICES",
    "cuda": "CUDA_VISIBLE_DEVICES",
}


def count_npus(dev_dir: Path = Path("/dev")) -> int:
    """NPUs passed into this container: one ``/dev/davinciN`` node each (``davinci_manager`` is not one)."""
    return sum(1 for p in _list_dir(dev_dir) if re.fullmatch(r"davinci\d+", p))


def count_gpus(dev_dir: Path = Path("/dev")) -> int:
    """NVIDIA GPUs: ``nvidia-smi -L`` lines, else ``/dev/nvidiaN`` nodes."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "-L"], capture_output=True, text=True, timeout=30, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            out = None
        if out is not None and out.returncode == 0:
            return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
    return sum(1 for p in _list_dir(dev_dir) if re.fullmatch(r"nvidia\d+", p))


def detect_device_type(dev_dir: Path = Path("/dev")) -> str:
    """``npu`` if any Ascend device is visible, else ``cuda`` if any NVIDIA GPU, else ``cpu``."""
    if count_npus(dev_dir):
        return "npu"
    if count_gpus(dev_dir):
        return "cuda"
    return "cpu"


def default_device_ids(
    device: str, env: Mapping[str, str], dev_dir: Path = Path("/dev")
) -> tuple[str, ...]:
    """One id per usable device, in the numbering the visible-devices variable expects.

    If the variable is already set (a scheduler or the container chose for us), its entries are
    the devices to use; otherwise the devices are numbered 0..n-1 as the runtime sees them.
    """
    if device == "cpu":
        return ()
    inherited = env.get(VISIBLE_DEVICES_VAR[device], "").strip()
    if inherited:
        return tuple(x.strip() for x in inherited.split(",") if x.strip())
    count = count_npus(dev_dir) if device == "npu" else count_gpus(dev_dir)
    if count == 0:
        raise VLServeError(f"--device {device}: no {device} devices visible on this host")
    return tuple(str(i) for i in range(count))


def parse_device_ids(text: str) -> tuple[str, ...]:
    """``"0,1,4-7"`` → ``("0", "1", "4", "5", "6", "7")``; duplicates are refused."""
    ids: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        m = re.fullmatch(r"(\d+)-(\d+)", part)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise ValueError(f"bad device range: {part}")
            ids += [str(i) for i in range(lo, hi + 1)]
        elif part.isdigit():
            ids.append(str(int(part)))
        else:
            raise ValueError(f"bad device id: {part!r} (want e.g. 0,1,4-7)")
    if len(set(ids)) != len(ids):
        raise ValueError(f"device listed twice: {text}")
    return tuple(ids)


def _list_dir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []
