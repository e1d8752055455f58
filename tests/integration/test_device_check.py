"""benchmarks/device_check.sh in its --dry-run mode: every step of the GPU check, shrunk, on
the CPU; the one results file holds each step's outcome."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration


def test_device_check_dry_run_writes_one_results_file(tmp_path: Path) -> None:
    out = tmp_path / "device_check.json"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks/device_check.sh"), "--dry-run", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["dry_run"] is True
    steps = result["steps"]
    assert set(steps) == {"exactness-graphs", "exactness-eager", "decode-step", "sampling",
                          "realsize", "served", "prefix"}  # fmt: skip
    for name, step in steps.items():
        assert step["exit_code"] == 0, (name, step["tail"])
    assert "passed" in steps["exactness-graphs"]["tail"]
    (summary,) = result["bench"].values()
    assert summary["failed"] == 0 and summary["output_token_throughput"] > 0
    assert "batched tok/s" in steps["realsize"]["tail"]
    assert "qwen-defaults" in steps["sampling"]["tail"]
    variants = {(r.get("variant"), r.get("batch")) for r in result["decode_step"]}
    assert {("transformers", 1), ("vlserve-gather", 4)} <= variants
    assert any(r["kind"] == "floor" for r in result["decode_step"])
    assert any(r["kind"] == "profile" and "aten::" in r["table"] for r in result["decode_step"])
    prefix = steps["prefix"]
    assert "identical answers with and without the caches (8 turns)  PASS" in prefix["tail"]


def test_the_results_file_keeps_what_a_cut_run_measured(tmp_path: Path) -> None:
    """A run stopped after two steps (the device tool's time limit) still leaves a results
    file with them, and says which steps never ran."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "env.txt").write_text("3.12 2.11.0 5.25.0 NVIDIA H200\n")
    (work / "exactness-graphs.txt").write_text("4 passed\n")
    (work / "exactness-graphs.rc").write_text("0 41\n")
    (work / "decode-step.txt").write_text("...")
    (work / "decode-step.rc").write_text("124 120\n")  # cut by its budget
    (work / "decode-step.jsonl").write_text('{"kind": "floor", "floor_ms": 3.59}\n')
    out = tmp_path / "device_check.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/_device_summary.py"), str(work), str(out),
         "cuda", "0", "170"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert "failed: decode-step" in done.stdout and "not run: exactness-eager" in done.stdout
    result = json.loads(out.read_text())
    assert result["steps"]["exactness-graphs"] == {
        "exit_code": 0,
        "seconds": 41,
        "tail": "4 passed\n",
    }
    assert result["decode_step"] == [{"kind": "floor", "floor_ms": 3.59}]
