#!/usr/bin/env python3
"""The lock (requirements/lock.txt) for machines that already hold some packages. Stdlib only:
it runs in vendor images and on hosts before anything is installed.

  lockfile.py constraints LOCK [--have NAME==VERSION ...] [--installed]
      The lock as pip constraints, less the pins of packages the target already has: those are
      pinned at the target's version instead (the vendor's torch, torch_npu, numpy, ...).
      --installed: every distribution this interpreter has counts as had (Dockerfile.ascend).
  lockfile.py wheelhouse --python 3.12 --platform manylinux_2_28_x86_64 --out DIR
                         [--have NAME==VERSION ...] [--have-file FILE] [--extras server]
      Download, for a machine without network, every wheel that vlserve[EXTRAS] needs there
      beyond what it has (torch at the lock's version when no --have names torch), at the
      lock's versions, plus vlserve's own wheel; then check that the folder is the whole
      closure (as `verify`). Needs uv: it evaluates the target's markers, pip does not.
  lockfile.py split DIR --max-mib N
      Move DIR's wheels into DIR/part-1, part-2, ... of at most N MiB each.
  lockfile.py verify DIR
      An install (dry run, no index) from DIR alone, for the target's Python and platform,
      with a metadata-only stub wheel standing in for each package the target has: fails when
      any dependency is missing from DIR.

A target that has torch has what torch needs too (triton, the CUDA libraries, ...): those are
had as well. When the target's torch is not one the lock pins, torchvision and torchaudio lose
their pins: each release of them is built for one torch, so the resolver must pick the one that
fits the target's torch.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "requirements" / "lock.txt"
TORCH_BOUND = frozenset({"torchvision", "torchaudio"})
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)\s*(?:;\s*(.+))?$")
_PLATFORM = re.compile(
    r"^manylinux_?(\d+)_(\d+)_(x86_64|aarch64)$|^manylinux2014_(x86_64|aarch64)$"
)
HAVE_FILE = "have.json"  # in a wheelhouse: what the target has (for `verify`)


def normalize(name: str) -> str:
    """PEP 503's normal form of a distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Pin:
    name: str  # normalized
    version: str
    marker: str  # "" when the pin holds everywhere

    @property
    def line(self) -> str:
        return f"{self.name}=={self.version}" + (f" ; {self.marker}" if self.marker else "")


def read_lock(path: Path) -> list[Pin]:
    """Every ``name==version [; marker]`` line of a uv-compiled requirements file."""
    pins = []
    for raw in path.read_text().splitlines():
        found = _PIN.match(raw.strip())
        if found:
            pins.append(Pin(normalize(found.group(1)), found.group(2), found.group(3) or ""))
    return pins


def parse_have(specs: list[str]) -> dict[str, str]:
    """``NAME==VERSION`` specs → {normalized name: version}; anything else is refused."""
    have = {}
    for spec in specs:
        name, sep, version = spec.strip().partition("==")
        if not sep or not name or not version or any(c in version for c in " ;<>=!~"):
            raise SystemExit(f"--have wants NAME==VERSION, got {spec!r}")
        have[normalize(name)] = version
    return have


def constraints(pins: list[Pin], have: dict[str, str], local: str = "") -> list[str]:
    """The lock's pins less those of ``have`` (pinned at ``have``'s version, with ``local``
    appended as a local version label when it has none), and less torchvision/torchaudio when
    the torch had is not one the lock pins."""
    out = [f"{name}=={stub_version(version, local)}" for name, version in sorted(have.items())]
    locked_torch = {p.version.split("+")[0] for p in pins if p.name == "torch"}
    torch = have.get("torch")
    other_torch = torch is not None and torch.split("+")[0] not in locked_torch
    dropped = set(have) | (TORCH_BOUND if other_torch else set())
    out += [pin.line for pin in pins if pin.name not in dropped]
    return out


def stub_version(version: str, local: str) -> str:
    return version if not local or "+" in version else f"{version}+{local}"


def installed() -> dict[str, str]:
    """What this interpreter has installed: {normalized name: version}."""
    found = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(normalize(name), dist.version)
    return found


def write_stub(folder: Path, name: str, version: str) -> Path:
    """A wheel holding only metadata and no dependencies: it stands for a package the target
    has (which brings its own dependencies) when resolving for that target."""
    dist = re.sub(r"[-_.]+", "_", name)
    info = f"{dist}-{version}.dist-info"
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    files = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: vlserve-lockfile\n"
        "Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{n},,\n" for n in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as wheel:
        for member, text in files.items():
            wheel.writestr(member, text)
    return path


