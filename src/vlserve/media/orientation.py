"""How players show a decoded video frame: the display matrix's quarter turns and mirror."""

from __future__ import annotations

import contextlib
import struct
from typing import Any

import numpy as np

try:
    from av.sidedata.sidedata import SideDataContainer as _SideDataContainer
except ImportError:  # pragma: no cover - a PyAV without it: the frame's own (cached) container
    _SideDataContainer = None  # type: ignore[assignment,misc]

__all__ = ["orientation", "upright"]

# The display matrix's rotation part (signs of a, b, c, d) -> quarter turns counter-clockwise
_QUARTER_TURNS = {(1, 0, 0, 1): 0, (0, -1, 1, 0): 1, (-1, 0, 0, -1): 2, (0, 1, -1, 0): 3}


def orientation(frame: Any) -> tuple[int, bool]:
    """How players show a decoded frame, as FFmpeg's autorotate does: ``(turns, mirrored)``,
    turn it ``turns`` quarter turns counter-clockwise, then mirror it left to right. From the
    display matrix in its side data (phones store portrait video as landscape frames and -90;
    a front camera may store a mirror); only quarter turns and mirrors, any other matrix is
    left as stored. Without the matrix bytes (older PyAV), its rotation angle alone."""
    # by name: PyAV 19's side data iterates over types, 18's over the data itself
    side_data = _side_data(frame)
    matrix = bytes(side_data["DISPLAYMATRIX"]) if "DISPLAYMATRIX" in side_data else None
    if matrix is None or len(matrix) != 36:
        rotation = frame.rotation or 0
        turns = round(rotation / 90)
        return (turns % 4, False) if abs(rotation - 90 * turns) <= 2 else (0, False)
    values = struct.unpack("<9i", matrix)
    entries = [values[i] / 65536 for i in (0, 1, 3, 4)]  # a, b, c, d: 16.16 fixed point
    a, b, c, d = signs = tuple(round(x) for x in entries)
    if any(abs(x - s) > 0.02 for x, s in zip(entries, signs, strict=True)):
        return 0, False
    # a mirror after the rotation negates the matrix's first column: undo it to read the turns
    mirrored = a * d - b * c < 0
    turns = _QUARTER_TURNS.get((-a, b, -c, d) if mirrored else signs)
    return (0, False) if turns is None else (turns, mirrored)


def _side_data(frame: Any) -> Any:
    """The frame's side data, in a container the frame does not keep. ``frame.side_data`` caches
    its container on the frame, and the container points back at it: a reference cycle that
    only the cyclic collector frees, so every sampled source frame (52 MB of YUV at 5888x5888)
    stayed in memory long after its request (benchmarks/media_memory.py). Where PyAV cannot
    build a free-standing container, the cached one."""
    if _SideDataContainer is not None:
        with contextlib.suppress(TypeError):  # a PyAV whose constructor differs
            return _SideDataContainer(frame)
    return frame.side_data


def upright(frame: np.ndarray, turns: int, mirrored: bool = False) -> np.ndarray:
    """``frame`` (rows, columns, channels) turned ``turns`` quarter turns counter-clockwise,
    then mirrored left to right; the frame itself when neither."""
    if turns % 4 == 0 and not mirrored:
        return frame
    out = np.rot90(frame, turns % 4)  # counter-clockwise
    return np.ascontiguousarray(out[:, ::-1] if mirrored else out)
