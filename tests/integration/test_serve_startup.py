"""`vlserve serve` refuses to start half-alive: a bad device or model exits at once, non-zero."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vlserve", "serve", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("device", "reason"),
    [
        ("npu", "torch_npu"),
        ("cuda", "no CUDA device is available"),
    ],
)
def test_unusable_device_exits_at_once(tiny_model_path: Path, device: str, reason: str) -> None:
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    r = _serve("--model", str(tiny_model_path), "--device", device)
    assert r.returncode == 3, r.stderr
    assert f"--device {device} was requested" in r.stderr and reason in r.stderr


def test_missing_model_directory_exits_2(tmp_path: Path) -> None:
    r = _serve("--model", str(tmp_path / "nope"), "--device", "cpu")
    assert r.returncode == 2
    assert "does not exist" in r.stderr


def test_a_directory_without_weights_needs_the_dummy_load_format(tmp_path: Path) -> None:
    from vlserve.testing.tiny_model import write_model_files

    write_model_files(tmp_path)
    r = _serve("--model", str(tmp_path), "--device", "cpu")
    assert r.returncode == 1, r.stderr  # the engine could not load: no half-alive server
    assert "failed to load the model" in r.stderr


def test_dummy_load_format_serves_random_weights_the_same_in_every_process(
    tmp_path: Path,
) -> None:
    import openai
    import torch

    from vlserve.engine.device import DeviceInfo
    from vlserve.engine.runner import load_model
    from vlserve.testing.server import start_server, stop_server
    from vlserve.testing.tiny_model import write_model_files

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    write_model_files(model_dir)  # config, tokenizer, processor: no model.safetensors
    cpu = DeviceInfo("cpu", torch.float32)
    first, second = (load_model(str(model_dir), cpu, "dummy").state_dict() for _ in range(2))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert all(t.dtype == torch.float32 for t in first.values())

    answers = []
    for run in range(2):
        server = start_server(model_dir, tmp_path / f"run{run}", "--load-format", "dummy")
        try:
            client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0)
            done = client.chat.completions.create(
                model=server.model,
                messages=[{"role": "user", "content": "Say something."}],
                max_tokens=8,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
        finally:
            stop_server(server)
        assert done.usage is not None and done.usage.completion_tokens == 8
        answers.append(done.choices[0].message.content)
    assert answers[0] == answers[1]  # same seed, same weights: a benchmark's two servers agree
