"""AsyncEngine: submit() → async iterator of TokenEvents; owns the inference thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vlserve.engine.detokenizer import IncrementalDetokenizer
from vlserve.engine.device import DeviceInfo, bind_thread, empty_cache, is_out_of_memory
from vlserve.engine.encoder import Encoder
from vlserve.engine.request import FinishReason, GenerationRequest, TokenEvent
from vlserve.engine.runner import DecodeBatch, ModelRunner
from vlserve.engine.sampling import RowSampler, sample_batch
from vlserve.engine.scheduler import Scheduler, SchedulerConfig
from vlserve.engine.stream import RequestStream, Sequence
from vlserve.errors import (
    EngineError,
    EngineUnavailableError,
    RequestTimeoutError,
    VLServeError,
)

log = logging.getLogger(__name__)


class EngineState(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True)
class EngineConfig:
    model_path: str
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    request_timeout_s: float = 600.0
    encoder_thread: bool = True  # off: images are encoded inside the prefill
    encoder_batch_patches: int | None = None  # None: 0 (one request at a time) on CPU, else 32768

    def __post_init__(self) -> None:
        if self.request_timeout_s <= 0:
            raise ValueError("request_timeout_s must be > 0")


def _encoder_batch_patches(config: EngineConfig, device: DeviceInfo) -> int:
    """CPU compute grows with the images, so batching there only makes the first wait for the
    last (measured: c=8 TTFT p50 338 ms instead of 178-207); accelerators amortize kernel
    launches over a batch."""
    if config.encoder_batch_patches is not None:
        return config.encoder_batch_patches
    return 0 if device.type == "cpu" else 32_768


class AsyncEngine:
    """All model work happens on one inference thread; results return through asyncio queues."""

    def __init__(
        self,
        config: EngineConfig,
        device: DeviceInfo,
        runner_factory: Callable[[], ModelRunner] | None = None,
    ) -> None:
        self.config = config
        self._runner_factory = runner_factory or (lambda: ModelRunner(config.model_path, device))
        self.device = device
        self.state = EngineState.LOADING
        self.failure: BaseException | None = None
        self.runner: ModelRunner | None = None
        self._scheduler: Scheduler[Sequence] = Scheduler(config.scheduler)
        self._lock = threading.Condition()
        self._stop = False
        self._prep = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vlserve-prep")
        self._encoder = (
            Encoder(
                lambda prompts: self._loaded_runner().encode(prompts),
                functools.partial(bind_thread, device, side=True),
                _encoder_batch_patches(config, device),
            )
            if config.encoder_thread
            else None
        )
        self._thread = threading.Thread(target=self._main, name="vlserve-engine", daemon=True)
        self._ready = threading.Event()
        self.on_fatal: Callable[[BaseException], None] | None = None
        # Observation and test hooks, called on the inference thread: before each prefill
        # (may raise, which fails that request only) and after each decode step (batch size).
        self.before_prefill: Callable[[GenerationRequest], None] | None = None
        self.on_decode_step: Callable[[int], None] | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    async def wait_ready(self) -> None:
        await asyncio.to_thread(self._ready.wait)
        if self.state is not EngineState.READY:
            raise EngineUnavailableError(f"engine failed to start: {self.failure}")

    def shutdown(self, timeout_s: float = 10.0) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._prep.shutdown(wait=False, cancel_futures=True)
        if self._encoder is not None:
            self._encoder.shutdown()
        if self.state is EngineState.READY:
            self.state = EngineState.STOPPED

    @property
    def num_running(self) -> int:
        return self._scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self._scheduler.num_waiting

    # -- API ---------------------------------------------------------------------------------------
    def _require_ready(self) -> ModelRunner:
        if self.state is EngineState.LOADING:
            raise EngineUnavailableError("the model is still loading; retry shortly")
        if self.state is not EngineState.READY or self.runner is None:
            raise EngineUnavailableError("the engine is not running", retry_after_s=30)
        return self.runner

    async def prepare(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        """Render and preprocess a chat off the event loop (one preprocessing thread)."""
        runner = self._require_ready()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._prep, runner.prepare, messages)

    def check_admission(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Raise now the 400 or 429 that ``submit`` would raise, before any image is encoded."""
        self._require_ready()
        with self._lock:
            self._scheduler.check_admissible(num_prompt_tokens, max_tokens)

    async def encode(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Run the vision tower for prepared inputs on the encoder thread (batched with whatever
        else is waiting for it), so that it overlaps the running batch's decode steps instead of
        stalling them at the next prefill.

        Optional: ``submit`` also takes inputs that were not encoded (the prefill encodes them),
        which is what this returns when the encoder thread is off.
        """
        self._require_ready()
        if self._encoder is None:
            return inputs
        try:
            return await self._encoder.encode(inputs)
        except Exception as exc:
            if is_out_of_memory(exc):
                log.error("out of memory while encoding images")
                empty_cache(self.device)
                raise EngineError("the device ran out of memory for this request's images") from exc
            log.exception("encoding images failed")
            raise EngineError("encoding the images failed inside the engine") from exc

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue ``request`` now (raising 400/429/503 at once) and return its event stream."""
        self._require_ready()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        seq = Sequence(
            request=request,
            emit=lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev),
            deadline=time.monotonic() + self.config.request_timeout_s,
        )
        with self._lock:
            self._scheduler.add(seq)  # raises 400 (never fits) or 429 (queue full)
            self._lock.notify_all()
        return RequestStream(seq, queue, self._abort)

    def _abort(self, seq: Sequence) -> None:
        with self._lock:
            if not seq.done:
                seq.aborted = True
                self._lock.notify_all()

    # -- inference thread --------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            bind_thread(self.device)
            self.runner = self._runner_factory()
            self._warm_up(self.runner)
            self.state = EngineState.READY
            log.info(
                "engine ready: %s on %s (%s)",
                self.config.model_path,
                self.device.type,
                self.device.dtype_name,
            )
        except BaseException as exc:
            self._die(exc, "failed to load the model")
            return
        finally:
            self._ready.set()
        batch = DecodeBatch(self.device.torch_device)
        rows: list[Sequence] = []
        try:
            while True:
                with self._lock:
                    while not self._stop and not self._scheduler.has_work():
                        self._lock.wait()
                    if self._stop:
                        break
                    self._drop_cancelled(batch, rows)
                    plan = self._scheduler.schedule()
                if plan.admitted:
                    self._prefill(plan.admitted, batch, rows)
                if rows:
                    self._decode(batch, rows)
        except BaseException as exc:
            # Everyone admitted (prefilled or not) and waiting gets an answer before the exit.
            for seq in list(self._scheduler.running) + list(self._scheduler.waiting):
                self._finish(seq, FinishReason.ERROR, EngineError("the engine failed"))
            self._die(exc, "the inference thread died")

    def _die(self, exc: BaseException, what: str) -> None:
        log.exception("%s: %s", what, exc)
        self.failure = exc
        self.state = EngineState.FAILED
        if self.on_fatal is not None:
            self.on_fatal(exc)

    def _warm_up(self, runner: ModelRunner) -> None:
        """One short generation with an image, so the first user does not pay for it."""
        from PIL import Image

        image = Image.new("RGB", (64, 64), (127, 127, 127))
        messages = [
            {
                "role": "user",
                "content": [{"type": "image", "image": image}, {"type": "text", "text": "warm up"}],
            }
        ]
        text_only = [{"role": "user", "content": [{"type": "text", "text": "warm up, twice"}]}]
        result = runner.prefill([runner.prepare(messages), runner.prepare(text_only)])
        batch = DecodeBatch(self.device.torch_device)
        batch.add(result)
        runner.decode(batch, result.logits.argmax(-1).tolist())

    def _drop_cancelled(self, batch: DecodeBatch, rows: list[Sequence]) -> None:
        """Under the lock: remove aborted and expired requests before the next step."""
        now = time.monotonic()
        for seq in list(self._scheduler.waiting) + rows:
            if seq.aborted:
                self._finish(seq, FinishReason.ABORT)
            elif now > seq.deadline:
                self._finish(
                    seq,
                    FinishReason.ERROR,
                    RequestTimeoutError(
                        f"request exceeded the server's {self.config.request_timeout_s:g} s timeout"
                    ),
                )
        self._compact(batch, rows)

    def _loaded_runner(self) -> ModelRunner:
        if self.runner is None:
            raise EngineError("the model is not loaded")
        return self.runner

    def _prefill(self, seqs: list[Sequence], batch: DecodeBatch, rows: list[Sequence]) -> None:
        """Prefill the newcomers together, sample their first tokens, join them to the batch."""
        runner = self._loaded_runner()
        seqs = self._before_prefill(seqs)
        if not seqs:
            return
        try:
            result = runner.prefill([seq.request.inputs for seq in seqs])
            for seq in seqs:
                req = seq.request
                seq.sampler = RowSampler(
                    req.sampling, req.prompt_token_ids, self.device.torch_device
                )
                seq.detok = IncrementalDetokenizer(runner.tokenizer, req.sampling.stop)
            tokens = sample_batch(result.logits, [seq.sampler for seq in seqs])  # type: ignore[misc]
        except Exception as exc:
            self._fail(exc, seqs)
            return
        batch.add(result)
        for seq, token in zip(seqs, tokens, strict=True):
            seq.request.inputs = {}  # free pixel tensors early
            rows.append(seq)
            self._on_token(seq, token)
        self._compact(batch, rows)

    def _before_prefill(self, seqs: list[Sequence]) -> list[Sequence]:
        """Stamp the queue exit time and run the test hook one request at a time, so a request
        it fails never takes its prefill batch-mates down with it."""
        now = time.monotonic()
        kept = []
        for seq in seqs:
            seq.request.scheduled_time = now
            try:
                if self.before_prefill is not None:
                    self.before_prefill(seq.request)
            except Exception as exc:
                self._fail(exc, [seq])
                continue
            kept.append(seq)
        return kept

    def _decode(self, batch: DecodeBatch, rows: list[Sequence]) -> None:
        runner = self._loaded_runner()
        try:
            logits = runner.decode(batch, [seq.output_ids[-1] for seq in rows])
            tokens = sample_batch(logits, [seq.sampler for seq in rows])  # type: ignore[misc]
        except Exception as exc:
            self._fail(exc, list(rows))
            batch.keep([])
            rows.clear()
            return
        if self.on_decode_step is not None:
            self.on_decode_step(len(rows))
        for seq, token in zip(rows, tokens, strict=True):
            self._on_token(seq, token)
        self._compact(batch, rows)

    def _compact(self, batch: DecodeBatch, rows: list[Sequence]) -> None:
        keep = [i for i, seq in enumerate(rows) if not seq.done]
        if len(keep) != len(rows):
            batch.keep(keep)
            rows[:] = [rows[i] for i in keep]

    def _on_token(self, seq: Sequence, token: int) -> None:
        runner = self._loaded_runner()
        if seq.detok is None:
            raise EngineError(f"request {seq.request_id} produced a token before its prefill")
        sp = seq.request.sampling
        seq.output_ids.append(token)
        finish: FinishReason | None = None
        text = ""
        if token in sp.stop_token_ids or (not sp.ignore_eos and token in runner.eos_token_ids):
            finish = FinishReason.STOP
        else:
            text = seq.detok.add(token)
            if seq.detok.stopped:
                finish = FinishReason.STOP
        total = seq.num_prompt_tokens + len(seq.output_ids)
        if finish is None and (
            len(seq.output_ids) >= sp.max_tokens or total >= runner.max_model_len
        ):
            finish = FinishReason.LENGTH
        if finish is not None:
            text += seq.detok.flush()
        seq.emit(TokenEvent(text, (token,), seq.num_prompt_tokens, len(seq.output_ids), finish))
        if finish is not None:
            self._finish(seq, finish, emit=False)

    def _fail(self, exc: Exception, seqs: list[Sequence]) -> None:
        if is_out_of_memory(exc):
            log.error("out of memory in a step of %d request(s); failing them only", len(seqs))
            empty_cache(self.device)
            error: VLServeError = EngineError("the device ran out of memory for this request")
        else:
            log.exception("engine step failed for %d request(s)", len(seqs))
            error = EngineError("generation failed inside the engine")
        for seq in seqs:
            self._finish(seq, FinishReason.ERROR, error)

    def _finish(
        self,
        seq: Sequence,
        reason: FinishReason,
        error: VLServeError | None = None,
        *,
        emit: bool = True,
    ) -> None:
        if seq.done:
            return
        seq.done = True
        with self._lock:
            self._scheduler.finish([seq])
        if emit:
            seq.emit(TokenEvent("", (), seq.num_prompt_tokens, len(seq.output_ids), reason, error))
