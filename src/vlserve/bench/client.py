"""One chat-completions request, streaming or not, timed with perf_counter → RequestResult."""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from vlserve.bench.config import RequestOptions, RetryPolicy
from vlserve.bench.dataset import BenchRequest
from vlserve.bench.fastjson import loads
from vlserve.bench.sse import DONE, SSEEvent, SSEParser

_MAX_ERROR_CHARS = 300


@dataclass
class RequestResult:
    """What happened to one request; errors are captured here, never raised mid-run.

    Times are in seconds from ``time.perf_counter``. ``chunk_times_s`` holds, for each streamed
    chunk that carried output, its arrival time after the final attempt was sent; inter-token
    latencies are their differences (one chunk is one token for vLLM, SGLang and vlserve).
    """

    request_id: str
    id: str
    success: bool = False
    endpoint: str = ""
    error: str | None = None
    http_status: int | None = None
    response: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    video_tokens: int | None = None  # usage.prompt_tokens_details.video_tokens (vlserve's)
    ttft_s: float | None = None
    latency_s: float = 0.0  # final attempt: sent → last byte
    chunk_times_s: list[float] = field(default_factory=list)
    sent_at_s: float = 0.0  # final attempt, seconds since the run started
    queued_s: float = 0.0  # scheduled arrival → first send (client-side queueing)
    retry_count: int = 0
    x_request_id: str | None = None  # sent as X-Request-Id: find the request in server logs
    retryable: bool = False
    retry_after_s: float | None = None
    conversation_id: str | None = None  # multi-turn runs only: the conversation's plan id
    turn: int | None = None  # multi-turn runs only: 0-based index of the turn
    skipped: bool = False  # never sent, because an earlier turn of its conversation failed

    @property
    def itl_s(self) -> list[float]:
        times = self.chunk_times_s
        return [b - a for a, b in zip(times, times[1:], strict=False)]

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first; needs the server's token count."""
        n = self.completion_tokens
        if self.ttft_s is None or n is None or n < 2:
            return None
        return (self.latency_s - self.ttft_s) / (n - 1)

    def reset_attempt(self) -> None:
        """Forget the last attempt's outcome before retrying."""
        self.error = self.http_status = self.response = self.finish_reason = None
        self.prompt_tokens = self.completion_tokens = self.total_tokens = self.ttft_s = None
        self.video_tokens = None
        self.chunk_times_s = []
        self.retryable = False
        self.retry_after_s = None


def build_body(request: BenchRequest, options: RequestOptions, model: str) -> bytes:
    """Serialize once, before timing: the client then only moves bytes."""
    body = body_fields(options, model, request.max_tokens, request.messages)
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def body_fields(
    options: RequestOptions, model: str, max_tokens: int | None, messages: list[Any]
) -> dict[str, Any]:
    """The request body as a dict, ``--extra-body`` applied."""
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens or options.max_tokens,
        "temperature": options.temperature,
        "stream": options.stream,
    }
    if options.stream:
        body["stream_options"] = {"include_usage": True}
    if options.ignore_eos:
        body["ignore_eos"] = True
    for key, value in options.extra_body.items():
        # null removes a field, for servers that reject one (e.g. stream_options, max_tokens)
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    return body


def request_headers(options: RequestOptions) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if options.stream:
        headers["Accept"] = "text/event-stream"
    if options.api_key:
        headers["Authorization"] = f"Bearer {options.api_key}"
    return headers


def make_session(options: RequestOptions, max_connections: int) -> aiohttp.ClientSession:
    """One pooled session for the whole run (keep-alive; the run's semaphore bounds use)."""
    connector = aiohttp.TCPConnector(limit=max_connections, limit_per_host=0, ttl_dns_cache=300)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=options.timeout_s),
        cookie_jar=aiohttp.DummyCookieJar(),  # cookies cost CPU and mean nothing here
    )


async def send_once(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str],
    stream: bool,
    result: RequestResult,
) -> None:
    """One attempt; fills ``result`` (success, timings, tokens or error and retryability)."""
    result.endpoint = url
    start = time.perf_counter()
    end: float | None = None
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            result.http_status = resp.status
            if not 200 <= resp.status < 300:
                text = await resp.text(errors="replace")
                result.error = f"HTTP {resp.status}: {error_message(text)}"
                result.retryable = resp.status == 429 or resp.status >= 500
                result.retry_after_s = parse_retry_after(resp.headers.get("Retry-After"))
                return
            if stream:
                end = await _read_stream(resp, start, result)
            else:
                _read_json(await resp.read(), result)
    except asyncio.TimeoutError:
        result.error = "timeout: no complete response within --timeout"
        result.retryable = True
    except aiohttp.ClientError as exc:
        result.error = f"connection error: {type(exc).__name__}: {exc}"[:_MAX_ERROR_CHARS]
        # A bad URL or certificate will not get better by retrying.
        result.retryable = not isinstance(
            exc, (aiohttp.InvalidURL, aiohttp.ClientConnectorCertificateError)
        )
    finally:
        result.latency_s = (end if end is not None else time.perf_counter()) - start
    result.success = result.error is None


