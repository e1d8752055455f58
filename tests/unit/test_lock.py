"""requirements/lock.txt: what is installed is what was locked, the lock covers pyproject.toml,
and scripts/lockfile.py turns it into constraints for machines that already have packages."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
LOCKED_EXTRAS = ("server", "test", "plot", "video")


def _lockfile():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("lockfile", REPO / "scripts" / "lockfile.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["lockfile"] = module
    spec.loader.exec_module(module)
    return module


lockfile = _lockfile()


def _pins_here(path: Path) -> dict[str, str]:
    """The lock's pins whose markers hold for this interpreter."""
    pins = {}
    for pin in lockfile.read_lock(path):
        if not pin.marker or Marker(pin.marker).evaluate():
            assert pin.name not in pins, f"two pins of {pin.name} hold here"
            pins[pin.name] = pin.version
    return pins


def _public(version: str) -> Version:
    """2.14.1+cpu (a CPU build from PyTorch's index) is the release 2.14.1."""
    return Version(Version(version).public)


def test_every_installed_package_is_at_its_locked_version() -> None:
    """The environment the tests run in is the one the lock describes (scripts/_env.sh installs
    with it as constraints); a package outside it would make 'tested' mean nothing."""
    pins = _pins_here(REPO / "requirements" / "lock.txt")
    installed = lockfile.installed()
    wrong = {
        name: (installed[name], version)
        for name, version in pins.items()
        if name in installed and _public(installed[name]) != _public(version)
    }
    assert not wrong, f"installed != locked (installed, locked): {wrong}"
    for name in ("torch", "transformers", "fastapi", "av", "xgrammar"):
        assert name in installed and name in pins, name


def test_the_lock_satisfies_every_requirement_of_pyproject() -> None:
    """After an edit of pyproject.toml, scripts/lock.sh must run: every requirement of vlserve
    and its locked extras has a pin here that satisfies it."""
    pins = _pins_here(REPO / "requirements" / "lock.txt")
    missing = []
    for text in importlib.metadata.requires("vlserve") or []:
        req = Requirement(text)
        applies = req.marker is None or any(
            req.marker.evaluate({"extra": extra}) for extra in ("", *LOCKED_EXTRAS)
        )
        if not applies:
            continue
        name = lockfile.normalize(req.name)
        if name not in pins or not req.specifier.contains(pins[name], prereleases=True):
            missing.append(f"{req} (locked: {pins.get(name)})")
    assert not missing, "run scripts/lock.sh: " + "; ".join(missing)


def test_the_tf457_lock_holds_transformers_4_57_1() -> None:
    pins = {p.name: p.version for p in lockfile.read_lock(REPO / "requirements/lock-tf457.txt")}
    assert pins["transformers"] == "4.57.1"
    tf457 = Requirement("tokenizers>=0.22.0,<=0.23.0")  # transformers 4.57.1's own bounds
    assert tf457.specifier.contains(pins["tokenizers"])
    assert Version(pins["huggingface-hub"]) < Version("1.0")


def test_read_lock_takes_pins_and_markers(tmp_path: Path) -> None:
    text = (
        "# comment\naiohttp==3.14.5\n    # via vlserve\n"
        "av==18.1.0 ; python_full_version == '3.11.*'\nTyping_Extensions==4.16.0\n"
    )
    path = tmp_path / "lock.txt"
    path.write_text(text)
    pins = lockfile.read_lock(path)
    assert [(p.name, p.version, p.marker) for p in pins] == [
        ("aiohttp", "3.14.5", ""),
        ("av", "18.1.0", "python_full_version == '3.11.*'"),
        ("typing-extensions", "4.16.0", ""),
    ]


def test_constraints_pin_what_the_target_has_and_free_torchs_companions() -> None:
    Pin = lockfile.Pin
    pins = [
        Pin("torch", "2.14.1", "platform_machine != 'aarch64'"),
        Pin("torchvision", "0.29.1", "platform_machine != 'aarch64'"),
        Pin("numpy", "2.4.6", ""),
        Pin("fastapi", "0.165.0", ""),
    ]
    out = lockfile.constraints(pins, {"torch": "2.11.0", "numpy": "1.26.4"})
    assert out == ["numpy==1.26.4", "torch==2.11.0", "fastapi==0.165.0"]
    stubbed = lockfile.constraints(pins, {"torch": "2.11.0+cu130"}, "have")
    assert stubbed[0] == "torch==2.11.0+cu130"  # a local label already: kept
    assert "numpy==2.4.6" in stubbed
    assert lockfile.constraints(pins, {}) == [p.line for p in pins]
    # the lock's own torch: its torchvision pin stays (one torchvision per torch release)
    same = lockfile.constraints(pins, {"torch": "2.14.1"})
    assert same == ["torch==2.14.1", *(p.line for p in pins[1:])]


@pytest.mark.parametrize("spec", ["torch", "torch>=2", "torch==", "==2.1", "torch==2.1 ; x"])
def test_have_wants_name_and_exact_version(spec: str) -> None:
    with pytest.raises(SystemExit, match="NAME==VERSION"):
        lockfile.parse_have([spec])


def test_platform_tags() -> None:
    uv, pip = lockfile.platform_tags("manylinux_2_28_aarch64")
    assert uv == "aarch64-manylinux_2_28"
    assert pip[0] == "manylinux_2_28_aarch64" and "manylinux2014_aarch64" in pip
    assert "manylinux_2_17_aarch64" in pip
    with pytest.raises(SystemExit):
        lockfile.platform_tags("win_amd64")


def test_a_stub_wheel_is_a_valid_metadata_only_wheel(tmp_path: Path) -> None:
    path = lockfile.write_stub(tmp_path, "torch-npu", "2.1.0.post3+have")
    assert re.fullmatch(r"torch_npu-2\.1\.0\.post3\+have-py3-none-any\.whl", path.name)
    with zipfile.ZipFile(path) as wheel:
        names = set(wheel.namelist())
        meta = wheel.read("torch_npu-2.1.0.post3+have.dist-info/METADATA").decode()
    assert names == {
        f"torch_npu-2.1.0.post3+have.dist-info/{n}" for n in ("METADATA", "WHEEL", "RECORD")
    }
    assert "Name: torch-npu\nVersion: 2.1.0.post3+have\n" in meta
    assert "Requires-Dist" not in meta
