"""Video decoding: PyAV (``vlserve.media.video``) vs torchcodec, on clips made here with PyAV.

Prints three tables:

* short clip (4 s, 320x240, 30 fps, H.264): sampling 2 fps (8 frames), best of ``--repeats``;
* long clip (``--long-minutes`` of 96x64 at 10 fps, a keyframe every 2 s): sampling 2 fps capped to
  64 frames, by seeking (``decode_video``) vs decoding every frame; "frames decoded" is the cost;
* hostile inputs: what each decoder does with them, and how fast.

torchcodec needs FFmpeg's shared libraries from the system (4 to 8); without them its rows say
"unavailable". No ffmpeg binary is run. Usage:
``.venv/bin/python benchmarks/video_decode.py [--repeats 5] [--long-minutes 20]``
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from media_decode import best_of

from vlserve.testing.video import make_audio, make_clip, patch_box


def hostile_inputs(clip: bytes) -> list[tuple[str, bytes]]:
    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    gif = io.BytesIO()
    Image.new("P", (8, 8)).save(gif, "GIF")
    trak = [b"moov", b"trak", b"mdia"]
    return [
        ("random bytes", np.random.default_rng(0).bytes(64 * 1024)),
        ("random bytes after 'ftyp'", b"\x00\x00\x00\x18ftypisom" + bytes(range(256)) * 64),
        ("empty", b""),
        ("truncated (half)", clip[: len(clip) // 2]),
        (
            "frame count 2^31 (stts)",
            patch_box(clip, [*trak, b"minf", b"stbl", b"stts"], 8, 2**31 - 1),
        ),
        ("time base 1/1 s (mdhd)", patch_box(clip, [*trak, b"mdhd"], 12, 1)),
        ("audio only (AAC in MP4)", make_audio("mp4")),
        ("PNG image", png.getvalue()),
        ("GIF image", gif.getvalue()),
        ("6144x6144 H.264 frame", make_clip(6144, 6144, 1, 10, gradient=True)),
        ("4-s clip, 10 kB byte limit", clip),
    ]


def outcome(function: Callable[[], object]) -> str:
    start = time.perf_counter()
    try:
        function()
        what = "decoded"
    except Exception as exc:
        kind = "MediaError" if type(exc).__name__ == "MediaError" else type(exc).__name__
        text = getattr(exc, "message", None) or str(exc)
        what = f"{kind}: {text.splitlines()[0][:60] if text else ''}"
    return f"{(time.perf_counter() - start) * 1000:7.1f} ms  {what}"


# --- PyAV (this process) -----------------------------------------------------------------------


def pyav_decode_all(data: bytes, fps: float, max_frames: int) -> int:
    """The naive path: decode every frame, convert the sampled ones; returns frames decoded."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        wanted = min(int(float(stream.duration * stream.time_base) * fps), max_frames)
        keep = set(np.linspace(0, stream.frames - 1, wanted).round().astype(int).tolist())
        count = 0
        for index, frame in enumerate(container.decode(stream)):
            if index in keep:
                frame.to_ndarray(format="rgb24")
            count += 1
        return count


def run_pyav(clips: dict[str, bytes], args: argparse.Namespace) -> dict[str, object]:
    from vlserve.media.video import VideoLimits, decode_video

    limits, short, long_clip, cap = VideoLimits(), clips["short"], clips["long"], args.max_frames
    results: dict[str, object] = {}
    results["short_seek"] = best_of(args.repeats, lambda: decode_video(short, limits, 2.0))
    results["short_all"] = best_of(args.repeats, lambda: pyav_decode_all(short, 2.0, 64))
    ours = decode_video(long_clip, limits, 2.0, cap)
    results["long_seek"] = best_of(1, lambda: decode_video(long_clip, limits, 2.0, cap))
    results["long_seek_frames"] = ours.frames_decoded
    results["long_total"] = ours.total_num_frames
    counted: list[int] = []
    results["long_all"] = best_of(1, lambda: counted.append(pyav_decode_all(long_clip, 2.0, cap)))
    results["long_all_frames"] = counted[0]
    results["short_seconds"] = list(decode_video(short, limits, 2.0).timestamps)
    results["long_seconds"] = list(ours.timestamps)
    tiny = VideoLimits(max_bytes=10_000)
    results["hostile"] = [
        outcome(lambda d=data, c=(tiny if "limit" in name else limits): decode_video(d, c))
        for name, data in hostile_inputs(short)
    ]
    return results


# --- torchcodec (a child process that never loads PyAV's FFmpeg) --------------------------------
# Loading both FFmpeg builds in one process slowed PyAV 2-3x: each is measured alone.