def platform_tags(platform: str) -> tuple[str, list[str]]:
    """A manylinux tag → (uv's --python-platform, pip's --platform list: it and the older
    manylinux tags a wheel for that machine may carry)."""
    found = _PLATFORM.match(platform)
    if not found:
        raise SystemExit(f"--platform wants e.g. manylinux_2_28_x86_64, got {platform!r}")
    if found.group(4):
        major, minor, arch = 2, 17, found.group(4)
    else:
        major, minor, arch = int(found.group(1)), int(found.group(2)), found.group(3)
    pip = [f"manylinux_{major}_{m}_{arch}" for m in range(minor, 16, -1)]
    pip += [f"manylinux2014_{arch}"]
    return f"{arch}-manylinux_{major}_{minor}", pip


def _uv() -> str:
    for candidate in (Path(sys.executable).parent / "uv", REPO / ".venv" / "bin" / "uv"):
        if candidate.exists():
            return str(candidate)
    found = shutil.which("uv")
    if found is None:
        raise SystemExit(
            "uv not found: ./scripts/test.sh installs it into .venv, or pip install uv"
        )
    return found


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, text=True, **kw)  # type: ignore[call-overload]


def resolve(
    lock: Path, have: dict[str, str], extras: str, python: str, uv_platform: str, stubs: Path
) -> list[str]:
    """The pins of vlserve[extras] for the target, from the lock, given what it has."""
    cfile = stubs / "constraints.txt"
    cfile.write_text("\n".join(constraints(read_lock(lock), have, "have")) + "\n")
    for name, version in have.items():
        write_stub(stubs, name, stub_version(version, "have"))
    pins = _compile(
        python, uv_platform, "--find-links", str(stubs), "-c", str(cfile), "--extra", extras,
        str(REPO / "pyproject.toml"),
    )  # fmt: skip
    return [f"{name}=={version}" for name, version in pins.items() if name not in have]


def _compile(python: str, uv_platform: str, *args: str, stdin: str | None = None) -> dict[str, str]:
    """uv's pins on the target for the requirements in ``args`` (and ``stdin``, given as
    ``-``): {normalized name: version}."""
    out = _run(
        [_uv(), "pip", "compile", "--quiet", "--no-header", "--no-annotate", "--python-version",
         python, "--python-platform", uv_platform, *args],
        input=stdin, capture_output=True,
    ).stdout  # fmt: skip
    pins = (line.split(" ")[0].partition("==") for line in out.splitlines() if "==" in line)
    return {normalize(name): version for name, _, version in pins}


def _with_torchs_closure(have: dict[str, str], lock: Path, python: str, uv_platform: str) -> None:
    """A target that has torch has what torch needs there (triton, the CUDA libraries, sympy,
    ...): add those to ``have`` (at the versions torch's own resolution picks, unless given);
    torch itself at the lock's version for the target when ``have`` does not name it."""
    if "torch" not in have:
        have.update(
            _compile(python, uv_platform, "--no-deps", "-c", str(lock), "-", stdin="torch\n")
        )
    locked = have["torch"] in {p.version for p in read_lock(lock) if p.name == "torch"}
    options = ("-c", str(lock)) if locked else ()  # the lock's versions of torch's own needs
    found = _compile(python, uv_platform, *options, "-", stdin=f"torch=={have['torch']}\n")
    for name, version in found.items():
        have.setdefault(name, version)


