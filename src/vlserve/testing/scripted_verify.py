"""The scripted checkpoint's self-check: greedy ``generate`` on varied prompts must give the script
then EOS, exactly."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from vlserve.testing.scripted_model import ANSWER_PREFIX_IDS, DEFAULT_SCRIPT_TEXT, EOS_ID, PAD_ID


def verification_chats() -> list[list[dict[str, Any]]]:
    """The prompts a build must answer with the script: text, images, system, multi-turn, long."""
    from PIL import Image

    def picture(width: int, height: int, seed: int) -> Any:
        image = Image.new("RGB", (width, height), (seed * 40 % 256, 120, 255 - seed * 30 % 256))
        for x in range(0, width, 3):
            image.putpixel((x, (x * (seed + 2)) % height), (x % 256, 30, 200))
        return image

    def text(value: str) -> dict[str, Any]:
        return {"type": "text", "text": value}

    long_text = " ".join(f'word{i} Paris 你好 {{"name": {i}}}' for i in range(60))
    return [
        [{"role": "user", "content": [text("Hi")]}],
        [
            {"role": "system", "content": [text("You are a weather bot.")]},
            {
                "role": "user",
                "content": [{"type": "image", "image": picture(448, 448, 1)}, text("What is it?")],
            },
        ],
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": picture(640, 320, 2)},
                    text("and"),
                    {"type": "image", "image": picture(64, 96, 3)},
                ],
            }
        ],
        [
            {"role": "system", "content": [text("Be brief.")]},
            {"role": "user", "content": [text("Weather in Paris?")]},
            {"role": "assistant", "content": [text(DEFAULT_SCRIPT_TEXT)]},
            {"role": "user", "content": [text("<tool_call>\nAgain, please.\n")]},
            {"role": "assistant", "content": [text("ab")]},
            {"role": "user", "content": [text("Once more")]},
        ],
        [{"role": "user", "content": [text(long_text)]}],
    ]


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers' weight-loading progress bar writes to stderr; a build prints nothing."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def verify_scripted_model(
    model_dir: Path,
    script_ids: Sequence[int],
    *,
    compute_dtypes: Sequence[str] = ("float32", "bfloat16"),
) -> None:
    """Greedy ``generate`` on ``verification_chats()`` must give ``script + [EOS]`` exactly.

    Checked with the weights loaded in each of ``compute_dtypes`` (float32: the CPU server;
    bfloat16: accelerators). Raises ``RuntimeError`` naming the prompt and the tokens otherwise.
    """
    import torch
    from transformers import AutoProcessor, GenerationConfig, Qwen3VLForConditionalGeneration

    expected = [*script_ids, EOS_ID]
    greedy = GenerationConfig(
        do_sample=False,
        max_new_tokens=len(expected) + 2,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    processor = AutoProcessor.from_pretrained(model_dir)
    prompts = [
        processor.apply_chat_template(
            chat, tokenize=True, return_dict=True, return_tensors="pt", add_generation_prompt=True
        )
        for chat in verification_chats()
    ]
    for compute in compute_dtypes:
        with _no_progress_bars():
            model = Qwen3VLForConditionalGeneration.from_pretrained(
                model_dir, dtype=getattr(torch, compute)
            )
        model.eval()
        # Ours, not the released sampling defaults (which would also draw a warning per call).
        model.generation_config = greedy
        for index, inputs in enumerate(prompts):
            prompt = inputs["input_ids"][0].tolist()
            if tuple(prompt[-len(ANSWER_PREFIX_IDS) :]) != ANSWER_PREFIX_IDS:
                raise RuntimeError(
                    f"prompt {index} does not end with the generation prompt: {prompt[-8:]}"
                )
            with torch.inference_mode():
                out = model.generate(**inputs)
            got = out[0, len(prompt) :].tolist()
            if got != expected:
                raise RuntimeError(
                    f"scripted model at {model_dir} failed verification ({compute}) on prompt "
                    f"{index} ({len(prompt)} tokens): expected {expected}, got {got}"
                )
