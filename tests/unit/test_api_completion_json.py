"""A huge non-streamed answer (issue 22 item 5): its logprob entries are kept as JSON bytes as
they arrive, not as pydantic objects the garbage collector walks, and spliced into exactly the
bytes pydantic writes for the whole."""

from __future__ import annotations

import gc
import json

from vlserve.api import protocol as p
from vlserve.api.serving import ChoiceBuilder, completion_json, to_logprob
from vlserve.engine.request import FinishReason, TokenEvent, TokenLogprob, TopLogprob


def _engine_logprob(i: int) -> TokenLogprob:
    top = tuple(TopLogprob(f"alt{j}", b"a%d" % j, -2.5 - j) for j in range(20))
    return TokenLogprob(f'"content":[]{i}', b"t%d" % i, -0.25 - i / 7, top)


def _completion(
    entries: list[list[p.TokenLogprob] | None],
) -> p.ChatCompletion:
    call = p.ToolCall(id="call_1", function=p.FunctionCall(name="f", arguments='{"content":[]}'))
    messages = [
        p.AssistantMessage(content='text with "content":[] in it'),
        p.AssistantMessage(content=None, tool_calls=[call]),
        p.AssistantMessage(content=""),
    ]
    choices = [
        p.Choice(
            index=i,
            message=messages[i % 3],
            logprobs=None if e is None else p.ChoiceLogprobs(content=e),
            finish_reason="stop",
        )
        for i, e in enumerate(entries)
    ]
    usage = p.Usage(prompt_tokens=3, completion_tokens=9, total_tokens=12)
    return p.ChatCompletion(id="c1", created=1, model='m"choices":[]', choices=choices, usage=usage)


def test_spliced_entries_are_the_bytes_pydantic_writes() -> None:
    logprobs = [to_logprob(_engine_logprob(i)) for i in range(50)]
    for entries in ([logprobs, [], logprobs[:3]], [None, None], [logprobs[:1]]):
        whole = _completion(entries)  # type: ignore[arg-type]
        shells = _completion([None if e is None else [] for e in entries])
        pieces = [[e.model_dump_json().encode() for e in es or ()] for es in entries]
        written = completion_json(shells, pieces)
        assert written == whole.model_dump_json().encode()
        json.loads(written)


def test_a_choice_keeps_its_entries_as_bytes_the_collector_never_walks() -> None:
    builder = ChoiceBuilder(0, None, keep_logprobs=True)
    events = [
        TokenEvent("x", (i,), 3, i + 1, logprobs=(_engine_logprob(i),)) for i in range(300)
    ]
    events.append(TokenEvent("", (), 3, 300, finish_reason=FinishReason.LENGTH))
    gc.collect()
    before = len(gc.get_objects())
    for event in events:
        builder.add(event)
    gc.collect()
    # one list of bytes: no tracked object per entry (as pydantic objects: 300 x 42)
    assert len(gc.get_objects()) - before < 300
    assert all(isinstance(entry, bytes) for entry in builder.logprobs)
    assert json.loads(builder.logprobs[7])["top_logprobs"][19]["token"] == "alt19"


def test_a_streamed_choice_keeps_none() -> None:
    builder = ChoiceBuilder(0, None)
    builder.add(TokenEvent("x", (1,), 3, 1, logprobs=(_engine_logprob(1),)))
    assert builder.logprobs == []
