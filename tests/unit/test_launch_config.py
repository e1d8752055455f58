"""LaunchConfig, per-instance commands and environments, device detection and the CLI flags."""

from __future__ import annotations

import socket
import stat
from pathlib import Path

import pytest

from vlserve.cli import build_parser
from vlserve.errors import VLServeError
from vlserve.launch.cli import config_from_args
from vlserve.launch.config import DEFAULT_SERVE_COMMAND, LaunchConfig, instance_specs, nginx_spec
from vlserve.launch.devices import (
    count_gpus,
    count_npus,
    default_device_ids,
    detect_device_type,
    parse_device_ids,
)
from vlserve.launch.launcher import check_ports_free


def npu_config(**overrides: object) -> LaunchConfig:
    values: dict[str, object] = {
        "model": "/models/qwen3-vl-8b",
        "device": "npu",
        "device_ids": ("0", "1", "2"),
        "num_instances": 3,
        "port": 9000,
        "base_port": 9101,
    }
    values.update(overrides)
    return LaunchConfig(**values)  # type: ignore[arg-type]


def test_one_instance_per_device_on_consecutive_ports() -> None:
    specs = instance_specs(
        npu_config(serve_args=("--dtype", "bfloat16")), {"SERVER_PORT": "1", "VLSERVE_PORT": "2"}
    )
    assert [s.name for s in specs] == ["instance-0", "instance-1", "instance-2"]
    for index, spec in enumerate(specs):
        port = str(9101 + index)
        argv = list(spec.argv)
        assert argv[argv.index("--port") + 1] == port
        assert argv[argv.index("--device") + 1] == "npu"
        assert argv[argv.index("--model") + 1] == "/models/qwen3-vl-8b"
        assert argv[-2:] == ["--dtype", "bfloat16"]
        assert spec.env["ASCEND_RT_VISIBLE_DEVICES"] == str(index)
        # The user's stray SERVER_PORT must not contradict the flag.
        assert spec.env["SERVER_PORT"] == spec.env["VLSERVE_PORT"] == port
        assert spec.health_url == f"http://127.0.0.1:{port}/health"


def test_cuda_instances_are_pinned_with_cuda_visible_devices() -> None:
    config = npu_config(device="cuda", device_ids=("4", "7"), num_instances=2)
    envs = [spec.env for spec in instance_specs(config, {})]
    assert [env["CUDA_VISIBLE_DEVICES"] for env in envs] == ["4", "7"]
    assert all("ASCEND_RT_VISIBLE_DEVICES" not in env for env in envs)


