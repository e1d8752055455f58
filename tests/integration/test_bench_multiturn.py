"""Multi-turn conversations against the scripted stub: what the server receives at each turn,
streaming and not, users as the unit of concurrency, failed turns, the CLI and --resume."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vlserve.bench.client import RequestResult
from vlserve.bench.config import BenchConfig, DatasetConfig, LoadConfig, RequestOptions, RetryPolicy
from vlserve.bench.dataset import BenchRequest, load_jsonl
from vlserve.bench.metrics import summarize
from vlserve.bench.runner import RunOutcome, run_benchmark
from vlserve.bench.stub import StubProcess
from vlserve.bench.synthetic import png_bytes


@pytest.fixture(scope="module")
def stub_server() -> Iterator[StubProcess]:
    # distinct: every answer names its request, so answers cannot be mixed up unnoticed.
    with StubProcess(ttft_ms=40, itl_ms=1, record=True, distinct=True) as stub:
        yield stub


@pytest.fixture
def stub(stub_server: StubProcess) -> StubProcess:
    stub_server.reset()
    return stub_server


def conversations(tmp_path: Path, n: int) -> list[BenchRequest]:
    """``n`` three-turn conversations: an image and a question, then a text turn, then a turn
    with a second image; the first one has a system message."""
    for i in range(2):
        (tmp_path / f"img{i}.png").write_bytes(png_bytes(1, 1, bytes([i, 2 * i, 3])))
    lines = []
    for c in range(n):
        first = [{"type": "image", "image": "img0.png"}, {"type": "text", "text": f"c{c} q0"}]
        third = [
            {"type": "image_url", "image_url": {"url": "img1.png"}},
            {"type": "text", "text": f"c{c} q2"},
        ]
        record: dict[str, Any] = {"id": f"c{c}", "turns": [first, f"c{c} q1", third]}
        if c == 0:
            record["system"] = "Be brief."
        lines.append(json.dumps(record) + "\n")
    path = tmp_path / "conv.jsonl"
    path.write_text("".join(lines))
    dataset = load_jsonl([str(path)], None)
    assert dataset.issues == []
    return dataset.requests


def run(
    stub: StubProcess,
    requests: list[BenchRequest],
    *,
    stream: bool = True,
    concurrency: int = 2,
    retries: int = 0,
) -> RunOutcome:
    config = BenchConfig(
        dataset=DatasetConfig(kind="random"),
        request=RequestOptions(model="m", max_tokens=3, stream=stream, timeout_s=10),
        retry=RetryPolicy(max_retries=retries, retry_delay_s=0.01),
        load=LoadConfig(
            endpoints=(stub.url + "/v1/chat/completions",), max_concurrency=concurrency
        ),
    )
    return asyncio.run(run_benchmark(config, requests))


def received(stub: StubProcess) -> dict[str, dict[str, Any]]:
    """What the stub received and answered, by results request id (``c0:t1``)."""
    return {r["x_request_id"].split("-", 1)[1]: r for r in stub.requests()}


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "no-stream"])
def test_each_turn_carries_the_earlier_turns_and_the_real_answers(
    stub: StubProcess, tmp_path: Path, stream: bool
) -> None:
    requests = conversations(tmp_path, 4)
    outcome = run(stub, requests, stream=stream)
    assert len(outcome.results) == 12 and all(r.success for r in outcome.results)
    got = received(stub)
    assert sorted(got) == sorted(f"c{c}:t{t}" for c in range(4) for t in range(3))
    for result in outcome.results:
        # The client recorded exactly what the stub answered (reassembled from the stream).
        assert result.response == got[result.request_id]["answer"]
        assert (result.conversation_id, result.request_id) == (
            result.id, f"{result.id}:t{result.turn}"
        )  # fmt: skip
    for c, request in enumerate(requests):
        first = got[f"c{c}:t0"]["body"]["messages"]
        assert first == request.messages  # the system message too, for c0
        last = got[f"c{c}:t2"]["body"]["messages"]
        head = len(first) - 1
        assert last[: head + 1] == first  # the first turn again, the same image data URL
        assert last[head + 1 :] == [
            {"role": "assistant", "content": got[f"c{c}:t0"]["answer"]},
            {"role": "user", "content": f"c{c} q1"},
            {"role": "assistant", "content": got[f"c{c}:t1"]["answer"]},
            {"role": "user", "content": request.followups[1].content},
        ]
        middle = got[f"c{c}:t1"]["body"]["messages"]
        assert middle == last[: head + 3]
    # Answers differ per request: no conversation carries another's.
    answers = [r["answer"] for r in got.values()]
    assert len(set(answers)) == 12
    # --max-concurrency counts users: at most 2 conversations were open at any time.
    spans: dict[str, list[RequestResult]] = {}
    for result in outcome.results:
        spans.setdefault(result.conversation_id or "", []).append(result)
    intervals = [
        (min(r.sent_at_s for r in rs), max(r.sent_at_s + r.latency_s for r in rs))
        for rs in spans.values()
    ]
    assert max_overlap(intervals) == 2 == stub.stats()["max_in_flight"]


@pytest.mark.parametrize("failure", [["400"], ["500", "500"]], ids=["400", "500-retried"])
def test_a_failed_turn_skips_the_rest_of_its_conversation(
    stub: StubProcess, tmp_path: Path, failure: list[str]
) -> None:
    stub.script("ok", *failure)  # c0's first turn succeeds, its second fails (after a retry)
    outcome = run(stub, conversations(tmp_path, 2), concurrency=1, retries=len(failure) - 1)
    by_id = {r.request_id: r for r in outcome.results}
    assert sorted(by_id) == sorted(f"c{c}:t{t}" for c in range(2) for t in range(3))
    assert by_id["c0:t0"].success and not by_id["c0:t1"].success
    assert by_id["c0:t1"].retry_count == len(failure) - 1 and not by_id["c0:t1"].skipped
    skipped = by_id["c0:t2"]
    assert skipped.skipped and not skipped.success and "turn 1" in (skipped.error or "")
    assert all(by_id[f"c1:t{t}"].success for t in range(3))
    assert "c0:t2" not in received(stub) and stub.stats()["num_requests"] == 3 + len(failure) + 1
    summary = summarize(outcome.results, outcome.duration_s)
    assert summary["conversations"] == {
        "total": 2, "completed": 1, "failed": 1, "turns_skipped": 1
    }  # fmt: skip
    assert (summary["successful"], summary["failed"]) == (4, 2)
    assert [t["failed"] for t in summary["turns"]] == [0, 1, 1]


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_random_conversations_then_resume_a_partial_one(
    stub: StubProcess, tmp_path: Path
) -> None:
    out = tmp_path / "r.jsonl"
    args = [sys.executable, "-m", "vlserve", "bench", "--url", stub.url, "--output", str(out),
            "--dataset", "random", "--random-turns", "3", "--num-requests", "3",
            "--random-images", "1", "--random-image-size", "16x16", "--random-input-len", "20",
            "--max-tokens", "2", "--max-concurrency", "2", "--no-progress", "--no-plots"]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "TTFT by turn" in done.stdout and "conversations (9 turns)" in done.stderr
    rows = lines(out)
    assert sorted((r["conversation_id"], r["turn"]) for r in rows) == [
        (f"random-{c}", t) for c in range(3) for t in range(3)
    ]
    summary = json.loads((tmp_path / "r.summary.json").read_text())
    assert [t["requests"] for t in summary["turns"]] == [3, 3, 3]
    first_image = received(stub)["random-1:t0"]["body"]["messages"][0]
    assert received(stub)["random-1:t2"]["body"]["messages"][0] == first_image
    # A conversation missing a turn is sent again from its first turn.
    out.write_text("".join(json.dumps(r) + "\n" for r in rows if r["request_id"] != "random-1:t2"))
    stub.reset()
    done = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert sorted(received(stub)) == ["random-1:t0", "random-1:t1", "random-1:t2"]
    assert len(lines(out)) == 8 + 3
    again = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "nothing to send" in again.stderr