async def _read_stream(resp: aiohttp.ClientResponse, start: float, result: RequestResult) -> float:
    """Read SSE to the end of the body; return the perf_counter time of the last event."""
    parser = SSEParser()
    pieces: list[str] = []
    saw_done = False
    last = start
    # Read to EOF even after [DONE] so that the connection goes back to the pool.
    async for data in resp.content.iter_any():
        now = time.perf_counter()
        for event in parser.feed(data):
            last = now
            saw_done = _on_event(event, now - start, result, pieces) or saw_done
    for event in parser.close():
        saw_done = _on_event(event, last - start, result, pieces) or saw_done
    result.response = "".join(pieces)
    if result.chunk_times_s:
        result.ttft_s = result.chunk_times_s[0]
    if result.error is None and not (saw_done or result.chunk_times_s or result.finish_reason):
        result.error = "stream ended without any completion data"
    return last


def _on_event(event: SSEEvent, at_s: float, result: RequestResult, pieces: list[str]) -> bool:
    """Apply one event; True when it is the [DONE] marker."""
    data = event.data
    if data == DONE:
        return True
    if not data or data.isspace():
        return False
    try:
        obj = loads(data)
    except ValueError:
        result.error = result.error or f"stream carried invalid JSON: {data[:100]!r}"
        return False
    if not isinstance(obj, dict):
        return False
    if event.event == "error" or "error" in obj or obj.get("object") == "error":
        result.error = result.error or f"error in stream: {error_message(obj)}"
        return False
    usage = obj.get("usage")
    if usage:
        _take_usage(usage, result)
    choices = obj.get("choices")
    if not choices or not isinstance(choices[0], dict):
        return False
    choice = choices[0]
    delta = choice.get("delta") or {}
    content = delta.get("content")
    finish = choice.get("finish_reason")
    if content:
        pieces.append(content)
        result.chunk_times_s.append(at_s)
    elif delta.get("reasoning_content") or delta.get("reasoning") or delta.get("tool_calls"):
        result.chunk_times_s.append(at_s)
    elif content == "" and delta.get("role") is None and finish is None:
        # A token that decodes to "" still took a decode step; a role-only header did not.
        result.chunk_times_s.append(at_s)
    if finish:
        result.finish_reason = finish
    return False


def _read_json(raw: bytes, result: RequestResult) -> None:
    try:
        obj = loads(raw)
    except ValueError:
        result.error = f"response is not JSON: {raw[:100]!r}"
        return
    if not isinstance(obj, dict) or "error" in obj or not obj.get("choices"):
        result.error = f"no choices in response: {error_message(obj)}"
        return
    choice = obj["choices"][0]
    message = choice.get("message") or {}
    result.response = message.get("content")
    result.finish_reason = choice.get("finish_reason")
    if obj.get("usage"):
        _take_usage(obj["usage"], result)


def _take_usage(usage: Any, result: RequestResult) -> None:
    if not isinstance(usage, dict):
        return
    result.prompt_tokens = _int(usage.get("prompt_tokens"))
    result.completion_tokens = _int(usage.get("completion_tokens"))
    total = _int(usage.get("total_tokens"))
    if total is None and result.prompt_tokens is not None and result.completion_tokens is not None:
        total = result.prompt_tokens + result.completion_tokens
    result.total_tokens = total
    details = usage.get("prompt_tokens_details")
    # vlserve's extension; other servers omit it (or send null, or other details only)
    result.video_tokens = _int(details.get("video_tokens")) if isinstance(details, dict) else None


def error_message(body: Any) -> str:
    """The human part of an error body (OpenAI, FastAPI or plain text), shortened."""
    obj = body
    if isinstance(body, (str, bytes)):
        try:
            obj = json.loads(body)
        except ValueError:
            return str(body)[:_MAX_ERROR_CHARS]
    if isinstance(obj, dict):
        inner = obj.get("error", obj)
        if isinstance(inner, dict):
            inner = inner.get("message") or inner.get("detail") or inner
        return str(inner)[:_MAX_ERROR_CHARS]
    return str(obj)[:_MAX_ERROR_CHARS]


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def backoff_delay_s(
    policy: RetryPolicy, attempt: int, retry_after_s: float | None, rng: random.Random
) -> float:
    """Delay before retry number ``attempt + 1``: the server's Retry-After when it sent one,
    else exponential backoff with ±50% jitter so that failed clients do not retry in lockstep."""
    if retry_after_s is not None:
        return min(retry_after_s, policy.max_delay_s)
    delay = policy.retry_delay_s * policy.backoff**attempt
    return min(delay * rng.uniform(0.5, 1.5), policy.max_delay_s)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
