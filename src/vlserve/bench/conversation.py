"""Multi-turn conversations: every turn carries the earlier turns and the server's real answers.

A conversation is one user. Its turns go one after another, turn k+1 only once turn k has ended,
and each carries the earlier user messages (the same content objects, so the image data URLs are
byte-identical) and, as assistant messages, the text the server actually returned. That is the
history a real chat sends, so a server's prefix and encoder caches see what they could reuse.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Container, Sequence
from typing import Any

from vlserve.bench.client import RequestResult, body_fields
from vlserve.bench.config import RequestOptions
from vlserve.bench.dataset import BenchRequest, Message

log = logging.getLogger("vlserve.bench")

SendTurn = Callable[[RequestResult, bytes, float], Awaitable[None]]
RecordResult = Callable[[RequestResult], None]

_MESSAGES_OPEN = b'{"messages":['


def is_multi_turn(requests: Sequence[BenchRequest]) -> bool:
    """A run is multi-turn when any conversation has a second turn; otherwise it is exactly the
    run of single requests it always was (same ids, same results lines)."""
    return any(request.followups for request in requests)


def turn_request_id(conversation_id: str, turn: int) -> str:
    """The results line's ``request_id`` of a turn: stable across runs, as ``--resume`` needs."""
    return f"{conversation_id}:t{turn}"


def conversation_done(conversation_id: str, request: BenchRequest, done: Container[str]) -> bool:
    """``--resume``: done when every turn has a successful line. A partly done conversation is
    sent again from its first turn: a later turn alone would meet caches that hold none of the
    earlier turns, and would not measure what a user's next turn sees."""
    return all(turn_request_id(conversation_id, k) in done for k in range(request.num_turns))


def turn_max_tokens(request: BenchRequest, turn: int) -> int | None:
    return request.max_tokens if turn == 0 else request.followups[turn - 1].max_tokens


def turn_messages(request: BenchRequest, answers: Sequence[str]) -> list[Message]:
    """The messages of turn ``len(answers)``: the first turn (after its system message), then
    for each earlier turn the server's answer and the next user turn."""
    if len(answers) >= request.num_turns:
        raise ValueError(f"{request.id} has {request.num_turns} turns, not {len(answers) + 1}")
    messages = list(request.messages)
    for answer, turn in zip(answers, request.followups, strict=False):
        messages.append({"role": "assistant", "content": answer})
        messages.append({"role": "user", "content": turn.content})
    return messages


def _dumps(value: Any) -> bytes:
    # The same encoding as client.build_body, so that a turn's bytes do not depend on the path.
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


class TurnEncoder:
    """Request bodies of conversation turns, spliced from messages serialized once.

    Serializing a turn whole would re-encode every image of the history at every turn (about
    20 ms for two 1024x768 images), on the event loop, stalling every other stream being timed.
    Instead each first turn is serialized before timing (``"messages"`` first, then the other
    fields), later user turns once each, and a turn's body joins those bytes with the answers.
    """

    def __init__(
        self, options: RequestOptions, model: str, requests: Sequence[BenchRequest]
    ) -> None:
        self.options = options
        self.model = model
        self._tails: dict[int | None, bytes] = {}
        self._followups: dict[tuple[str, int], bytes] = {}
        self.first_bodies = {r.id: self._first_body(r) for r in requests}

    def _first_body(self, request: BenchRequest) -> bytes:
        prefix = b",".join(_dumps(message) for message in request.messages)
        return _MESSAGES_OPEN + prefix + b"]" + self._tail(request.max_tokens)

    def _tail(self, max_tokens: int | None) -> bytes:
        """``,"model":…}``: every field but the messages (an --extra-body "messages" is ignored)."""
        tail = self._tails.get(max_tokens)
        if tail is None:
            fields = body_fields(self.options, self.model, max_tokens, [])
            fields.pop("messages", None)
            tail = b"," + _dumps(fields)[1:] if fields else b"}"
            self._tails[max_tokens] = tail
        return tail

    def _followup(self, request: BenchRequest, index: int) -> bytes:
        key = (request.id, index)
        encoded = self._followups.get(key)
        if encoded is None:
            encoded = _dumps({"role": "user", "content": request.followups[index].content})
            self._followups[key] = encoded
        return encoded

    def body(self, request: BenchRequest, answers: Sequence[str]) -> bytes:
        """The body of turn ``len(answers)``: the same JSON value as ``turn_messages`` gives."""
        turn = len(answers)
        first = self.first_bodies[request.id]
        if turn == 0:
            return first
        if turn >= request.num_turns:
            raise ValueError(f"{request.id} has {request.num_turns} turns, not {turn + 1}")
        first_tail = self._tail(request.max_tokens)
        parts: list[bytes | memoryview] = [memoryview(first)[: len(first) - len(first_tail) - 1]]
        for index, answer in enumerate(answers):
            parts.append(b"," + _dumps({"role": "assistant", "content": answer}) + b",")
            parts.append(self._followup(request, index))
        parts.append(b"]" + self._tail(turn_max_tokens(request, turn)))
        return b"".join(parts)


def skipped_result(
    conversation_id: str, request: BenchRequest, turn: int, failed_turn: int
) -> RequestResult:
    """A turn never sent because turn ``failed_turn`` failed: recorded, counted as failed."""
    result = RequestResult(
        turn_request_id(conversation_id, turn),
        request.id,
        conversation_id=conversation_id,
        turn=turn,
        skipped=True,
    )
    result.error = f"skipped: turn {failed_turn} of the conversation failed"
    return result


async def run_conversation(
    conversation_id: str,
    request: BenchRequest,
    due: float,
    encoder: TurnEncoder,
    send: SendTurn,
    record: RecordResult,
) -> None:
    """Send the turns in order; once one fails (retries spent), record the rest as skipped.

    ``send`` makes every attempt of one turn and never raises (but for cancellation); ``due`` is
    when the first turn was scheduled, and each later turn is due when the one before ended.
    """
    answers: list[str] = []
    for turn in range(request.num_turns):
        result = RequestResult(
            turn_request_id(conversation_id, turn),
            request.id,
            conversation_id=conversation_id,
            turn=turn,
        )
        try:
            body = encoder.body(request, answers)
        except Exception as exc:  # a client bug must cost one conversation, not the run
            log.exception("building turn %d of %s failed", turn, conversation_id)
            result.error = f"client error: {exc!r}"
        else:
            await send(result, body, due)
        record(result)
        if not result.success:
            for later in range(turn + 1, request.num_turns):
                record(skipped_result(conversation_id, request, later, turn))
            return
        # The exact text the server sent (reassembled from the stream); reasoning and tool calls
        # are not part of a chat history that templates render.
        answers.append(result.response or "")
        due = time.perf_counter()