def torchcodec_child(folder: Path) -> None:
    from torchcodec.decoders import VideoDecoder

    seconds = json.loads((folder / "seconds.json").read_text())

    def sample(data: bytes, times: list[float], mode: str) -> None:
        VideoDecoder(data, seek_mode=mode, num_ffmpeg_threads=1).get_frames_played_at(times)

    try:
        sample((folder / "short.mp4").read_bytes(), [0.0], "exact")
    except Exception as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"}))
        return
    out: dict[str, object] = {}
    repeats = int(seconds["repeats"])
    for mode in ("exact", "approximate"):
        for name in ("short", "long"):
            data = (folder / f"{name}.mp4").read_bytes()
            times = seconds[name]
            n = repeats if name == "short" else 1
            out[f"{name}_{mode}"] = best_of(n, lambda d=data, t=times, m=mode: sample(d, t, m))
    out["hostile"] = [
        outcome(lambda p=path: sample(p.read_bytes(), [0.0], "approximate"))
        for path in sorted(folder.glob("hostile_*"), key=lambda p: int(p.stem.split("_")[1]))
    ]
    print(json.dumps(out))


def run_torchcodec(clips: dict[str, bytes], pyav: dict[str, object], repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "short.mp4").write_bytes(clips["short"])
        (folder / "long.mp4").write_bytes(clips["long"])
        times = {"short": pyav["short_seconds"], "long": pyav["long_seconds"], "repeats": repeats}
        (folder / "seconds.json").write_text(json.dumps(times))
        for i, (_, data) in enumerate(hostile_inputs(clips["short"])):
            (folder / f"hostile_{i}").write_bytes(data)
        done = subprocess.run(
            [sys.executable, __file__, "--torchcodec-child", tmp],
            capture_output=True,
            text=True,
            timeout=300,
        )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"error": f"child failed (exit {done.returncode}): {done.stderr[-200:]}"}
    return json.loads(lines[-1])


def print_tables(pyav: dict, tc: dict, clips: dict[str, bytes], args: argparse.Namespace) -> None:
    ms = lambda key, d: f"{d[key] * 1000:8.1f} ms" if key in d else "     n/a"  # noqa: E731
    missing = tc.get("error")
    print(f"clips: short {len(clips['short'])} B, long {len(clips['long'])} B")
    if missing:
        print(f"torchcodec unavailable: {missing}")
    n_short = len(pyav["short_seconds"])
    print(f"\nshort clip (4 s, 320x240, 30 fps), 2 fps -> {n_short} frames, best of {args.repeats}")
    print(f"  {'pyav: decode_video (seek + forward)':40} {ms('short_seek', pyav)}")
    print(f"  {'pyav: decode every frame':40} {ms('short_all', pyav)}")
    print(f"  {'torchcodec: exact':40} {ms('short_exact', tc)}")
    print(f"  {'torchcodec: approximate':40} {ms('short_approximate', tc)}")
    print(
        f"\nlong clip ({args.long_minutes:g} min, 96x64, 10 fps, keyframe every 2 s, "
        f"{pyav['long_total']} frames), 2 fps capped to {args.max_frames}"
    )
    print(f"  {'':40} {'time':>11} {'frames decoded':>15}")
    print(
        f"  {'pyav: decode_video (seek)':40} {ms('long_seek', pyav)} {pyav['long_seek_frames']:15}"
    )
    print(f"  {'pyav: decode every frame':40} {ms('long_all', pyav)} {pyav['long_all_frames']:15}")
    print(f"  {'torchcodec: exact (scans the file)':40} {ms('long_exact', tc)}")
    print(f"  {'torchcodec: approximate':40} {ms('long_approximate', tc)}")
    print("\nhostile inputs (default limits; the last one with max_bytes=10 kB)")
    tc_hostile = tc.get("hostile", [])
    for i, (name, _) in enumerate(hostile_inputs(clips["short"])):
        print(f"  {name:28} pyav:       {pyav['hostile'][i]}")
        if i < len(tc_hostile):
            print(f"  {'':28} torchcodec: {tc_hostile[i]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--long-minutes", type=float, default=20.0)
    parser.add_argument("--max-frames", type=int, default=64)
    parser.add_argument("--no-torchcodec", action="store_true")
    parser.add_argument("--torchcodec-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torchcodec_child:
        torchcodec_child(args.torchcodec_child)
        return
    start = time.perf_counter()
    clips = {
        "short": make_clip(320, 240, 120, 30, gradient=True),
        "long": make_clip(96, 64, round(args.long_minutes * 600), 10, gop=20, gradient=True),
    }
    print(f"(clips encoded in {time.perf_counter() - start:.1f} s)")
    pyav = run_pyav(clips, args)
    tc = (
        {"error": "--no-torchcodec"}
        if args.no_torchcodec
        else run_torchcodec(clips, pyav, args.repeats)
    )
    print_tables(pyav, tc, clips, args)


if __name__ == "__main__":
    main()
