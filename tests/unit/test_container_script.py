"""deploy/run_server_container.sh in --dry-run mode, against fake docker, npu-smi and nvidia-smi."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vlserve.testing.server import free_port

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "run_server_container.sh"
DOCKERFILES = sorted(
    p for p in (REPO / "deploy").glob("Dockerfile.*") if p.suffix != ".dockerignore"
)

# A docker stand-in driven by a JSON state file; it logs every call so tests can check that a
# dry run changed nothing.
FAKE_DOCKER = """\
import json, os, sys
state = json.load(open(os.environ["FAKE_DOCKER_STATE"]))
with open(os.environ["FAKE_DOCKER_LOG"], "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
args = sys.argv[1:]
cmd = args[0]
if args[:2] == ["image", "inspect"]:
    sys.exit(0 if args[2] in state["images"] else 1)
if cmd == "images":
    repo = args[-1]
    print("\\n".join(i for i in state["images"] if i.rsplit(":", 1)[0] == repo))
elif cmd == "ps" and "-a" in args:
    name = args[args.index("--filter") + 1].removeprefix("name=^/").removesuffix("$")
    if name in state["existing"]:
        print(state["existing"][name])
elif cmd == "ps":
    print("\\n".join(state["running"]))
elif cmd == "top":
    print("PID")
    print("\\n".join(str(p) for p in state["pids"].get(args[1], [])))
elif cmd == "inspect" and "{{.State.Running}} {{.RestartCount}}" in args:
    print(state["state_running"], state["restart_count"])
elif cmd == "inspect":
    print(" ".join(state["devices"].get(args[-1], [])))
elif cmd == "logs":
    print(state["logs"])
elif cmd in ("run", "rm", "stop"):
    print("fake-container-id")
else:
    sys.exit(f"fake docker: unexpected {args}")
"""

NPU_SMI_PROCESS_TABLE = """\
+---------------------------+---------------+----------------------------------------------------+
| NPU     Chip              | Process id    | Process name             | Process memory(MB)      |
+===========================+===============+====================================================+
{rows}
+===========================+===============+====================================================+
| No running processes found in NPU 7                                                            |
+===========================+===============+====================================================+
"""
NPU_SMI_HEADER = """\
+------------------------------------------------------------------------------------------------+
| npu-smi 23.0.6                   Version: 23.0.6                                               |
+---------------------------+---------------+----------------------------------------------------+
| NPU   Name                | Health        | Power(W)    Temp(C)           Hugepages-Usage(page)|
| Chip                      | Bus-Id        | AICore(%)   Memory-Usage(MB)  HBM-Usage(MB)        |
+===========================+===============+====================================================+
| 0     910B3               | OK            | 93.5        40                0    / 0             |
| 0                         | 0000:C1:00.0  | 0           0    / 0          3380 / 65536         |
"""


@dataclass
class Host:
    """A fake host: its /dev, its tools on PATH and docker's state."""

    root: Path
    images: list[str] = field(
        default_factory=lambda: ["vlserve:npu", "vlserve:cuda", "vlserve:cpu"]
    )
    existing: dict[str, str] = field(default_factory=dict)
    running: list[str] = field(default_factory=list)
    pids: dict[str, list[int]] = field(default_factory=dict)
    devices: dict[str, list[str]] = field(default_factory=dict)
    npu_processes: list[tuple[int, int, str]] = field(default_factory=list)
    gpus: int = 0
    state_running: str = "true"
    restart_count: int = 0
    logs: str = ""
    # Fake curl: the health check fails this many times, then succeeds (-1: never).
    curl_failures: int = 0

    @property
    def dev(self) -> Path:
        return self.root / "dev"

    def add_npus(self, count: int) -> None:
        self.dev.mkdir(exist_ok=True)
        for name in [f"davinci{i}" for i in range(count)] + [
            "davinci_manager",
            "devmm_svm",
            "hisi_hdc",
        ]:
            (self.dev / name).touch()

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return self.run_for_real("--dry-run", *args, **env)

    def run_for_real(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        bin_dir = self.root / "bin"
        bin_dir.mkdir(exist_ok=True)
        self.dev.mkdir(exist_ok=True)
        write_exe(bin_dir / "docker", f"#!{sys.executable}\n{FAKE_DOCKER}")
        keys = ("images", "existing", "running", "pids", "devices", "state_running",
                "restart_count", "logs")  # fmt: skip
        state = {k: getattr(self, k) for k in keys}
        write_exe(bin_dir / "curl", fake_curl(self.root / "curl.count", self.curl_failures))
        (self.root / "docker.json").write_text(json.dumps(state))
        if any((self.dev / f"davinci{i}").exists() for i in range(1)):
            rows = "\n".join(
                f"| {npu:<7} 0                 | {pid:<13} | {name:<24} | 30000                   |"
                for npu, pid, name in self.npu_processes
            )
            table = NPU_SMI_HEADER + NPU_SMI_PROCESS_TABLE.format(rows=rows)
            write_exe(bin_dir / "npu-smi", f"#!/bin/sh\ncat <<'EOF'\n{table}EOF\n")
        if self.gpus:
            write_exe(bin_dir / "nvidia-smi", fake_nvidia_smi(self.gpus))
        full_env = {
            "PATH": f"{bin_dir}:/usr/bin:/bin",
            "VLSERVE_DEV_DIR": str(self.dev),
            "FAKE_DOCKER_STATE": str(self.root / "docker.json"),
            "FAKE_DOCKER_LOG": str(self.root / "docker.log"),
            "VLSERVE_HOST_PORT": str(free_port()),
            **env,
        }
        return subprocess.run(
            ["bash", str(SCRIPT), *args],
            env=full_env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def docker_calls(self) -> list[list[str]]:
        log = self.root / "docker.log"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def fake_curl(counter: Path, failures: int) -> str:
    return f"""#!/bin/sh
n=$(cat {counter} 2>/dev/null || echo 0); echo $((n + 1)) > {counter}
[ {failures} -ge 0 ] && [ "$n" -ge {failures} ] && exit 0
exit 22
"""


def fake_nvidia_smi(count: int) -> str:
    gpus = "\n".join(f"echo '{i}, GPU-uuid-{i}'" for i in range(count))
    indexes = "\n".join(f"echo '{i}'" for i in range(count))
    return f"""#!/bin/sh
case "$*" in
  *index,uuid*) {gpus} ;;
  *query-gpu=index*) {indexes} ;;
  *compute-apps*) echo 'GPU-uuid-1, 777, /usr/bin/python3' ;;
  *) echo 'GPU 0: fake' ;;
esac
"""


def tool(name: str) -> str | None:
    """A linter on PATH, or installed next to this Python (the PyPI wheels put them there)."""
    found = shutil.which(name)
    beside = Path(sys.executable).parent / name
    return found or (str(beside) if beside.exists() else None)


def write_exe(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def docker_run_argv(stdout: str) -> list[str]:
    (line,) = [line for line in stdout.splitlines() if line.startswith("+ docker run ")]
    return shlex.split(line[2:])


def vlserve_args(argv: list[str], image: str) -> list[str]:
    return argv[argv.index(image) + 1 :]


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


def test_npu_launch_passes_only_the_chosen_devices_and_the_driver(host: Host) -> None:
    host.add_npus(8)
    result = host.run("--devices", "2-3", "--model-path", "/mnt/w", "--", "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr
    argv = docker_run_argv(result.stdout)
    dev = host.dev
    devices = [a.removeprefix("--device=") for a in argv if a.startswith("--device=")]
    assert devices == [f"{dev}/davinci{n}" for n in ("2", "3", "_manager")] + [
        f"{dev}/devmm_svm",
        f"{dev}/hisi_hdc",
    ]
    assert "/usr/local/Ascend/driver:/usr/local/Ascend/driver:ro" in argv
    assert "/mnt/w:/models/model:ro" in argv
    assert argv[argv.index("--network") + 1] == "host"
    args = vlserve_args(argv, "vlserve:npu")
    assert args[0] == "launch"
    assert args[args.index("--num-instances") + 1] == "2"
    assert args[args.index("--device") + 1] == "npu"
    assert args[-3:] == ["--", "--dtype", "bfloat16"]
    # A dry run only asked questions.
    assert not [c for c in host.docker_calls() if c[0] in ("run", "rm", "stop")]
    assert "would wait up to 1800 s" in result.stdout


def test_one_npu_runs_a_single_server(host: Host) -> None:
    host.add_npus(8)
    result = host.run("--served-model-name", "qwen3-vl", VLSERVE_DEVICES="5")
    assert result.returncode == 0, result.stderr
    argv = docker_run_argv(result.stdout)
    args = vlserve_args(argv, "vlserve:npu")
    assert args[:3] == ["serve", "--model", "/models/model"]
    assert args[args.index("--served-model-name") + 1] == "qwen3-vl"
    assert [a for a in argv if "davinci" in a and a[-1].isdigit()] == [
        f"--device={host.dev}/davinci5"
    ]


def test_cuda_uses_gpus_flag(host: Host) -> None:
    host.gpus = 4
    result = host.run("--devices", "0,2", VLSERVE_PLATFORM="cuda")
    assert result.returncode == 0, result.stderr
    argv = docker_run_argv(result.stdout)
    assert argv[argv.index("--gpus") + 1] == '"device=0,2"'
    assert not [a for a in argv if a.startswith("--device=")]
    args = vlserve_args(argv, "vlserve:cuda")
    assert args[0] == "launch" and args[args.index("--device") + 1] == "cuda"


def test_cpu_in_a_bridge_network_publishes_the_port(host: Host) -> None:
    port = free_port()
    result = host.run("--network", "bridge", "--port", str(port), "--test-data", "/mnt/td")
    assert result.returncode == 0, result.stderr
    argv = docker_run_argv(result.stdout)
    assert argv[argv.index("-p") + 1] == f"{port}:{port}"
    assert "/mnt/td:/data:ro" in argv
    args = vlserve_args(argv, "vlserve:cpu")
    assert args[0] == "serve" and args[args.index("--device") + 1] == "cpu"
    assert args[args.index("--allowed-local-media-path") + 1] == "/data"


def test_vllm_engine_serves_all_devices_with_data_parallel_replicas(host: Host) -> None:
    host.add_npus(8)
    image = "quay.io/ascend/vllm-ascend:v0.11.0"
    host.images = [image]
    result = host.run("--engine", "vllm", "--image", image, "--vllm-tp", "2",
                      "--served-model-name", "qwen3-vl-8b", "--", "--dtype", "bfloat16")  # fmt: skip
    assert result.returncode == 0, result.stderr
    argv = docker_run_argv(result.stdout)
    assert argv[argv.index("--entrypoint") + 1] == "bash"
    command = argv[argv.index(image) + 1 :]
    assert command[0] == "-c" and "set_env.sh" in command[1]
    serve = command[command.index("vllm") :]
    assert serve[:3] == ["vllm", "serve", "/models/model"]
    assert serve[serve.index("--tensor-parallel-size") + 1] == "2"
    assert serve[serve.index("--data-parallel-size") + 1] == "4"
    assert serve[serve.index("--served-model-name") + 1] == "qwen3-vl-8b"
    assert serve[-2:] == ["--dtype", "bfloat16"]
    assert len([a for a in argv if a.startswith("--device=") and a[-1].isdigit()]) == 8


def test_vllm_engine_needs_an_image_and_a_fitting_split(host: Host) -> None:
    host.add_npus(8)
    assert "pass --image" in host.run("--engine", "vllm").stderr
    host.images = ["vllm/vllm-openai:v0.11.0"]
    odd = host.run("--engine", "vllm", "--image", "vllm/vllm-openai:v0.11.0", "--devices", "0-2",
                   "--vllm-tp", "2")  # fmt: skip
    assert odd.returncode == 1 and "tensor-parallel groups of 2" in odd.stderr


def test_vllm_instance_wrapper_turns_launch_flags_into_vllm_serve(tmp_path: Path) -> None:
    fake = tmp_path / "vllm"
    write_exe(fake, '#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    result = subprocess.run(
        ["bash", str(REPO / "deploy" / "vllm_instance.sh"), "--model", "/m", "--host", "127.0.0.1",
         "--port", "9001", "--device", "npu", "--max-model-len", "8192"],
        env={"PATH": "/usr/bin:/bin", "VLLM": str(fake)}, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert result.stdout.split() == [
        "serve", "/m", "--host", "127.0.0.1", "--port", "9001", "--max-model-len", "8192",
    ]  # fmt: skip


def test_waits_for_health_printing_progress(host: Host, tmp_path: Path) -> None:
    host.curl_failures = 3
    host.logs = "loading checkpoint shards 3/4"
    result = host.run_for_real("--platform", "cpu", "--model-path", str(tmp_path),
                               "--poll-interval", "0.05", "--progress-interval", "0")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "still loading after" in result.stdout and "shards 3/4" in result.stdout
    assert "ready after" in result.stdout
    assert [c[0] for c in host.docker_calls()].count("run") == 1


def test_a_container_that_dies_shows_its_last_log_lines(host: Host, tmp_path: Path) -> None:
    host.curl_failures = -1
    host.state_running = "false"
    host.logs = "DeviceUnavailableError: npu requested but torch_npu failed to load"
    result = host.run_for_real("--platform", "cpu", "--model-path", str(tmp_path),
                               VLSERVE_POLL_INTERVAL_S="0.05")  # fmt: skip
    assert result.returncode == 1
    assert "stopped; its last log lines" in result.stderr
    assert "torch_npu failed to load" in result.stderr


def test_readiness_timeout_shows_last_log_lines(host: Host, tmp_path: Path) -> None:
    host.curl_failures = -1
    host.logs = "still compiling"
    result = host.run_for_real("--platform", "cpu", "--model-path", str(tmp_path),
                               "--ready-timeout", "1", VLSERVE_POLL_INTERVAL_S="0.1")  # fmt: skip
    assert result.returncode == 1
    assert "not ready after 1 s" in result.stderr and "still compiling" in result.stderr
    assert "raise --ready-timeout" in result.stderr


def test_missing_tag_lists_the_tags_that_exist(host: Host) -> None:
    host.images = [
        "swr.example.com/vllm-npu/train:20260115",
        "swr.example.com/vllm-npu/train:20251201",
    ]
    result = host.run("--platform", "cpu", "--image", "swr.example.com/vllm-npu/train:latest")
    assert result.returncode == 1
    assert "swr.example.com/vllm-npu/train:20260115" in result.stderr
    assert "swr.example.com/vllm-npu/train:20251201" in result.stderr
    untagged = host.run("--platform", "cpu", "--image", "swr.example.com/vllm-npu/train")
    assert untagged.returncode == 1 and "has no tag" in untagged.stderr
    assert "20260115" in untagged.stderr
    nothing = host.run("--platform", "cpu", VLSERVE_IMAGE="vlserve-ascend:0.1")
    assert nothing.returncode == 1 and "build it" in nothing.stderr


def test_npus_held_by_another_container_are_named(host: Host) -> None:
    host.add_npus(8)
    host.running = ["qwen3_vl_8b", "other"]
    host.pids = {"qwen3_vl_8b": [4242], "other": [1]}
    host.npu_processes = [(2, 4242, "python3"), (6, 5151, "train.py")]
    result = host.run("--devices", "0-3")
    assert result.returncode == 1
    assert "NPU 2: pid 4242 (python3) in container qwen3_vl_8b" in result.stderr
    assert "NPU 6" not in result.stderr  # not requested
    assert "+ docker run" not in result.stdout

    host_process = host.run("--devices", "6")
    assert "NPU 6: pid 5151 (train.py) on the host" in host_process.stderr

    assert host.run("--devices", "0,1").returncode == 0
    forced = host.run("--devices", "0-3", "--ignore-busy")
    assert forced.returncode == 0 and "+ docker run" in forced.stdout


def test_npus_mapped_into_a_running_container_are_named(host: Host) -> None:
    host.add_npus(8)
    host.running = ["qwen3_vl_8b"]
    host.devices = {"qwen3_vl_8b": ["/dev/davinci1", "/dev/davinci_manager"]}
    result = host.run("--devices", "0-3")
    assert result.returncode == 1
    assert "NPU 1: mapped into running container qwen3_vl_8b" in result.stderr


def test_gpu_holders_are_named(host: Host) -> None:
    host.gpus = 2
    result = host.run("--platform", "cuda")
    assert result.returncode == 1
    assert "GPU 1: pid 777 (/usr/bin/python3) on the host" in result.stderr


def test_existing_container_needs_replace(host: Host) -> None:
    host.existing = {"vlserve": "Up 2 hours"}
    result = host.run("--platform", "cpu")
    assert result.returncode == 1 and "already exists (Up 2 hours)" in result.stderr
    replaced = host.run("--platform", "cpu", "--replace")
    assert replaced.returncode == 0, replaced.stderr
    assert "+ docker rm -f vlserve" in replaced.stdout


def test_busy_port_is_refused(host: Host) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = host.run("--platform", "cpu", "--port", str(port))
    assert result.returncode == 1 and f"port {port} is already in use" in result.stderr


def test_bad_arguments_fail_clearly(host: Host) -> None:
    host.add_npus(2)
    for args, message in [
        (("--devices", "5"), "npu device 5 not found"),
        (("--devices", "x"), "bad device list"),
        (("--bogus",), "unknown option"),
        (("--platform", "cuda"), "no cuda devices"),
        (("--engine", "tgi"), "--engine must be"),
    ]:
        result = host.run(*args)
        assert result.returncode == 1 and message in result.stderr, (args, result.stderr)
        assert "+ docker run" not in result.stdout


@pytest.mark.skipif(tool("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck_clean() -> None:
    scripts = sorted(
        p for folder in ("deploy", "scripts", "benchmarks") for p in (REPO / folder).rglob("*.sh")
    )
    assert SCRIPT in scripts and REPO / "scripts" / "_env.sh" in scripts
    result = subprocess.run(
        [tool("shellcheck") or "", *map(str, scripts)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout


@pytest.mark.skipif(tool("hadolint") is None, reason="hadolint not installed")
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(dockerfile: Path) -> None:
    result = subprocess.run(
        [tool("hadolint") or "", str(dockerfile)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout


def test_dockerfiles_exist_and_ascend_requires_its_base_image() -> None:
    names = {p.name for p in DOCKERFILES}
    assert {"Dockerfile.cpu", "Dockerfile.cuda", "Dockerfile.ascend"} <= names
    ascend = (REPO / "deploy" / "Dockerfile.ascend").read_text()
    assert "ARG BASE_IMAGE\n" in ascend  # no default, so never a silent :latest
    assert ":latest" not in ascend
    assert os.access(SCRIPT, os.X_OK)


def test_dry_run_shows_the_safe_defaults(host: Host) -> None:
    """Restarts after a crash or a reboot, and the API key passed by name, never printed."""
    key = "sk-do-not-print-4c1f"
    result = host.run("--platform", "cpu", VLSERVE_API_KEY=key)
    assert result.returncode == 0, result.stderr
    argv = docker_run_argv(result.stdout)
    assert argv[argv.index("--restart") + 1] == "unless-stopped"
    assert argv[argv.index("--stop-timeout") + 1] == "120"
    keys = [argv[i + 1] for i, a in enumerate(argv) if a == "-e" and "API_KEY" in argv[i + 1]]
    assert keys == ["VLSERVE_API_KEY"]  # docker copies the value from the environment
    assert key not in result.stdout + result.stderr
    assert "VLSERVE_API_KEY is not set" not in result.stderr

    keyless = host.run("--platform", "cpu")
    assert keyless.returncode == 0
    assert "-e VLSERVE_API_KEY" not in keyless.stdout
    assert "VLSERVE_API_KEY is not set" in keyless.stderr  # 0.0.0.0 with no key: said


def test_vllm_gets_the_key_as_its_own_variable(host: Host) -> None:
    host.add_npus(2)
    host.images = ["vllm/vllm-openai:v0.11.0"]
    key = "sk-vllm-1234"
    result = host.run("--engine", "vllm", "--image", "vllm/vllm-openai:v0.11.0",
                      VLSERVE_API_KEY=key)  # fmt: skip
    assert result.returncode == 0, result.stderr
    argv = docker_run_argv(result.stdout)
    envs = [argv[i + 1] for i, a in enumerate(argv) if a == "-e"]
    assert "VLLM_API_KEY" in envs and "VLSERVE_API_KEY" not in envs
    assert key not in result.stdout + result.stderr


def test_generic_environment_names_are_not_read(host: Host) -> None:
    """An unrelated CONTAINER_NAME or IMAGE no longer names the container or picks the image; the
    prototype's names are reported, and the prefixed ones are read."""
    result = host.run("--platform", "cpu", CONTAINER_NAME="foo", IMAGE="other:1", HOST_PORT="1")
    assert result.returncode == 0, result.stderr
    argv = docker_run_argv(result.stdout)
    assert argv[argv.index("--name") + 1] == "vlserve"
    assert "vlserve:cpu" in argv and "other:1" not in argv
    for name in ("CONTAINER_NAME", "IMAGE", "HOST_PORT"):
        assert f"{name} is set in the environment and ignored" in result.stderr
    named = host.run("--platform", "cpu", VLSERVE_CONTAINER_NAME="bar", VLSERVE_RESTART_POLICY="no")
    argv = docker_run_argv(named.stdout)
    assert argv[argv.index("--name") + 1] == "bar"
    assert argv[argv.index("--restart") + 1] == "no"
    assert "ignored" not in named.stderr


def test_every_setting_has_a_flag_and_a_prefixed_variable() -> None:
    text = SCRIPT.read_text()
    names = re.findall(r"^[A-Z_]+=\$\{VLSERVE_([A-Z_0-9]+):-", text, flags=re.MULTILINE)
    assert len(names) >= 30 and "RESTART_POLICY" in names
    usage = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True).stdout
    for name in names:
        assert f"[{name}" in usage, name  # each documented with its flag
    # Nothing else is read from an unprefixed variable.
    assert not re.findall(r"^[A-Z_]+=\$\{(?!VLSERVE_)[A-Z_]+:-", text, flags=re.MULTILINE)


def test_new_flags_reach_docker(host: Host) -> None:
    result = host.run("--platform", "cpu", "--restart", "on-failure:3", "--stop-timeout", "30",
                      "--shm-size", "2g", "--test-data", "/mnt/td", "--container-test-data", "/td")  # fmt: skip
    assert result.returncode == 0, result.stderr
    argv = docker_run_argv(result.stdout)
    assert argv[argv.index("--restart") + 1] == "on-failure:3"
    assert argv[argv.index("--stop-timeout") + 1] == "30"
    assert argv[argv.index("--shm-size") + 1] == "2g"
    assert "/mnt/td:/td:ro" in argv
    bad = host.run("--platform", "cpu", "--restart", "sometimes")
    assert bad.returncode == 1 and "--restart must be" in bad.stderr
    missing = host.run("--platform", "cpu", "--name")
    assert missing.returncode == 1 and "--name needs a value" in missing.stderr


def test_a_container_that_restarts_before_ready_is_stopped(host: Host, tmp_path: Path) -> None:
    """unless-stopped would bring a failing server back forever: a restart before the first
    readiness is a failed start."""
    host.curl_failures = -1
    host.restart_count = 2
    host.logs = "model path /models/model has no config.json"
    result = host.run_for_real("--platform", "cpu", "--model-path", str(tmp_path),
                               "--poll-interval", "0.05")  # fmt: skip
    assert result.returncode == 1
    assert "restarted 2 time(s)" in result.stderr and "no config.json" in result.stderr
    assert ["stop", "vlserve"] in host.docker_calls()