def test_cpu_instances_share_the_cores() -> None:
    config = npu_config(device="cpu", device_ids=(), num_instances=2, threads_per_instance=3)
    envs = [spec.env for spec in instance_specs(config, {})]
    assert [env["OMP_NUM_THREADS"] for env in envs] == ["3", "3"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"device_ids": ("0",)}, "3 instances need 3 device ids"),
        ({"device": "tpu"}, "device must be one of"),
        ({"base_port": 8999}, "collides"),
        ({"base_port": 65534}, "out of range"),
        ({"num_instances": 0, "device_ids": ()}, "at least 1"),
        ({"stop_timeout_s": 0}, "--stop-timeout-s / stop_timeout_s must be a finite number > 0"),
    ],
)
def test_config_validation(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        npu_config(**overrides)


def test_parse_device_ids() -> None:
    assert parse_device_ids("0,1,4-6") == ("0", "1", "4", "5", "6")
    assert parse_device_ids(" 3 , 07 ") == ("3", "7")
    for bad in ("0,0", "a", "5-2", "1-x"):
        with pytest.raises(ValueError):
            parse_device_ids(bad)


def make_dev_dir(tmp_path: Path, *names: str) -> Path:
    dev = tmp_path / "dev"
    dev.mkdir()
    for name in names:
        (dev / name).touch()
    return dev


def test_npus_are_counted_from_device_nodes(tmp_path: Path) -> None:
    dev = make_dev_dir(tmp_path, "davinci0", "davinci1", "davinci_manager", "devmm_svm")
    assert count_npus(dev) == 2
    assert detect_device_type(dev) == "npu"
    assert default_device_ids("npu", {}, dev) == ("0", "1")
    # A scheduler that already chose devices wins over the device count.
    assert default_device_ids("npu", {"ASCEND_RT_VISIBLE_DEVICES": "4,5"}, dev) == ("4", "5")


def test_gpus_are_counted_with_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(
        "#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: GPU-a)'\necho 'GPU 1: NVIDIA H100 (UUID: GPU-b)'\n"
    )
    smi.chmod(smi.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", str(bin_dir))
    empty = make_dev_dir(tmp_path)
    assert count_gpus(empty) == 2
    assert detect_device_type(empty) == "cuda"
    assert default_device_ids("cuda", {}, empty) == ("0", "1")


def test_no_devices_means_cpu_and_an_explicit_device_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    empty = make_dev_dir(tmp_path)
    assert detect_device_type(empty) == "cpu"
    with pytest.raises(VLServeError, match="no npu devices"):
        default_device_ids("npu", {}, empty)


@pytest.fixture(autouse=True)
def _no_server_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The CLI's defaults come from these; the caller's shell must not leak into the tests.
    for name in ("MODEL_PATH", "DEVICE", "SERVER_PORT"):
        monkeypatch.delenv(name, raising=False)


def parse(*argv: str, env: dict[str, str] | None = None) -> LaunchConfig:
    args = build_parser(["launch"]).parse_args(["launch", *argv])
    return config_from_args(args, env or {})


def test_every_launch_setting_has_a_variable_and_the_flag_wins() -> None:
    """launch's settings are declared once (vlserve.settings), like serve's."""
    env = {"VLSERVE_MODEL": "/env-model", "VLSERVE_DEVICE": "cpu", "VLSERVE_NUM_INSTANCES": "2",
           "VLSERVE_HEALTH_INTERVAL_S": "0.25", "VLSERVE_HUNG_AFTER": "5",
           "VLSERVE_STATE_DIR": "/tmp/x", "SERVER_PORT": "7000", "VLSERVE_NGINX": "off"}  # fmt: skip
    config = parse(env=env)
    assert (config.model, config.device, config.num_instances) == ("/env-model", "cpu", 2)
    assert (config.health_interval_s, config.hung_after, config.port) == (0.25, 5, 7000)
    assert config.state_dir == Path("/tmp/x") and config.nginx == "off"
    assert config.instance_ports == (7001, 7002)
    config = parse("--model", "/flag", "--hung-after", "1", env=env)
    assert (config.model, config.hung_after) == ("/flag", 1)
    assert parse(env={"MODEL_PATH": "/old", "DEVICE": "cpu"}).model == "/old"
    with pytest.raises(ValueError, match="VLSERVE_HUNG_AFTER='x'"):
        parse(env={**env, "VLSERVE_HUNG_AFTER": "x"})
    with pytest.raises(ValueError, match="--hung-after / hung_after must be an integer >= 0"):
        parse(env={**env, "VLSERVE_HUNG_AFTER": "-1"})


def test_cli_builds_the_config_and_passes_arguments_after_double_dash() -> None:
    config = parse("--model", "/m", "--device", "npu", "--devices", "0-3", "--num-instances", "2",
                   "--port", "8000", "--", "--dtype", "bfloat16", "--served-model-name", "q")  # fmt: skip
    assert config.device_ids == ("0", "1")
    assert config.num_instances == 2
    assert config.instance_ports == (8001, 8002)
    assert config.serve_args == ("--dtype", "bfloat16", "--served-model-name", "q")


def test_cli_cpu_instances_and_custom_serve_command() -> None:
    config = parse("--model", "/m", "--device", "cpu", "--num-instances", "2",
                   "--serve-command", "python3 fake.py --x 'a b'", "--nginx", "off")  # fmt: skip
    assert config.device_ids == () and config.num_instances == 2
    assert config.serve_command == ("python3", "fake.py", "--x", "a b")
    assert config.nginx == "off"


def test_cli_errors_are_clear() -> None:
    with pytest.raises(VLServeError, match="--model"):
        parse("--device", "cpu")
    with pytest.raises(VLServeError, match="only 2 npu"):
        parse("--model", "/m", "--device", "npu", "--devices", "0,1", "--num-instances", "3")


def test_busy_ports_are_refused_before_anything_starts() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        busy = listener.getsockname()[1]
        config = npu_config(device="cpu", device_ids=(), num_instances=1, host="127.0.0.1",
                            port=busy - 1 if busy > 1024 else busy + 1, base_port=busy)  # fmt: skip
        with pytest.raises(VLServeError, match=f"already in use: {busy}"):
            check_ports_free(config)
    check_ports_free(config)  # closed again: free


@pytest.mark.parametrize(
    ("host", "url"),
    [("0.0.0.0", "http://127.0.0.1:9000"), ("::", "http://[::1]:9000"),
     ("10.0.0.5", "http://10.0.0.5:9000"), ("::1", "http://[::1]:9000")],
)  # fmt: skip
def test_front_url_reaches_wildcards_through_loopback(host: str, url: str) -> None:
    assert npu_config(host=host).front_url == url


def test_cli_hung_instance_flags_and_defaults() -> None:
    config = parse("--model", "/m", "--device", "cpu")
    assert (config.health_interval_s, config.health_timeout_s, config.hung_after) == (1.0, 2.0, 3)
    config = parse("--model", "/m", "--device", "cpu", "--health-interval-s", "0.5",
                   "--health-timeout-s", "1.5", "--hung-after", "0")  # fmt: skip
    assert (config.health_interval_s, config.health_timeout_s, config.hung_after) == (0.5, 1.5, 0)


@pytest.mark.parametrize(
    "overrides", [{"health_interval_s": 0}, {"health_timeout_s": -1.0}, {"hung_after": -1}]
)
def test_hung_instance_settings_are_validated(overrides: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        npu_config(**overrides)


def test_nginx_is_not_subject_to_the_hang_rule() -> None:
    # Its /health is proxied to an instance: a stopped instance must not get nginx killed.
    assert not nginx_spec(["nginx"], npu_config(), {}).restart_if_hung
    assert all(spec.restart_if_hung for spec in instance_specs(npu_config(), {}))


def test_launch_settings_share_only_the_pinned_variables_with_serve() -> None:
    """Instances inherit launch's environment: a launch setting whose variable serve also read
    would configure every instance by accident. Only the four that launch pins may overlap."""
    from vlserve import settings
    from vlserve.config import ServerConfig
    from vlserve.launch.config import LaunchTarget

    serve = set(settings.env_names(ServerConfig))
    launch = set(settings.env_names(LaunchConfig)) | set(settings.env_names(LaunchTarget))
    pinned = {"VLSERVE_HOST", "VLSERVE_PORT", "VLSERVE_MODEL", "VLSERVE_DEVICE"}
    assert serve & launch == pinned
    env = instance_specs(npu_config(), {"VLSERVE_PORT": "1", "VLSERVE_MODEL": "/x"})[0].env
    assert {name: env[name] for name in pinned} == {
        "VLSERVE_HOST": "127.0.0.1", "VLSERVE_PORT": "9101",
        "VLSERVE_MODEL": "/models/qwen3-vl-8b", "VLSERVE_DEVICE": "npu",
    }  # fmt: skip


def test_nginx_waits_a_little_past_the_instances_request_timeout() -> None:
    from vlserve.launch.config import nginx_read_timeout_s

    default = npu_config(serve_command=DEFAULT_SERVE_COMMAND)
    assert nginx_read_timeout_s(default, {}) == 630  # serve's default 600 s, plus 30
    assert nginx_read_timeout_s(default, {"VLSERVE_REQUEST_TIMEOUT": "100.5"}) == 131
    flagged = npu_config(serve_args=("--dtype", "bfloat16", "--request-timeout=1800"))
    assert nginx_read_timeout_s(flagged, {"VLSERVE_REQUEST_TIMEOUT": "5"}) == 1830  # flag wins
    # Another server behind launch: its timeouts are unknown, nginx waits an hour.
    assert nginx_read_timeout_s(npu_config(serve_command=("vllm", "serve")), {}) == 3600
    with pytest.raises(VLServeError, match="not valid for vlserve serve"):
        nginx_read_timeout_s(npu_config(serve_args=("--request-timeout", "soon")), {})
