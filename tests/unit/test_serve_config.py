"""`vlserve serve` flags and the prototype's env vars → ServerConfig."""

from __future__ import annotations

import argparse

import pytest

from vlserve.api.cli import add_arguments, config_from_args


def _config(argv: list[str]):  # type: ignore[no-untyped-def]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def test_prototype_env_vars_are_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL_PATH", "/opt/models/qwen3-vl-8b")
    monkeypatch.setenv("MODEL_ID", "qwen3-vl-8b")
    monkeypatch.setenv("SERVER_HOST", "127.0.0.2")
    monkeypatch.setenv("SERVER_PORT", "9123")
    monkeypatch.setenv("DEVICE", "cpu")
    monkeypatch.setenv("MAX_IMAGE_PIXELS", "1000000")
    c = _config([])
    assert c.model_path == "/opt/models/qwen3-vl-8b"
    assert c.model_names == ("qwen3-vl-8b",)
    assert c.accepted_model_names == ("qwen3-vl-8b", "/opt/models/qwen3-vl-8b")
    assert (c.host, c.port, c.device) == ("127.0.0.2", 9123, "cpu")
    assert c.media.max_image_pixels == 1_000_000


def test_flags_win_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVER_PORT", "9123")
    monkeypatch.setenv("MODEL_ID", "from-env")
    c = _config(
        [
            "--model",
            "/m",
            "--port",
            "9200",
            "--served-model-name",
            "a",
            "b",
            "--max-num-seqs",
            "4",
            "--max-queue",
            "7",
        ]
    )
    assert c.port == 9200 and c.model_names == ("a", "b")
    assert c.engine.scheduler.max_num_seqs == 4 and c.engine.scheduler.max_queue == 7


def test_defaults_match_the_prototype(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "MODEL_PATH",
        "MODEL_ID",
        "SERVER_HOST",
        "SERVER_PORT",
        "DEVICE",
        "MAX_IMAGE_PIXELS",
    ):
        monkeypatch.delenv(name, raising=False)
    c = _config([])
    assert (c.model_path, c.host, c.port, c.device) == (
        "/mnt/model_weights",
        "0.0.0.0",
        9000,
        "auto",
    )
    assert c.media.max_image_pixels == 2_621_440
    assert c.engine.encoder_thread and not _config(["--no-encoder-thread"]).engine.encoder_thread


def test_load_format_is_auto_unless_dummy_is_asked_for() -> None:
    assert _config(["--model", "/m"]).engine.load_format == "auto"
    assert _config(["--model", "/m", "--load-format", "dummy"]).engine.load_format == "dummy"
    with pytest.raises(SystemExit):
        _config(["--model", "/m", "--load-format", "pt"])
    from vlserve.engine.config import EngineConfig

    with pytest.raises(ValueError, match="--load-format"):
        EngineConfig("/m", load_format="safetensors")


def test_model_impl_flag_env_and_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _config(["--model", "/m"]).engine.model_impl == "auto"
    impl = _config(["--model", "/m", "--model-impl", "transformers"]).engine.model_impl
    assert impl == "transformers"
    monkeypatch.setenv("VLSERVE_MODEL_IMPL", "vlserve")
    assert _config(["--model", "/m"]).engine.model_impl == "vlserve"
    with pytest.raises(SystemExit):
        _config(["--model", "/m", "--model-impl", "vllm"])
    from vlserve.engine.config import EngineConfig

    with pytest.raises(ValueError, match="--model-impl"):
        EngineConfig("/m", model_impl="hf")


def test_enforce_eager_flag_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _config(["--model", "/m"]).engine.enforce_eager is False
    eager = _config(["--model", "/m", "--enforce-eager"]).engine
    assert eager.enforce_eager is True and eager.decode_graph == "none"
    monkeypatch.setenv("VLSERVE_ENFORCE_EAGER", "1")
    assert _config(["--model", "/m"]).engine.enforce_eager is True


def test_media_flag_defaults_are_media_config_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    from vlserve.media.config import MediaConfig

    monkeypatch.delenv("MAX_IMAGE_PIXELS", raising=False)
    assert _config(["--model", "/m"]).media == MediaConfig()
