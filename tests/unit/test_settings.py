"""The one declared configuration (vlserve.settings): flags, environment variables, validation and
README's table all come from ServerConfig's fields, and a test fails when they drift."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from vlserve import settings
from vlserve.api.cli import add_arguments, config_from_args
from vlserve.config import README_BEGIN, README_END, ServerConfig

ROOT = Path(__file__).resolve().parents[2]
EVERY = list(settings.settings(ServerConfig))
SEED_NAMES = {"MODEL_PATH", "MODEL_ID", "SERVER_HOST", "SERVER_PORT", "DEVICE", "MAX_IMAGE_PIXELS"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlserve serve")
    add_arguments(parser)
    return parser


def _get(config: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        config = getattr(config, name)
    return config


def _other_value(s: settings.Setting, tmp_path: Path) -> tuple[str, Any]:
    """A valid value that is not the default, as text and as the config holds it."""
    if s.path[-1] == "allowed_local_media_path":
        return str(tmp_path), str(tmp_path)
    if s.path[-1] == "limit_mm_per_prompt":
        return "image=2", "image=2"
    if s.kind is bool:
        return ("0", False) if s.default else ("1", True)
    if s.kind is tuple:
        return "a.example,b.example", ("a.example", "b.example")
    if s.option.choices:
        value = next(c for c in s.option.choices if c != s.default)
        return value, value
    if s.kind is str:
        return "/some/where", "/some/where"
    if s.kind is float:
        value = s.default / 2 if s.default else 1.0
        return repr(value), value
    value = s.default + 1 if s.default is not None else 128
    return str(value), value


def test_every_setting_has_one_flag_and_one_prefixed_variable() -> None:
    flags = [f for s in EVERY for f in (s.flag, *s.option.aliases)]
    envs = [s.env for s in EVERY]
    assert len(flags) == len(set(flags)) and len(envs) == len(set(envs))
    assert all(e.startswith("VLSERVE_") for e in envs)
    aliases = {a for s in EVERY for a in s.option.env_aliases}
    assert aliases == SEED_NAMES  # the prototype's names, and no other unprefixed ones
    assert len(EVERY) >= 45


@pytest.mark.parametrize("s", EVERY, ids=lambda s: s.flag)
def test_each_variable_sets_its_setting_and_the_flag_wins(
    s: settings.Setting, tmp_path: Path
) -> None:
    text, value = _other_value(s, tmp_path)
    from_env = settings.build(ServerConfig, None, {s.env: text})
    if s.path[-1] == "limit_mm_per_prompt":
        assert from_env.media.max_images_per_request == 2
    assert _get(from_env, s.path) == value
    default = settings.build(ServerConfig, _parser().parse_args([]), {})
    assert _get(default, s.path) == _get(ServerConfig(), s.path)
    if s.kind is bool:
        argv = [s.flag if value else "--no-" + s.flag[2:]]
        env = {s.env: "1" if not value else "0"}
    else:
        argv = [s.flag, *(value if s.kind is tuple else [text])]
        if s.option.repeat:
            argv = [arg for item in value for arg in (s.flag, item)]
        env = {s.env: "2" if s.kind in (int, float) else "other.example"}
    assert _get(config_from_args(_parser().parse_args(argv), env), s.path) == value


def test_the_prototypes_variables_still_work_and_the_prefixed_name_wins() -> None:
    env = {"MODEL_PATH": "/opt/m", "SERVER_PORT": "9123", "DEVICE": "cpu", "MODEL_ID": "q"}
    c = settings.build(ServerConfig, None, env)
    assert (c.model_path, c.port, c.device, c.model_names) == ("/opt/m", 9123, "cpu", ("q",))
    c = settings.build(ServerConfig, None, {**env, "VLSERVE_PORT": "9200", "MODEL_PATH": ""})
    assert (c.port, c.model_path) == (9200, "/mnt/model_weights")  # an empty value is unset


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"VLSERVE_MAX_NUM_SEQS": "many"}, "VLSERVE_MAX_NUM_SEQS='many': expected int"),
        ({"VLSERVE_PREFIX_CACHE": "maybe"}, "VLSERVE_PREFIX_CACHE='maybe': expected one of"),
        ({"VLSERVE_MAX_NUM_SEQS": "0"}, "--max-num-seqs / max_num_seqs must be an integer >= 1"),
        ({"VLSERVE_DEVICE": "tpu"}, "--device / device must be one of auto, npu, cuda, cpu"),
        ({"VLSERVE_KV_CACHE_MEMORY_FRACTION": "1.5"}, "must be a finite number > 0 and <= 1"),
        ({"VLSERVE_REQUEST_TIMEOUT": "nan"}, "--request-timeout / request_timeout_s must be"),
    ],
)
def test_bad_values_are_refused_naming_the_variable_or_flag(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError) as info:
        settings.build(ServerConfig, None, env)
    assert message in str(info.value)


def test_the_bounds_are_checked_once_where_the_setting_is_declared() -> None:
    from vlserve.engine.config import EngineConfig

    # the engine accepts what the server accepts: one declaration, one bound
    assert EngineConfig(kv_cache_tokens=64).kv_cache_tokens == 64
    with pytest.raises(ValueError, match="--kv-cache-tokens"):
        ServerConfig(EngineConfig(kv_cache_tokens=63))
    with pytest.raises(ValueError, match="--port"):
        ServerConfig(port=70000)


def test_help_names_every_flag_and_variable() -> None:
    text = _parser().format_help()
    for s in EVERY:
        assert s.flag in text and s.env in text, s.flag


def test_readme_table_is_the_schemas() -> None:
    """Regenerate with `python -m vlserve.settings readme` after changing a setting."""
    readme = (ROOT / "README.md").read_text()
    table = readme.split(README_BEGIN + "\n", 1)[1].split(README_END, 1)[0]
    assert table == settings.flag_table(ServerConfig)


def test_secrets_stay_out_of_configmaps() -> None:
    names = settings.env_names(ServerConfig, secrets=False)
    assert "VLSERVE_API_KEY" not in names and "VLSERVE_MAX_NUM_SEQS" in names
    assert "VLSERVE_API_KEY" in settings.env_names(ServerConfig)


def test_unsupported_setting_types_fail_loudly() -> None:
    @dataclasses.dataclass(frozen=True)
    class Odd:
        x: list[int] = settings.option(None, group="g", help="h")  # noqa: RUF009

    with pytest.raises(TypeError, match="unsupported setting type"):
        list(settings.settings(Odd))


def test_serve_exits_2_on_a_bad_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from vlserve.api import cli

    monkeypatch.setenv("VLSERVE_LOG_LEVEL", "debug")
    monkeypatch.setenv("VLSERVE_MAX_NUM_SEQS", "0")
    assert cli.run(_parser().parse_args([])) == 2
