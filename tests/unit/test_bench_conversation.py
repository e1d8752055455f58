"""Multi-turn conversations: the `turns` format, synthetic turns, message assembly, turn bodies,
the turn loop, --resume, and the per-turn summary and table."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from vlserve.bench import cli
from vlserve.bench.client import RequestResult, build_body
from vlserve.bench.config import DatasetConfig, LoadConfig, RequestOptions
from vlserve.bench.conversation import (
    TurnEncoder,
    conversation_done,
    is_multi_turn,
    run_conversation,
    turn_messages,
    turn_request_id,
)
from vlserve.bench.dataset import BenchRequest, Turn, load_dataset, load_jsonl
from vlserve.bench.metrics import summarize
from vlserve.bench.report import format_table, result_record
from vlserve.bench.runner import pending_plan
from vlserve.bench.synthetic import png_bytes

PNG = png_bytes(2, 1, bytes([255, 0, 0, 0, 255, 0]))


def load_lines(tmp_path: Path, lines: list[Any]) -> Any:
    (tmp_path / "a.png").write_bytes(PNG)
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return load_jsonl([str(path)], None)


def test_turns_records_in_every_turn_form(tmp_path: Path) -> None:
    image_turn = [{"type": "image", "image": "a.png"}, {"type": "text", "text": "What is it?"}]
    ds = load_lines(
        tmp_path,
        [
            {"id": "c1", "system": "Be brief.", "max_tokens": 16,
             "turns": [image_turn, "And its colour?", {"content": "Why?", "max_tokens": 4}]},
            {"turns": ["only one"]},
        ],
    )  # fmt: skip
    assert ds.issues == []
    c1, single = ds.requests
    assert c1.id == "c1" and c1.num_turns == 3 and c1.max_tokens == 16
    system, first = c1.messages
    assert system == {"role": "system", "content": "Be brief."} and first["role"] == "user"
    assert first["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert first["content"][1] == {"type": "text", "text": "What is it?"}
    assert c1.followups == (Turn("And its colour?", 16), Turn("Why?", 4))
    assert single.id.endswith("c.jsonl:2") and single.followups == ()
    assert single.messages == [{"role": "user", "content": "only one"}]
    assert not is_multi_turn([single]) and is_multi_turn([single, c1])


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"turns": []}, "non-empty list"),
        ({"turns": "hi"}, "non-empty list"),
        ({"turns": ["a", 3]}, "turn 1: content must be"),
        ({"turns": ["a", {"text": "b"}]}, "turn 1: an object turn needs 'content'"),
        ({"turns": ["a", {"content": "b", "max_tokens": 0}]}, "turn 1: max_tokens"),
        ({"turns": [[{"type": "image", "image": "missing.png"}]]}, "turn 0: image not found"),
        ({"turns": ["a"], "prompt": "b"}, "cannot be combined"),
        ({"turns": ["a"], "system": 1}, "'system' must be a string"),
    ],
)
def test_bad_conversations_are_skipped_with_a_reason(
    tmp_path: Path, record: dict[str, Any], reason: str
) -> None:
    ds = load_lines(tmp_path, [record, {"id": "ok", "turns": ["a", "b"]}])
    assert [r.id for r in ds.requests] == ["ok"]
    (issue,) = ds.issues
    assert issue.source.endswith("c.jsonl:1") and reason in issue.message


def test_random_turns_add_short_text_followups_and_keep_the_first_turn() -> None:
    single = load_dataset(DatasetConfig(kind="random", num_random=3, random_images=1))
    multi = load_dataset(
        DatasetConfig(kind="random", num_random=3, random_images=1, random_turns=3)
    )
    # The first conversation's first turn is the request a single-turn run sends.
    assert multi.requests[0].messages == single.requests[0].messages
    for request in multi.requests:
        assert request.num_turns == 3
        for turn in request.followups:
            assert isinstance(turn.content, str) and len(turn.content.split()) == 32
    first_texts = {r.messages[0]["content"][-1]["text"] for r in multi.requests}
    assert len(first_texts) == 3
    short = load_dataset(
        DatasetConfig(kind="random", num_random=1, random_turns=2, random_followup_len=5)
    )
    assert len(str(short.requests[0].followups[0].content).split()) == 5
    with pytest.raises(ValueError, match="--random-turns"):
        DatasetConfig(kind="random", random_turns=0)


def test_random_turn_flags() -> None:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    argv = ["--dataset", "random", "--random-turns", "4", "--random-followup-len", "8"]
    c = cli.config_from_args(parser.parse_args(argv))
    assert (c.dataset.random_turns, c.dataset.random_followup_len) == (4, 8)
    c = cli.config_from_args(parser.parse_args(["--dataset", "random"]))
    assert (c.dataset.random_turns, c.dataset.random_followup_len) == (1, 32)


IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
TEXT = {"type": "text", "text": "q0"}
CONVERSATION = BenchRequest(
    "c",
    [{"role": "system", "content": "sys"}, {"role": "user", "content": [IMAGE, TEXT]}],
    "test",
    max_tokens=7,
    followups=(Turn('q1 "quoted" é'), Turn([IMAGE, {"type": "text", "text": "q2"}], 3)),
)


def test_turn_messages_carry_the_history_and_the_answers() -> None:
    assert turn_messages(CONVERSATION, []) == CONVERSATION.messages
    third = turn_messages(CONVERSATION, ["a0", "a1\n"])
    assert [m["role"] for m in third] == ["system", "user", *["assistant", "user"] * 2]
    assert third[1]["content"][0] is IMAGE  # the same object: byte-identical data URLs
    assert [third[2]["content"], third[3]["content"], third[4]["content"]] == [
        "a0", 'q1 "quoted" é', "a1\n"
    ]  # fmt: skip
    assert third[5]["content"][1]["text"] == "q2"
    with pytest.raises(ValueError, match="3 turns"):
        turn_messages(CONVERSATION, ["a", "b", "c"])


@pytest.mark.parametrize("extra", [{}, {"top_p": 0.5, "stream_options": None}])
def test_turn_bodies_equal_a_whole_serialization(extra: dict[str, Any]) -> None:
    options = RequestOptions(max_tokens=9, ignore_eos=True, extra_body=extra)
    encoder = TurnEncoder(options, "m", [CONVERSATION])
    answers = ['a0 "x"', "a1 é\n"]
    for turn, max_tokens in enumerate([7, 9, 3]):
        spliced = json.loads(encoder.body(CONVERSATION, answers[:turn]))
        whole = BenchRequest("c", turn_messages(CONVERSATION, answers[:turn]), "t", max_tokens)
        assert spliced == json.loads(build_body(whole, options, "m"))
        assert spliced["max_tokens"] == max_tokens


def fake_send(fail_at: int | None) -> tuple[Any, list[bytes]]:
    bodies: list[bytes] = []

    async def send(result: RequestResult, body: bytes, due: float) -> None:
        bodies.append(body)
        result.success = result.turn != fail_at
        result.response = f"answer {result.turn}" if result.success else None
        result.error = None if result.success else "HTTP 400: no"

    return send, bodies


def converse(fail_at: int | None) -> tuple[list[RequestResult], list[bytes]]:
    send, bodies = fake_send(fail_at)
    recorded: list[RequestResult] = []
    encoder = TurnEncoder(RequestOptions(), "m", [CONVERSATION])
    asyncio.run(run_conversation("c@1", CONVERSATION, 0.0, encoder, send, recorded.append))
    return recorded, bodies


def test_each_turn_is_sent_with_the_answers_before_it() -> None:
    recorded, bodies = converse(fail_at=None)
    assert [(r.request_id, r.id, r.conversation_id, r.turn) for r in recorded] == [
        ("c@1:t0", "c", "c@1", 0), ("c@1:t1", "c", "c@1", 1), ("c@1:t2", "c", "c@1", 2)
    ]  # fmt: skip
    last = json.loads(bodies[2])["messages"]
    assert [m["content"] for m in last if m["role"] == "assistant"] == ["answer 0", "answer 1"]


def test_a_failed_turn_skips_and_records_the_rest() -> None:
    recorded, bodies = converse(fail_at=0)
    assert len(bodies) == 1
    assert [(r.turn, r.success, r.skipped) for r in recorded] == [
        (0, False, False), (1, False, True), (2, False, True)
    ]  # fmt: skip
    assert recorded[2].error == "skipped: turn 0 of the conversation failed"


def test_resume_skips_whole_conversations_and_reruns_partial_ones() -> None:
    two = [CONVERSATION, BenchRequest("s", [{"role": "user", "content": "x"}], "t")]
    done = {"c:t0", "c:t1", "c:t2", "s:t0", "c@1:t0", "c@1:t1"}
    assert conversation_done("c", CONVERSATION, done)
    assert not conversation_done("c@1", CONVERSATION, done)
    plan = pending_plan(two, LoadConfig(num_requests=4), done)
    assert [rid for rid, _ in plan] == ["c@1", "s@1"]
    # Single-turn runs keep plain request ids.
    single = [BenchRequest("q", [{"role": "user", "content": "x"}], "t")]
    assert [rid for rid, _ in pending_plan(single, LoadConfig(num_requests=2), {"q"})] == ["q@1"]
    assert turn_request_id("q@1", 2) == "q@1:t2"


def turn_result(conversation: str, turn: int, ttft_s: float, ok: bool = True) -> RequestResult:
    result = RequestResult(f"{conversation}:t{turn}", conversation, conversation_id=conversation)
    result.turn, result.success, result.ttft_s, result.latency_s = turn, ok, ttft_s, 2 * ttft_s
    result.prompt_tokens, result.completion_tokens = 100 * (turn + 1), 4
    result.endpoint = "http://e"
    if not ok:
        result.ttft_s, result.error = None, "HTTP 500: x"
    return result


def test_summary_breaks_latency_down_by_turn_and_counts_skipped_turns() -> None:
    results = [turn_result(c, t, 0.1 * (t + 1)) for c in ("a", "b") for t in range(3)]
    results += [turn_result("c", 0, 0.1), turn_result("c", 1, 0.0, ok=False)]
    skipped = RequestResult("c:t2", "c", conversation_id="c", turn=2, skipped=True)
    skipped.error = "skipped: turn 1 of the conversation failed"
    summary = summarize([*results, skipped], 1.0)
    assert (summary["total_requests"], summary["failed"]) == (9, 2)
    assert summary["conversations"] == {"total": 3, "completed": 2, "failed": 1, "turns_skipped": 1}
    turns = summary["turns"]
    assert [(t["turn"], t["requests"], t["successful"], t["skipped"]) for t in turns] == [
        (0, 3, 3, 0), (1, 3, 2, 0), (2, 3, 2, 1)
    ]  # fmt: skip
    assert turns[1]["ttft_ms"]["p50"] == 200.0 and turns[2]["e2el_ms"]["median"] == 600.0
    assert turns[2]["prompt_tokens_mean"] == 300.0
    assert summary["queued_ms"]["count"] == 8  # a skipped turn never queued
    table = format_table(summary)
    assert "TTFT by turn" in table and "Conversations completed" in table
    row = next(line for line in table.splitlines() if line.startswith("   2"))
    assert row.split() == ["2", "2", "1", "300.0", "300.0", "300.0", "600.0", "300"]


def test_single_turn_results_and_summaries_are_unchanged() -> None:
    plain = RequestResult("q", "q", success=True, latency_s=1.0, ttft_s=0.1)
    assert "turn" not in result_record(plain) and "conversation_id" not in result_record(plain)
    summary = summarize([plain], 1.0)
    assert "turns" not in summary and "conversations" not in summary
    assert "TTFT by turn" not in format_table(summary)
    record = result_record(turn_result("c", 1, 0.1))
    assert (record["conversation_id"], record["turn"], record["skipped"]) == ("c", 1, False)
    assert list(record)[-3:] == ["conversation_id", "turn", "skipped"]
