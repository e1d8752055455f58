"""A huge non-streamed answer is written in slices, the event loop let go between them
(issue 22 item 5), and the bytes are exactly pydantic's."""

from __future__ import annotations

import asyncio
import json

from vlserve.api import protocol as p
from vlserve.api.serving import completion_json


def _logprob(i: int) -> p.TokenLogprob:
    top = [p.TopLogprob(token=f"alt{j}", logprob=-2.5 - j, bytes=[97, j]) for j in range(20)]
    return p.TokenLogprob(token=f'"content":[]{i}', logprob=-0.25, bytes=[116, i % 256], top_logprobs=top)


def _completion(tokens: int) -> p.ChatCompletion:
    entries = [_logprob(i) for i in range(tokens)]
    call = p.ToolCall(id="call_1", function=p.FunctionCall(name="f", arguments='{"content":[]}'))
    choices = [
        p.Choice(
            index=0,
            message=p.AssistantMessage(content='text with "content":[] in it'),
            logprobs=p.ChoiceLogprobs(content=entries),
            finish_reason="length",
        ),
        p.Choice(index=1, message=p.AssistantMessage(content=None, tool_calls=[call]),
                 logprobs=p.ChoiceLogprobs(content=[]), finish_reason="tool_calls"),  # fmt: skip
        p.Choice(index=2, message=p.AssistantMessage(content=""), finish_reason="stop"),
        p.Choice(
            index=3,
            message=p.AssistantMessage(content="x"),
            logprobs=p.ChoiceLogprobs(content=entries[:7]),
            finish_reason="stop",
        ),
    ]
    usage = p.Usage(prompt_tokens=3, completion_tokens=tokens, total_tokens=tokens + 3)
    return p.ChatCompletion(id="chatcmpl-1", created=1, model='m"choices":[]', choices=choices,
                            usage=usage)  # fmt: skip


def test_the_bytes_are_pydantics_small_and_large() -> None:
    for tokens in (3, 1000):
        completion = _completion(tokens)
        written = asyncio.run(completion_json(completion))
        assert written == completion.model_dump_json().encode()
        assert json.loads(written)["choices"][0]["logprobs"]["content"][-1]["token"].endswith(
            str(tokens - 1)
        )


def test_a_large_answer_lets_the_loop_run_while_it_is_written() -> None:
    completion = _completion(2000)  # 8 slices of logprob entries

    async def scenario() -> int:
        ticks = 0
        done = False

        async def ticker() -> None:
            nonlocal ticks
            while not done:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.ensure_future(ticker())
        await asyncio.sleep(0)
        start = ticks
        await completion_json(completion)
        during = ticks - start
        done = True
        await task
        return during

    assert asyncio.run(scenario()) >= 6  # the loop ran between slices, not once at the end
