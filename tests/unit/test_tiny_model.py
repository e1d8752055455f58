"""The tiny Qwen3-VL checkpoint: files, caching, loading, chat template, images and generation."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("torchvision")
Image = pytest.importorskip("PIL.Image")

from tests.conftest import load_checkpoint  # noqa: E402
from vlserve.cli import main as vlserve_main  # noqa: E402
from vlserve.testing import build_tiny_model, ensure_tiny_model  # noqa: E402
from vlserve.testing.tiny_model import cache_key, count_parameters  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
IMAGE_PAD = 151655


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def picture(width: int, height: int) -> Any:
    image = Image.new("RGB", (width, height), (200, 30, 40))
    for x in range(0, width, 5):
        image.putpixel((x, (x * 7) % height), (x % 256, 90, 255 - x % 256))
    return image


def image_chat() -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": picture(448, 448)},
                {"type": "text", "text": "Describe this image."},
            ],
        },
    ]


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vlserve-cache")


@pytest.fixture(scope="module")
def tiny_dir(cache_root: Path) -> Path:
    return ensure_tiny_model(cache_dir=cache_root)


@pytest.fixture(scope="module")
def model(tiny_dir: Path) -> Any:
    return load_checkpoint(tiny_dir)


@pytest.fixture(scope="module")
def processor(tiny_dir: Path) -> Any:
    return transformers.AutoProcessor.from_pretrained(tiny_dir)


def test_checkpoint_files(tiny_dir: Path) -> None:
    names = {p.name for p in tiny_dir.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "video_preprocessor_config.json",
        "chat_template.jinja",
    } <= names
    assert (tiny_dir / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_config_is_legacy_form_with_tiny_dims(tiny_dir: Path) -> None:
    config = json.loads((tiny_dir / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    assert "rope_parameters" not in json.dumps(config)  # 4.57 cannot read the 5.x form
    assert text["rope_theta"] == 5_000_000
    assert text["rope_scaling"]["mrope_section"] == [6, 5, 5]
    assert text["rope_scaling"]["mrope_interleaved"] is True
    assert sum(text["rope_scaling"]["mrope_section"]) * 2 == text["head_dim"]
    assert (text["hidden_size"], text["num_hidden_layers"], text["vocab_size"]) == (64, 2, 151936)
    assert vision["out_hidden_size"] == text["hidden_size"]
    assert vision["deepstack_visual_indexes"] == [0, 1]
    assert config["tie_word_embeddings"] is False and text["tie_word_embeddings"] is False


def test_processor_values_are_the_released_ones(tiny_dir: Path) -> None:
    pre = json.loads((tiny_dir / "preprocessor_config.json").read_text())
    assert (pre["patch_size"], pre["merge_size"], pre["temporal_patch_size"]) == (16, 2, 2)
    assert pre["image_mean"] == pre["image_std"] == [0.5, 0.5, 0.5]
    assert pre["size"] == {"shortest_edge": 65536, "longest_edge": 16777216}


def test_second_call_reuses_the_cache(tiny_dir: Path, cache_root: Path) -> None:
    inode = (tiny_dir / "model.safetensors").stat().st_ino
    again = ensure_tiny_model(cache_dir=cache_root)
    assert again == tiny_dir
    assert (again / "model.safetensors").stat().st_ino == inode
    assert tiny_dir.name == cache_key(tied=False)
    assert not [p for p in cache_root.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_cache_dir_comes_from_the_environment(
    tiny_dir: Path, cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLSERVE_CACHE_DIR", str(cache_root))
    assert ensure_tiny_model() == tiny_dir


def test_parallel_callers_share_one_build(tmp_path: Path) -> None:
    stale = tmp_path / f".{cache_key(tied=False)}.died-mid-build"
    stale.mkdir()
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_tiny_model(cache_dir=tmp_path)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and len(set(results)) == 1
    dirs = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert dirs == [results[0]]  # one build landed; stale and temp dirs are gone


def test_weights_are_deterministic_per_seed(tiny_dir: Path, tmp_path: Path) -> None:
    same = build_tiny_model(tmp_path / "seed0", seed=0)
    other = build_tiny_model(tmp_path / "seed1", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert sha256(same / name) == sha256(tiny_dir / name)
    assert sha256(other / "model.safetensors") != sha256(tiny_dir / "model.safetensors")
    assert sha256(other / "tokenizer.json") == sha256(tiny_dir / "tokenizer.json")


def test_tied_checkpoint_shares_embeddings(tmp_path: Path) -> None:
    tied_dir = build_tiny_model(tmp_path / "tied", tied=True, dtype="float32")
    tied = transformers.Qwen3VLForConditionalGeneration.from_pretrained(
        tied_dir, dtype=torch.float32
    )
    embed = tied.model.language_model.embed_tokens.weight
    assert tied.lm_head.weight.data_ptr() == embed.data_ptr()
    assert 10_000_000 < count_parameters(tied_dir) < 11_000_000


def test_untied_head_never_picks_ids_without_text(model: Any) -> None:
    head = model.lm_head.weight
    assert head.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr()
    assert torch.count_nonzero(head[151643:]) == 0
    assert torch.all(head[:151643].abs().sum(dim=1) > 0)


def test_template_renders_all_turns_and_parts_in_order(processor: Any) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare "},
                {"type": "image"},
                {"type": "text", "text": " and "},
                {"type": "image_url", "image_url": {"url": "data:,"}},
            ],
        },
        {"role": "assistant", "content": "Both red."},
        {"role": "user", "content": "你好"},
    ]
    rendered = processor.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    vision = "<|vision_start|><|image_pad|><|vision_end|>"
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        f"<|im_start|>user\nCompare {vision} and {vision}<|im_end|>\n"
        "<|im_start|>assistant\nBoth red.<|im_end|>\n"
        "<|im_start|>user\n你好<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    bare = [{"role": "user", "content": "Hi"}]  # no default system prompt, no prompt when not asked
    assert processor.apply_chat_template(bare, tokenize=False) == "<|im_start|>user\nHi<|im_end|>\n"


def test_processor_expands_image_pads(processor: Any) -> None:
    inputs = processor.apply_chat_template(
        image_chat(),
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        add_generation_prompt=True,
    )
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(IMAGE_PAD) == (448 // 32) * (448 // 32) == 196
    assert ids[:3] == [151644, 8948, 198]  # "<|im_start|>system\n"
    assert ids[-3:] == [151644, 77091, 198]  # "<|im_start|>assistant\n"
    assert inputs["image_grid_thw"].tolist() == [[1, 28, 28]]


def test_two_images_of_different_sizes(processor: Any) -> None:
    content = [
        {"type": "image", "image": picture(448, 448)},
        {"type": "image", "image": picture(640, 320)},
        {"type": "text", "text": "Which is wider?"},
    ]
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": content}],
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        add_generation_prompt=True,
    )
    assert inputs["input_ids"][0].tolist().count(IMAGE_PAD) == 196 + 200
    assert inputs["image_grid_thw"].tolist() == [[1, 28, 28], [1, 20, 40]]


def greedy_tokens(model: Any, processor: Any, max_new_tokens: int = 20) -> list[int]:
    inputs = processor.apply_chat_template(
        image_chat(),
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        add_generation_prompt=True,
    )
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def test_greedy_generation_is_visible_varied_text(model: Any, processor: Any) -> None:
    tokens = greedy_tokens(model, processor)
    assert len(tokens) == 20  # no eos: the head never picks added tokens
    assert all(t < 151643 for t in tokens)
    assert len(set(tokens)) >= 5
    text = processor.decode(tokens)
    assert text.strip()
    assert any(ord(ch) > 127 for ch in text)  # multi-byte pieces show up in practice


def test_make_tiny_model_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert vlserve_main(["make-tiny-model", str(out), "--seed", "3", "--dtype", "float32"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "20,107,200 parameters" in printed
    assert vlserve_main(["make-tiny-model", str(out)]) == 1  # not empty, no --force
    assert "--force" in capsys.readouterr().err
    assert vlserve_main(["make-tiny-model", str(out), "--force", "--tied"]) == 0
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    with pytest.raises(SystemExit):
        vlserve_main(["make-tiny-model", str(out), "--dtype", "float16"])


_TF457_SCRIPT = r"""
import json, sys, torch, transformers
from PIL import Image
sys.path.insert(0, sys.argv[2])
from test_tiny_model import image_chat
d = sys.argv[1]
model = transformers.Qwen3VLForConditionalGeneration.from_pretrained(d, dtype=torch.float32)
proc = transformers.AutoProcessor.from_pretrained(d)
inputs = proc.apply_chat_template(image_chat(), tokenize=True, return_dict=True,
                                  return_tensors="pt", add_generation_prompt=True)
