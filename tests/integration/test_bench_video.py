"""`vlserve bench` with videos, as a process against the stub: synthetic clips sent as vLLM's
``video_url`` parts, each request its own clip, video tokens in the results, summary and table."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vlserve.bench.stub import StubProcess

pytest.importorskip("av")


@pytest.fixture(scope="module")
def stub_server() -> Iterator[StubProcess]:
    with StubProcess(ttft_ms=5, record=True) as stub:
        yield stub


@pytest.fixture
def stub(stub_server: StubProcess) -> StubProcess:
    stub_server.reset()
    return stub_server


def bench(stub: StubProcess, out: Path, *extra: str) -> tuple[str, dict, list[dict]]:
    args = [sys.executable, "-m", "vlserve", "bench", "--url", stub.url, "--output", str(out),
            "--no-progress", "--no-plots", "--max-tokens", "4", "--max-concurrency", "2",
            "--dataset", "random", "--num-requests", "3", "--random-input-len", "8",
            "--random-videos", "2", "--random-video-size", "64x48",
            "--random-video-seconds", "1", "--random-video-fps", "6", *extra]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    summary = json.loads(out.with_name(out.stem + ".summary.json").read_text())
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    return done.stdout, summary, lines


def test_synthetic_videos_are_sent_distinct_and_their_tokens_reported(
    stub: StubProcess, tmp_path: Path
) -> None:
    stub.config(video_tokens=64)
    table, summary, lines = bench(stub, tmp_path / "r.jsonl")
    sent = [
        part["video_url"]["url"]
        for record in stub.requests()
        for part in record["body"]["messages"][0]["content"]
        if part["type"] == "video_url"
    ]
    assert len(sent) == 6 and len(set(sent)) == 6
    assert all(url.startswith("data:video/mp4;base64,") for url in sent)
    assert [line["video_tokens"] for line in lines] == [128, 128, 128]
    stats = summary["video_tokens"]
    assert (stats["count"], stats["mean"], stats["total"]) == (3, 128, 384)
    assert summary["run"]["dataset_media"]["videos"] == {"total": 6, "mean": 2.0, "max": 2}
    assert " Video tokens per request " in table and "Videos per request" in table


def test_a_server_without_video_tokens_is_n_a(stub: StubProcess, tmp_path: Path) -> None:
    stub.config(video_tokens=0)
    table, summary, lines = bench(stub, tmp_path / "r.jsonl", "--no-stream")
    assert summary["video_tokens"] is None
    assert all(line["success"] and line["video_tokens"] is None for line in lines)
    row = next(line for line in table.splitlines() if line.startswith("Video tokens per request"))
    assert row.endswith("n/a")
