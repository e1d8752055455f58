"""The scripted tiny Qwen3-VL: its answer to any chat prompt is a fixed script, then EOS."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("torchvision")
Image = pytest.importorskip("PIL.Image")

from tests.conftest import load_checkpoint  # noqa: E402
from vlserve.cli import main as vlserve_main  # noqa: E402
from vlserve.testing import (  # noqa: E402
    DEFAULT_SCRIPT_IDS,
    DEFAULT_SCRIPT_TEXT,
    INCOMPLETE_UTF8_SCRIPT_IDS,
    ensure_scripted_model,
    script_token_ids,
)
from vlserve.testing.scripted_model import (  # noqa: E402
    EOS_ID,
    TOOL_CALL_END_ID,
    TOOL_CALL_START_ID,
    scripted_cache_key,
)
from vlserve.testing.scripted_verify import verification_chats  # noqa: E402

TOOL_CALL = (
    "<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
    "</tool_call>"
)


def text(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}


def picture(width: int, height: int, shade: int) -> Any:
    image = Image.new("RGB", (width, height), (shade, 255 - shade, 77))
    for x in range(0, width, 4):
        image.putpixel((x, (x * 5) % height), (255, shade, 0))
    return image


# Prompts the build's own verification does not use (verification_chats() holds those).
FRESH_CHATS: dict[str, list[dict[str, Any]]] = {
    "text": [{"role": "user", "content": [text("What should I wear in Paris today?")]}],
    "image": [
        {"role": "system", "content": [text("You describe pictures.")]},
        {
            "role": "user",
            "content": [text("Look:"), {"type": "image", "image": picture(300, 200, 10)}],
        },
    ],
    "two-images": [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": picture(512, 256, 90)},
                {"type": "image", "image": picture(100, 700, 200)},
                text("Which one is taller?"),
            ],
        }
    ],
    "multi-turn-tool": [
        {"role": "system", "content": [text("Use tools when useful.")]},
        {"role": "user", "content": [text("Weather in Paris?")]},
        {"role": "assistant", "content": [text(DEFAULT_SCRIPT_TEXT)]},
        {"role": "tool", "content": [text('{"temperature": 21, "unit": "celsius"}')]},
        {"role": "user", "content": [text("And tomorrow? 你好 " + TOOL_CALL)]},
    ],
    "long": [
        {
            "role": "user",
            "content": [
                text(" ".join(f'line {i}: the city is Paris, "unit": {i}' for i in range(45)))
            ],
        }
    ],
}


@pytest.fixture(scope="module")
def scripted_dir() -> Path:
    # The default cache dir: built once per machine (seconds), shared with other test modules.
    return ensure_scripted_model()


@pytest.fixture(scope="module")
def model(scripted_dir: Path) -> Any:
    return load_checkpoint(scripted_dir)


@pytest.fixture(scope="module")
def processor(scripted_dir: Path) -> Any:
    return transformers.AutoProcessor.from_pretrained(scripted_dir)


def generate(model: Any, processor: Any, chat: list[dict[str, Any]], **kwargs: Any) -> Any:
    inputs = processor.apply_chat_template(
        chat, tokenize=True, return_dict=True, return_tensors="pt", add_generation_prompt=True
    )
    options = {"do_sample": False, "max_new_tokens": 48, "eos_token_id": EOS_ID, **kwargs}
    with torch.inference_mode():
        out = model.generate(**inputs, pad_token_id=151643, **options)
    sequences = out.sequences if hasattr(out, "sequences") else out
    return inputs["input_ids"].shape[1], sequences[0, inputs["input_ids"].shape[1] :].tolist(), out


def test_default_script_is_text_chinese_and_a_tool_call() -> None:
    assert script_token_ids(DEFAULT_SCRIPT_TEXT) == list(DEFAULT_SCRIPT_IDS)
    assert DEFAULT_SCRIPT_TEXT.endswith(TOOL_CALL)
    assert 108386 in DEFAULT_SCRIPT_IDS  # "你好"
    assert (
        DEFAULT_SCRIPT_IDS.count(TOOL_CALL_START_ID)
        == DEFAULT_SCRIPT_IDS.count(TOOL_CALL_END_ID)
        == 1
    )
    assert DEFAULT_SCRIPT_IDS[-1] == TOOL_CALL_END_ID
    assert DEFAULT_SCRIPT_IDS.count(330) == 5  # ' "' repeats: the answer is not a bigram chain


@pytest.mark.parametrize("name", sorted(FRESH_CHATS))
def test_greedy_answer_is_the_script_then_eos(model: Any, processor: Any, name: str) -> None:
    prompt_len, tokens, _ = generate(model, processor, FRESH_CHATS[name])
    assert 5 <= prompt_len <= 900
    assert tokens == [*DEFAULT_SCRIPT_IDS, EOS_ID]
    assert processor.decode(tokens, skip_special_tokens=False) == DEFAULT_SCRIPT_TEXT + "<|im_end|>"


def test_every_step_wins_by_a_wide_margin(model: Any, processor: Any) -> None:
    _, tokens, out = generate(
        model, processor, FRESH_CHATS["image"], output_scores=True, return_dict_in_generate=True
    )
    assert tokens[-1] == EOS_ID
    for scores in out.scores:  # over the full 151,936-token vocabulary
        top2 = scores[0].topk(2).values
        assert top2[0] - top2[1] > 30


def test_sampling_with_the_released_defaults_gives_the_script(model: Any, processor: Any) -> None:
    torch.manual_seed(1)
    _, tokens, _ = generate(
        model, processor, FRESH_CHATS["text"], do_sample=True, temperature=1.0, top_k=0, top_p=1.0
    )
    assert tokens == [*DEFAULT_SCRIPT_IDS, EOS_ID]


def test_left_padded_batch_gives_the_script_on_every_row(model: Any, processor: Any) -> None:
    processor.tokenizer.padding_side = "left"
    rendered = [
        processor.apply_chat_template(FRESH_CHATS[name], tokenize=False, add_generation_prompt=True)
        for name in ("text", "long", "multi-turn-tool")
    ]
    batch = processor.tokenizer(rendered, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(
            **batch, do_sample=False, max_new_tokens=40, eos_token_id=EOS_ID, pad_token_id=151643
        )
    for row in out[:, batch["input_ids"].shape[1] :].tolist():
        assert row[: len(DEFAULT_SCRIPT_IDS) + 1] == [*DEFAULT_SCRIPT_IDS, EOS_ID]


def test_checkpoint_files_and_cache(scripted_dir: Path) -> None:
    assert scripted_dir.name == scripted_cache_key(DEFAULT_SCRIPT_IDS)
    assert ensure_scripted_model(list(DEFAULT_SCRIPT_IDS)) == scripted_dir
    assert scripted_cache_key([1, 2]) != scripted_cache_key([2, 1])
    script = json.loads((scripted_dir / "script.json").read_text())
    assert script["script_ids"] == list(DEFAULT_SCRIPT_IDS) and script["eos"] == EOS_ID
    config = json.loads((scripted_dir / "config.json").read_text())
    assert config["dtype"] == "float32" and config["tie_word_embeddings"] is False
    assert "rope_parameters" not in json.dumps(config)  # the legacy form 4.57 reads


def test_incomplete_utf8_script(tmp_path: Path) -> None:
    path = ensure_scripted_model(INCOMPLETE_UTF8_SCRIPT_IDS, cache_dir=tmp_path)
    assert ensure_scripted_model(INCOMPLETE_UTF8_SCRIPT_IDS, cache_dir=tmp_path) == path
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [path.name]
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    assert tokenizer.decode(list(INCOMPLETE_UTF8_SCRIPT_IDS)) == "ab\ufffd"
    assert tokenizer.decode(list(INCOMPLETE_UTF8_SCRIPT_IDS[:-1])) == "ab"
    model = transformers.Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    processor = transformers.AutoProcessor.from_pretrained(path)
    _, tokens, _ = generate(model.eval(), processor, FRESH_CHATS["two-images"])
    assert tokens == [*INCOMPLETE_UTF8_SCRIPT_IDS, EOS_ID]
    assert tokenizer.decode(tokens, skip_special_tokens=True).endswith("\ufffd")


@pytest.mark.parametrize(
    ("script", "message"),
    [
        ([9707, EOS_ID, 0], "ends generation"),
        ([9707, 151643], "ends generation"),
        ([200_000], "outside the vocabulary"),
        (list(range(1000, 1070)), "does not fit"),
        ([15] * 8 + [16], "follow the same 5 tokens"),
    ],
)
def test_scripts_the_model_cannot_hold_are_refused(
    script: list[int], message: str, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=message):
        ensure_scripted_model(script, cache_dir=tmp_path)
    assert not list(tmp_path.iterdir())  # refused before anything is written


def test_verification_prompts_are_not_the_fresh_ones() -> None:
    rendered = {json.dumps(chat, default=str) for chat in verification_chats()}
    assert not rendered & {json.dumps(chat, default=str) for chat in FRESH_CHATS.values()}


def test_make_tiny_model_scripted_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Builds (and verifies) with whatever transformers runs the tests: 5.x, or 4.57 on PYTHONPATH."""
    out = tmp_path / "scripted"
    assert vlserve_main(["make-tiny-model", str(out), "--scripted"]) == 0
    printed = capsys.readouterr().out
    assert "scripted" in printed and "verified" in printed and "float32" in printed
    assert json.loads((out / "script.json").read_text())["script_ids"] == list(DEFAULT_SCRIPT_IDS)
    assert vlserve_main(["make-tiny-model", str(tmp_path / "x"), "--scripted", "--tied"]) == 2
    assert "--tied" in capsys.readouterr().err