out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
print(json.dumps({"version": transformers.__version__,
                  "tokens": out[0, inputs["input_ids"].shape[1]:].tolist()}))
"""


def test_transformers_457_loads_and_agrees(tiny_dir: Path, model: Any, processor: Any) -> None:
    """Runs only where a 4.57.1 side install exists (``VLSERVE_TF457_PATH`` or ``.venv-tf457``)."""
    side = Path(os.environ.get("VLSERVE_TF457_PATH", REPO / ".venv-tf457"))
    if not (side / "transformers").is_dir():
        pytest.skip(f"no transformers 4.57.1 side install at {side}")
    env = {**os.environ, "PYTHONPATH": str(side)}
    args = [sys.executable, "-c", _TF457_SCRIPT, str(tiny_dir), str(Path(__file__).parent)]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["version"] == "4.57.1"
    assert result["tokens"] == greedy_tokens(model, processor)


@pytest.mark.parametrize("name", ["SMALL", "QWEN3_VL_8B"])
def test_other_shapes_write_a_valid_qwen3_vl(name: str, tmp_path: Path) -> None:
    from vlserve.testing import tiny_model

    shape = getattr(tiny_model, name)
    tiny_model.write_model_files(tmp_path, shape=shape)
    assert not (tmp_path / "model.safetensors").exists()  # served with --load-format dummy
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    text, vision = config.text_config, config.vision_config
    assert sum(text.rope_scaling["mrope_section"]) * 2 == text.head_dim == shape.head_dim
    assert vision.out_hidden_size == text.hidden_size == shape.text_hidden
    assert max(vision.deepstack_visual_indexes) < vision.depth == shape.vision_depth
    with torch.device("meta"):
        model = transformers.Qwen3VLForConditionalGeneration(config)
    head = model.lm_head.weight.numel()
    layers = sum(p.numel() for p in model.model.language_model.layers.parameters())
    assert head == 151936 * shape.text_hidden
    # what the shapes are for: layers against the output head, as the docs say
    expected = {"SMALL": (0.2, 0.25), "QWEN3_VL_8B": (10, 12)}[name]
    assert expected[0] < layers / head < expected[1]
