"""`vlserve bench --sweep-rates` end to end against the stub: table, files, resume."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vlserve.bench.stub import StubProcess


@pytest.fixture(scope="module")
def stub() -> Iterator[StubProcess]:
    with StubProcess(ttft_ms=5, itl_ms=1) as server:
        yield server


def sweep(stub: StubProcess, tmp_path: Path, rates: str) -> subprocess.CompletedProcess[str]:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "text": "hi"}) + "\n" for i in range(6)))
    args = [sys.executable, "-m", "vlserve", "bench", "--url", stub.url, "--input", str(data),
            "--output", str(tmp_path / "out" / "run.jsonl"), "--max-tokens", "4",
            "--max-concurrency", "4", "--goodput", "ttft:2000", "e2el:5000",
            "--sweep-rates", rates, "--resume", "--no-progress", "--no-plots"]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done


def table_rates(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("Offered")) + 1
    rows = []
    for line in lines[start:]:
        if line.startswith("-"):
            return rows
        rows.append(line.split()[0])
    return rows


def test_sweep_writes_table_and_files_and_resumes(stub: StubProcess, tmp_path: Path) -> None:
    first = sweep(stub, tmp_path, "20,40")
    assert table_rates(first.stdout) == ["20.00", "40.00"]
    assert "req/s achieved, at the highest passing offered rate" in first.stdout
    # 6 requests a rate: too few to trust, and said so in the log, the table and the files.
    assert first.stderr.count("ran too briefly to trust") == 2
    assert "* ran too briefly to trust (2 of 2 rates" in first.stdout
    assert "every rate sends the same 6 requests" in first.stderr  # files: no fresh data per rate
    assert stub.stats()["num_requests"] == 12
    out = tmp_path / "out"
    summary = json.loads((out / "run.sweep.json").read_text())
    assert [p["request_rate"] for p in summary["points"]] == [20.0, 40.0]
    point = summary["points"][0]
    assert point["completed"] == 6 and point["slo_attainment"] == 1.0
    assert "6 completed requests" in point["too_brief"]
    assert summary["too_brief_rates"] == [20.0, 40.0]
    assert summary["best_request_throughput"] == summary["best"]["request_throughput"]
    for key in ("request_throughput", "output_throughput", "p99_ttft_ms", "median_tpot_ms"):
        assert point[key] is not None
    lines = (out / "run.sweep.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["too_brief"] for line in lines)
    assert len((out / "run.rate-40.jsonl").read_text().splitlines()) == 6
    assert (out / "run.rate-20.summary.json").is_file()

    # The same command again: every rate is already measured, nothing is sent.
    stub.reset()
    again = sweep(stub, tmp_path, "20,40")
    assert stub.stats()["num_requests"] == 0
    assert table_rates(again.stdout) == ["20.00", "40.00"]
    assert again.stderr.count("already measured") == 2

    # One more rate: only that one is run, and the table has all three.
    more = sweep(stub, tmp_path, "20,40,60")
    assert stub.stats()["num_requests"] == 6
    assert table_rates(more.stdout) == ["20.00", "40.00", "60.00"]
    assert len((out / "run.sweep.jsonl").read_text().splitlines()) == 3
