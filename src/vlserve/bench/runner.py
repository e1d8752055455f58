"""Drive a run: arrivals (Poisson, gamma, constant or all at once), true concurrency, retries,
endpoints; single requests or multi-turn conversations (conversation.py)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import random
import re
import secrets
import time
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import aiohttp

from vlserve.bench.client import (
    RequestResult,
    backoff_delay_s,
    build_body,
    make_session,
    request_headers,
    send_once,
)
from vlserve.bench.config import BenchConfig, LoadConfig, Routing
from vlserve.bench.conversation import (
    TurnEncoder,
    conversation_done,
    is_multi_turn,
    run_conversation,
)
from vlserve.bench.dataset import BenchRequest

log = logging.getLogger("vlserve.bench")

ResultSink = Callable[[RequestResult], None]
_HEADER_UNSAFE = re.compile(r"[^A-Za-z0-9._:@#-]")


@dataclass
class RunOutcome:
    """Results of the measured phase (warm-up excluded) and how the run went."""

    results: list[RequestResult] = field(default_factory=list)
    duration_s: float = 0.0
    started_at: float = 0.0  # time.time() when the measured phase began
    max_in_flight: int = 0
    model: str = ""
    endpoints: tuple[str, ...] = ()


class EndpointRouter:
    """Pick an endpoint per attempt: strict round-robin, or the one with fewest requests in
    flight (ties go round-robin). Deterministic, unlike the prototype's ``hash(id)``."""

    def __init__(self, num_endpoints: int, routing: Routing) -> None:
        self.outstanding = [0] * num_endpoints
        self.routing = routing
        self._next = 0

    def acquire(self) -> int:
        n = len(self.outstanding)
        if self.routing == "round-robin":
            index = self._next % n
        else:
            order = [(self._next + k) % n for k in range(n)]
            index = min(order, key=self.outstanding.__getitem__)
        self._next = index + 1
        self.outstanding[index] += 1
        return index

    def release(self, index: int) -> None:
        self.outstanding[index] -= 1


def arrival_offsets(load: LoadConfig, rng: random.Random) -> Iterator[float]:
    """Seconds after the start at which each request is due.

    Gamma-distributed gaps with shape ``burstiness`` and mean ``1/rate`` (shape 1 is a Poisson
    process; smaller is burstier, larger is more regular); ``constant`` spaces them evenly. With a
    ramp-up, the first ``max_concurrency`` requests are due no earlier than evenly over it: in a
    closed loop, users that all start in the same instant stay in step for the whole run.
    """
    t = 0.0
    ramp_step = load.ramp_up_s / load.max_concurrency
    for i in itertools.count():
        yield max(t, i * ramp_step) if i < load.max_concurrency else t
        if math.isinf(load.request_rate):
            continue
        if load.arrival == "constant":
            t += 1.0 / load.request_rate
        else:
            t += rng.gammavariate(load.burstiness, 1.0 / (load.request_rate * load.burstiness))


def plan_requests(
    requests: Sequence[BenchRequest], load: LoadConfig
) -> Iterator[tuple[str, BenchRequest]]:
    """(request_id, request) in send order: the dataset once, or cycled for a count/duration.

    Repeats get ``@k`` ids, so ids are unique and the same on every run (``--resume`` relies on it).
    """
    if not requests:
        return iter(())
    if load.num_requests is None and load.duration_s is None:
        cycles: Iterable[int] = range(1)
    else:
        cycles = itertools.count()
    planned = (
        (request.id if k == 0 else f"{request.id}@{k}", request)
        for k in cycles
        for request in requests
    )
    return itertools.islice(planned, load.num_requests)


def warmup_requests(requests: Sequence[BenchRequest], load: LoadConfig) -> list[BenchRequest]:
    """The warm-up's ``--warmup`` requests: ones the timed run never sends (the dataset past
    ``--num-requests``; `--dataset random` draws that many extra), so no server cache has seen a
    timed request's prompt or images before it is timed. Without such a surplus the warm-up
    repeats timed requests, and says so: a prefix or media cache may then favor them."""
    count = load.warmup
    if count == 0 or not requests:
        return []
    cycled = load.duration_s is not None or load.num_requests is None
    timed = len(requests) if cycled else min(load.num_requests or 0, len(requests))
    spare = list(requests[timed:])
    if len(spare) >= count:
        return spare[:count]
    log.warning(
        "the dataset has %d request(s) beyond the %d timed, fewer than --warmup %d: the warm-up "
        "repeats timed requests, which a server's prefix or media caches may then answer faster",
        len(spare),
        timed,
        count,
    )
    return list(itertools.islice(itertools.cycle([*spare, *requests[:timed]]), count))


