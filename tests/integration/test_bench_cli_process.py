"""`vlserve bench` as a process: killed and resumed, exit codes, outputs, logs, sample dataset."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vlserve.bench.dataset import sample_dir
from vlserve.bench.stub import StubProcess


@pytest.fixture(scope="module")
def stub_server() -> Iterator[StubProcess]:
    with StubProcess(ttft_ms=5) as stub:
        yield stub


@pytest.fixture
def stub(stub_server: StubProcess) -> StubProcess:
    stub_server.reset()
    return stub_server


def bench_args(stub: StubProcess, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vlserve", "bench", "--url", stub.url, "--output", str(out),
            "--no-progress", "--max-tokens", "4", *extra]  # fmt: skip


def dataset(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text(
        "".join(json.dumps({"id": f"q{i}", "text": f"question {i}"}) + "\n" for i in range(n))
    )
    return path


def lines(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):  # the half line of a killed run
            out.append(json.loads(line))
    return out


def test_resume_after_a_killed_run_sends_only_what_is_missing(
    stub: StubProcess, tmp_path: Path
) -> None:
    stub.config(ttft_ms=100)
    data, out = dataset(tmp_path, 30), tmp_path / "results.jsonl"
    args = bench_args(stub, out, "--input", str(data), "--max-concurrency", "2", "--no-plots")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    # Results reach the file while the run goes on (the prototype wrote them only at the end).
    while (not out.exists() or len(lines(out)) < 6) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {r["request_id"] for r in lines(out) if r["success"]}
    assert 6 <= len(before) < 30
    stub.reset(ttft_ms=5)
    done = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert stub.stats()["num_requests"] == 30 - len(before)
    ok = [r["request_id"] for r in lines(out) if r["success"]]
    assert sorted(ok) == sorted(f"q{i}" for i in range(30))  # each exactly once
    summary = json.loads((tmp_path / "results.summary.json").read_text())
    assert summary["total_requests"] == 30 - len(before)
    assert summary["run"]["resumed_ids_skipped"] == len(before)
    again = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "nothing to send" in again.stderr


def test_exit_code_1_below_90_percent_success(stub: StubProcess, tmp_path: Path) -> None:
    stub.config(fail_every=5)  # 80% succeed
    args = bench_args(
        stub,
        tmp_path / "r.jsonl",
        "--input",
        str(dataset(tmp_path, 20)),
        "--max-retries",
        "0",
        "--no-plots",
    )
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "Failed requests" in done.stdout and "HTTP 500: scripted 500" in done.stdout


def test_success_outputs_logs_and_plots(stub: StubProcess, tmp_path: Path) -> None:
    stub.config(fail_every=20)  # 95% succeed: still exit 0
    out = tmp_path / "out" / "r.jsonl"
    log_file = tmp_path / "does" / "not" / "exist" / "bench.log"
    args = bench_args(
        stub,
        out,
        "--input",
        str(dataset(tmp_path, 20)),
        "--max-retries",
        "0",
        "--log-file",
        str(log_file),
    )
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Request throughput" in done.stdout and "INFO" not in done.stdout  # table on stdout
    assert "INFO" in done.stderr  # logs on stderr
    assert "results:" in log_file.read_text()
    assert len(lines(out)) == 20
    summary = json.loads((out.parent / "r.summary.json").read_text())
    assert (summary["successful"], summary["failed"]) == (19, 1)
    pytest.importorskip("matplotlib")
    assert (out.parent / "r.latency_cdf.png").stat().st_size > 1000
    assert (out.parent / "r.timeline.png").stat().st_size > 1000


def test_no_log_file_unless_asked(stub: StubProcess, tmp_path: Path) -> None:
    args = bench_args(
        stub, tmp_path / "r.jsonl", "--input", str(dataset(tmp_path, 2)), "--no-plots"
    )
    subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=tmp_path, check=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "r.jsonl", "r.summary.json"]


def test_sample_dataset_and_single_image(stub: StubProcess, tmp_path: Path) -> None:
    out = tmp_path / "sample.jsonl"
    done = subprocess.run(
        bench_args(stub, out, "--dataset", "sample", "--no-plots"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert len(lines(out)) >= 8 and all(r["success"] for r in lines(out))
    image = sample_dir() / "images" / "red_circle.png"
    out = tmp_path / "one.jsonl"
    done = subprocess.run(
        bench_args(stub, out, "-f", str(image), "--no-plots"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert [r["id"] for r in lines(out)] == ["red_circle.png"]


def test_ctrl_c_stops_cleanly_with_a_summary_and_no_spurious_failures(
    stub: StubProcess, tmp_path: Path
) -> None:
    stub.config(ttft_ms=200)
    out = tmp_path / "r.jsonl"
    args = bench_args(stub, out, "--dataset", "random", "--num-requests", "200", "--max-concurrency", "4", "--max-retries", "0", "--no-plots")  # fmt: skip
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # shells may ignore it
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while (not out.exists() or len(lines(out)) < 4) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    rows = lines(out)
    assert 4 <= len(rows) < 200 and all(r["success"] for r in rows)  # in-flight ones not recorded
    summary = json.loads((tmp_path / "r.summary.json").read_text())
    assert summary["successful"] == len(rows) and "Successful requests" in stdout
