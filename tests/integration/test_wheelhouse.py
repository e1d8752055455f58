"""scripts/wheelhouse.sh and benchmarks/device_check.sh --prepare: the wheels an offline host
needs, proved to be the whole closure without that host's interpreter (needs PyPI)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(900)


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=REPO, text=True, capture_output=True, env=_env(), timeout=800, check=False
    )


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "PYTHON": sys.executable}


def _names(folder: Path) -> dict[str, str]:
    """{distribution: version} of the wheels under ``folder``."""
    out = {}
    for wheel in folder.rglob("*.whl"):
        dist, version = wheel.name.split("-")[:2]
        out[dist.lower()] = version
    return out


def test_the_h200_wheel_set_is_complete_split_and_free_of_what_the_host_has(
    tmp_path: Path,
) -> None:
    """The set that failed on the H200 (PyAV, opentelemetry-api, annotated-doc missing): now the
    closure at the lock's versions, less the host's torch/triton/transformers, in parts the
    device tool can carry, and the check fails once a wheel is taken out."""
    out = tmp_path / "wheels"
    done = _run("bash", "benchmarks/device_check.sh", "--prepare", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "closure complete" in done.stdout
    have = json.loads((out / "have.json").read_text())["have"]
    assert {"torch": "2.11.0", "triton": "3.6.0", "transformers": "5.17.0"}.items() <= have.items()
    assert "sympy" in have and any(n.startswith("nvidia") for n in have)  # torch's own needs
    names = _names(out)
    for had in ("torch", "triton", "transformers", "tokenizers"):
        assert had not in names, had  # the host has it (or only what it has needs it)
    assert not [n for n in names if n.startswith(("nvidia", "cuda"))]
    assert names["torchvision"].startswith("0.26.")  # the build for the host's torch 2.11
    assert names["av"].startswith("19.")  # Python 3.12's PyAV
    for needed in ("fastapi", "annotated_doc", "uvicorn", "xgrammar", "pydantic_core", "vlserve"):
        assert needed in names, needed
    parts = sorted(out.glob("part-*"))
    assert len(parts) >= 2 and not list(out.glob("*.whl"))
    for part in parts:
        assert sum(w.stat().st_size for w in part.glob("*.whl")) <= 40 * 2**20

    missing = next(out.rglob("annotated_doc-*.whl"))
    missing.unlink()
    broken = _run(sys.executable, "scripts/lockfile.py", "verify", str(out))
    assert broken.returncode == 1
    assert "annotated-doc" in broken.stderr


def test_an_aarch64_wheelhouse_beside_the_locks_torch(tmp_path: Path) -> None:
    """A Kunpeng (ARM) Ascend image: without --have, the target has the lock's aarch64 torch."""
    out = tmp_path / "wheels"
    done = _run(
        "bash", "scripts/wheelhouse.sh", "--python", "3.12",
        "--platform", "manylinux_2_28_aarch64", "--have", "torch-npu==2.9.1", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "closure complete" in done.stdout
    have = json.loads((out / "have.json").read_text())["have"]
    assert {"torch": "2.9.1", "torch-npu": "2.9.1"}.items() <= have.items()
    assert not [n for n in have if n.startswith("nvidia")]  # aarch64's torch is a CPU build
    names = _names(out)
    assert "torch" not in names and "torch_npu" not in names
    assert names["torchvision"] == "0.24.1"  # the lock's aarch64 pair
    arch = {w.name for w in out.glob("*.whl") if "linux" in w.name}
    assert arch and all("aarch64" in name for name in arch)