def pending_plan(
    requests: Sequence[BenchRequest], load: LoadConfig, done_ids: Container[str]
) -> Iterator[tuple[str, BenchRequest]]:
    """The plan less what ``--resume`` found done: a request id, or a conversation all of whose
    turns are done (a partly done one is sent again from its start)."""
    multi_turn = is_multi_turn(requests)
    for request_id, request in plan_requests(requests, load):
        if multi_turn:
            done = conversation_done(request_id, request, done_ids)
        else:
            done = request_id in done_ids
        if not done:
            yield request_id, request


async def discover_model(
    session: aiohttp.ClientSession, endpoint: str, headers: dict[str, str]
) -> str:
    """The first model id the server lists at /v1/models ("default" when it cannot say)."""
    url = endpoint.rsplit("/chat/completions", 1)[0] + "/models"
    try:
        async with session.get(
            url, headers=headers, timeout=aiohttp.ClientTimeout(total=10)
        ) as resp:
            return str((await resp.json(content_type=None))["data"][0]["id"])
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, LookupError, TypeError) as exc:
        log.warning("could not read the model name from %s (%s); sending model='default'", url, exc)
        return "default"


class _Phase:
    """One pass of requests (or, with ``turns``, conversations) under the configured arrival
    process and concurrency limit."""

    def __init__(
        self,
        config: BenchConfig,
        session: aiohttp.ClientSession,
        bodies: dict[str, bytes],
        sink: ResultSink,
        turns: TurnEncoder | None = None,
    ) -> None:
        self.config = config
        self.session = session
        self.bodies = bodies
        self.sink = sink
        self.turns = turns
        self.headers = request_headers(config.request)
        # x-request-id lets server logs (vlserve, vLLM) be matched to results lines; the run tag
        # keeps ids unique when several clients send the same dataset to one server.
        self.run_tag = secrets.token_hex(4)
        self.router = EndpointRouter(len(config.load.endpoints), config.load.routing)
        # Separate streams, so that retries (jitter draws) never shift the arrival schedule.
        self.arrival_rng = random.Random(config.load.seed)
        self.jitter_rng = random.Random(config.load.seed + 1)
        self.in_flight = 0
        self.max_in_flight = 0
        self.start = 0.0

    async def run(
        self, plan: Iterable[tuple[str, BenchRequest]], duration_s: float | None, paced: bool = True
    ) -> float:
        load = self.config.load
        offsets = arrival_offsets(load, self.arrival_rng) if paced else itertools.repeat(0.0)
        semaphore = asyncio.Semaphore(load.max_concurrency)
        tasks: set[asyncio.Task[None]] = set()
        self.start = time.perf_counter()
        deadline = math.inf if duration_s is None else self.start + duration_s
        try:
            await self._dispatch(plan, offsets, deadline, semaphore, tasks)
            if tasks:
                await asyncio.gather(*tasks)
        except BaseException:
            # Interrupted (Ctrl-C cancels the run): cancel what is in flight before the session
            # closes under it, so that no request is recorded as a spurious connection error.
            pending = list(tasks)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            raise
        return time.perf_counter() - self.start

    async def _dispatch(
        self,
        plan: Iterable[tuple[str, BenchRequest]],
        offsets: Iterator[float],
        deadline: float,
        semaphore: asyncio.Semaphore,
        tasks: set[asyncio.Task[None]],
    ) -> None:
        """Start each request when it is due and a concurrency slot is free."""
        for (request_id, request), offset in zip(plan, offsets, strict=False):
            due = self.start + offset
            if due >= deadline:
                return
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await semaphore.acquire()
            if time.perf_counter() >= deadline:
                semaphore.release()
                return
            task = asyncio.create_task(self._request(request_id, request, due, semaphore))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def _request(
        self, request_id: str, request: BenchRequest, due: float, semaphore: asyncio.Semaphore
    ) -> None:
        if self.turns is not None:
            try:
                # A conversation is one user: it holds its slot from its first turn to its last,
                # so --max-concurrency counts users, as a chat service sees them.
                await run_conversation(
                    request_id, request, due, self.turns, self._send, self._record
                )
            finally:
                semaphore.release()
            return
        result = RequestResult(request_id, request.id)
        await self._send(result, self.bodies[request.id], due, semaphore)
        self._record(result)

    async def _send(
        self,
        result: RequestResult,
        body: bytes,
        due: float,
        slot: asyncio.Semaphore | None = None,
    ) -> None:
        """Every attempt of one request; never raises but for cancellation."""
        try:
            await self._attempts(result, body, due, slot)
        except Exception as exc:  # a client bug must cost one result, not the run
            log.exception("request %s failed inside the client", result.request_id)
            result.success, result.error = False, f"client error: {exc!r}"

    def _record(self, result: RequestResult) -> None:
        try:
            self.sink(result)
        except Exception:
            log.exception("recording the result of %s failed", result.request_id)

    async def _attempts(
        self, result: RequestResult, body: bytes, due: float, slot: asyncio.Semaphore | None
    ) -> None:
        """``slot``: the dispatcher's, held for the first attempt and free while backing off;
        None when the caller holds one throughout (a conversation)."""
        result.x_request_id = f"{self.run_tag}-{_HEADER_UNSAFE.sub('_', result.request_id)[:100]}"
        headers = {**self.headers, "X-Request-Id": result.x_request_id}
        endpoints = self.config.load.endpoints
        policy = self.config.retry
        holding = True  # the dispatcher acquired the first slot
        for attempt in itertools.count():
            if not holding and slot is not None:
                await slot.acquire()
            index = self.router.acquire()
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            now = time.perf_counter()
            if attempt == 0:
                result.queued_s = max(0.0, now - due)
            result.sent_at_s = now - self.start
            try:
                await send_once(
                    self.session,
                    endpoints[index],
                    body,
                    headers,
                    self.config.request.stream,
                    result,
                )
            finally:
                self.in_flight -= 1
                self.router.release(index)
                if slot is not None:
                    slot.release()
                    holding = False
            if result.success or not result.retryable or attempt >= policy.max_retries:
                return
            # The slot is free while backing off: only requests on the wire count as concurrency.
            delay = backoff_delay_s(policy, attempt, result.retry_after_s, self.jitter_rng)
            log.info("retrying %s in %.2fs after: %s", result.request_id, delay, result.error)
            await asyncio.sleep(delay)
            result.retry_count = attempt + 1
            result.reset_attempt()


