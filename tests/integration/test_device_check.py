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
    assert result["exactness"]["exit_code"] == 0 and "passed" in result["exactness"]["tail"]
    (summary,) = result["bench"].values()
    assert summary["failed"] == 0 and summary["output_token_throughput"] > 0
    assert (
        result["gpu_realsize"]["exit_code"] == 0
        and "batched tok/s" in result["gpu_realsize"]["output"]
    )
    prefix = result["prefix_cache"]
    assert prefix["exit_code"] == 0, prefix["output"]
    assert "identical answers with and without the caches (8 turns)  PASS" in prefix["output"]
