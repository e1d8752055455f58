"""engine/openmp.py: the OpenMP defaults `vlserve serve` sets before torch loads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vlserve.engine import openmp


def _child(code: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run(
        [sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


APPLY = (
    "import os, sys; from vlserve.engine import openmp; openmp.apply_defaults(); "
    "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"
)


def test_sets_passive_when_unset_without_loading_torch() -> None:
    assert _child(APPLY) == "PASSIVE False"


def test_a_value_the_user_set_wins() -> None:
    assert _child(APPLY, OMP_WAIT_POLICY="ACTIVE") == "ACTIVE False"


def test_too_late_once_torch_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    # the runtime has read its environment already: setting it now would only mislead the log
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setitem(sys.modules, "torch", sys.modules.get("torch") or object())
    openmp.apply_defaults()
    assert "OMP_WAIT_POLICY" not in os.environ
    assert openmp.describe() == "OMP_WAIT_POLICY=(unset)"


def test_serve_cli_imports_no_torch_before_applying() -> None:
    # serve() applies the defaults first; that only works if its module left torch unloaded
    assert _child("import sys, vlserve.api.cli; print('torch' in sys.modules)") == "False"