async def run_benchmark(
    config: BenchConfig,
    requests: Sequence[BenchRequest],
    sink: ResultSink | None = None,
    skip_ids: frozenset[str] | set[str] = frozenset(),
) -> RunOutcome:
    """Warm up, then send ``requests`` as the config says; ``sink`` sees each result as it ends.

    ``skip_ids`` are request ids already done (``--resume``): they are neither sent nor counted.
    When any request is a conversation (has followups), every request is run as one.
    """
    outcome = RunOutcome(endpoints=config.load.endpoints)

    def record(result: RequestResult) -> None:
        outcome.results.append(result)
        if sink is not None:
            sink(result)

    max_connections = config.load.max_concurrency + 8
    async with make_session(config.request, max_connections) as session:
        model = config.request.model
        if model is None:
            model = await discover_model(
                session, config.load.endpoints[0], request_headers(config.request)
            )
        outcome.model = model
        # Serialized once, before timing (images included): sending then only moves bytes.
        turns = TurnEncoder(config.request, model, requests) if is_multi_turn(requests) else None
        bodies = {} if turns else {r.id: build_body(r, config.request, model) for r in requests}
        if config.load.warmup:
            warm = warmup_requests(requests, config.load)
            warm_plan = ((f"warmup-{i}", r) for i, r in enumerate(warm))
            warm_results: list[RequestResult] = []
            warm_phase = _Phase(config, session, bodies, warm_results.append, turns)
            await warm_phase.run(warm_plan, None, paced=False)
            failed = sum(not r.success for r in warm_results)
            log.info("warm-up: %d requests, %d failed", len(warm_results), failed)
        phase = _Phase(config, session, bodies, record, turns)
        plan = pending_plan(requests, config.load, skip_ids)
        outcome.started_at = time.time()
        outcome.duration_s = await phase.run(plan, config.load.duration_s)
        outcome.max_in_flight = phase.max_in_flight
    return outcome