def wheelhouse(args: argparse.Namespace) -> int:
    uv_platform, pip_platforms = platform_tags(args.platform)
    specs = list(args.have)
    for file in args.have_file:
        lines = (line.split("#")[0].strip() for line in Path(file).read_text().splitlines())
        specs += [line for line in lines if line]
    have = parse_have(specs)
    _with_torchs_closure(have, args.lock, args.python, uv_platform)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        pins = resolve(args.lock, have, args.extras, args.python, uv_platform, Path(tmp))
    platform_args = [a for p in pip_platforms for a in ("--platform", p)]
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            args.python,
            *platform_args,
            "-d",
            str(out),
            *pins,
        ]
    )
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(REPO)])
    meta = {"python": args.python, "platform": args.platform, "extras": args.extras, "have": have}
    (out / HAVE_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    size = sum(f.stat().st_size for f in out.glob("*.whl"))
    print(
        f"{len(pins) + 1} wheels, {size / 2**20:.1f} MiB in {out} for Python {args.python} "
        f"on {args.platform}, beside " + ", ".join(f"{n}=={v}" for n, v in sorted(have.items()))
    )
    return verify(out)


def verify(folder: Path) -> int:
    """Resolve vlserve[extras] from ``folder`` alone (plus stubs for what the target has), for
    the target's Python and platform. uv, not pip: pip evaluates markers and Requires-Python
    for the interpreter running it, not for the target."""
    meta = json.loads((folder / HAVE_FILE).read_text())
    uv_platform, _ = platform_tags(meta["platform"])
    links = [a for f in (folder, *sorted(folder.glob("part-*"))) for a in ("--find-links", str(f))]
    with tempfile.TemporaryDirectory() as tmp:
        stubs = Path(tmp) / "stubs"
        stubs.mkdir()
        for name, version in meta["have"].items():
            write_stub(stubs, name, stub_version(version, "have"))
        done = subprocess.run(
            [
                _uv(),
                "pip",
                "install",
                "--dry-run",
                "--no-index",
                "--no-cache",
                *links,
                "--find-links",
                str(stubs),
                "--python-version",
                meta["python"],
                "--python-platform",
                uv_platform,
                "--target",
                str(Path(tmp) / "t"),
                f"vlserve[{meta['extras']}]",
            ],
            text=True,
            capture_output=True,
        )
    if done.returncode:
        print(f"{folder} is not the whole closure:\n{done.stderr.strip()}", file=sys.stderr)
        return 1
    taken = [line for line in done.stderr.splitlines() if line.startswith(" + ")]
    print(
        f"closure complete: {len(taken)} packages resolve offline from {folder} alone, "
        f"beside stubs for {', '.join(sorted(meta['have']))}"
    )
    return 0


def split(folder: Path, max_bytes: int) -> list[Path]:
    """Move the wheels of ``folder`` into ``folder/part-1``, ``part-2``, ... of at most
    ``max_bytes`` each (largest first, each into the first part it fits): for a carrier that
    takes so much at a time."""
    wheels = sorted(folder.glob("*.whl"), key=lambda w: w.stat().st_size, reverse=True)
    parts: list[list[Path]] = []
    sizes: list[int] = []
    for wheel in wheels:
        size = wheel.stat().st_size
        if size > max_bytes:
            raise SystemExit(f"{wheel.name} alone is over {max_bytes / 2**20:.0f} MiB")
        k = next((i for i, used in enumerate(sizes) if used + size <= max_bytes), len(parts))
        if k == len(parts):
            parts.append([])
            sizes.append(0)
        parts[k].append(wheel)
        sizes[k] += size
    out = []
    for k, part in enumerate(parts, 1):
        target = folder / f"part-{k}"
        target.mkdir(exist_ok=True)
        for wheel in part:
            wheel.rename(target / wheel.name)
        print(f"{target}: {len(part)} wheels, {sizes[k - 1] / 2**20:.1f} MiB")
        out.append(target)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("constraints")
    c.add_argument("lock", type=Path)
    c.add_argument("--have", action="append", default=[])
    c.add_argument("--installed", action="store_true")
    w = sub.add_parser("wheelhouse")
    w.add_argument("--python", required=True)
    w.add_argument("--platform", required=True)
    w.add_argument("--out", required=True)
    w.add_argument("--have", action="append", default=[])
    w.add_argument("--have-file", action="append", default=[])
    w.add_argument("--extras", default="server")
    w.add_argument("--lock", type=Path, default=LOCK)
    v = sub.add_parser("verify")
    v.add_argument("folder", type=Path)
    p = sub.add_parser("split")
    p.add_argument("folder", type=Path)
    p.add_argument("--max-mib", type=float, required=True)
    args = parser.parse_args(argv)
    if args.command == "split":
        split(args.folder, int(args.max_mib * 2**20))
        return 0
    if args.command == "constraints":
        have = parse_have(args.have)
        if args.installed:
            have = {**installed(), **have}
        print("\n".join(constraints(read_lock(args.lock), have)))
        return 0
    if args.command == "wheelhouse":
        return wheelhouse(args)
    return verify(args.folder)


if __name__ == "__main__":
    sys.exit(main())
