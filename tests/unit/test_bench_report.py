"""Outputs: the results line (prototype fields + timings), append-and-flush, resume, table."""

from __future__ import annotations

import json
from pathlib import Path

from vlserve.bench.client import RequestResult
from vlserve.bench.metrics import summarize
from vlserve.bench.report import (
    ResultsWriter,
    completed_ids,
    format_table,
    result_record,
    write_summary,
)

PROTOTYPE_FIELDS = [
    "id", "request_id", "success", "response", "error", "latency",
    "tokens_used", "prompt_tokens", "completion_tokens", "retry_count",
]  # fmt: skip


def done(request_id: str, ok: bool = True) -> RequestResult:
    r = RequestResult(
        request_id, request_id.split("@")[0], success=ok, latency_s=1.23456, ttft_s=0.1
    )
    r.prompt_tokens, r.completion_tokens, r.total_tokens = 5, 3, 8
    r.chunk_times_s = [0.1, 0.15, 0.3]
    r.response = "hi"
    return r


def test_record_keeps_prototype_fields_first_and_adds_timings() -> None:
    record = result_record(done("x"))
    assert list(record)[: len(PROTOTYPE_FIELDS)] == PROTOTYPE_FIELDS
    assert record["latency"] == 1.235 and record["tokens_used"] == 8
    assert record["ttft_ms"] == 100.0 and record["itl_ms"] == [50.0, 150.0]
    assert record["tpot_ms"] == round((1.23456 - 0.1) / 2 * 1000, 3)
    assert record["num_chunks"] == 3


def test_each_result_is_on_disk_as_soon_as_it_is_written(tmp_path: Path) -> None:
    # The prototype wrote results only at the end: a crash lost the whole run.
    path = tmp_path / "deep" / "er" / "results.jsonl"
    writer = ResultsWriter(path)
    writer.write(done("a"))
    assert [json.loads(x)["id"] for x in path.read_text().splitlines()] == ["a"]
    writer.write(done("b"))
    assert len(path.read_text().splitlines()) == 2
    writer.close()


def test_resume_skips_successful_ids_tolerates_half_lines_and_appends(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    with ResultsWriter(path) as w:
        w.write(done("a"))
        w.write(done("b", ok=False))
        w.write(done("a@1"))
    with path.open("a") as f:
        f.write('{"id": "c", "request_id": "c", "succ')  # a run killed mid-line
    assert completed_ids(path) == {"a", "a@1"}  # failed "b" is sent again
    with ResultsWriter(path, resume=True) as w:
        w.write(done("b"))
    lines = path.read_text().splitlines()
    assert json.loads(lines[-1])["request_id"] == "b" and len(lines) == 5
    assert completed_ids(path) == {"a", "a@1", "b"}
    assert completed_ids(tmp_path / "missing.jsonl") == set()


def test_without_resume_the_file_starts_fresh(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text("old\n")
    ResultsWriter(path).close()
    assert path.read_text() == ""


def test_summary_file_and_table(tmp_path: Path) -> None:
    summary = summarize([done("a"), done("b", ok=False)], 2.0)
    summary["max_concurrency_reached"] = 1
    write_summary(summary, tmp_path / "s" / "summary.json")
    assert json.loads((tmp_path / "s" / "summary.json").read_text())["successful"] == 1
    table = format_table(summary)
    for label in ("Successful requests", "Request throughput", "Time to first token", "P99 (ms)"):
        assert label in table
    assert "HTTP" not in table or "Errors" in table
