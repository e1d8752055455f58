"""AsyncEngine: generate(prompt, params, request_id) → RequestStream; owns the inference thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from vlserve.engine.client import EngineState, ModelInfo
from vlserve.engine.config import EngineConfig
from vlserve.engine.device import (
    DeviceInfo,
    bind_thread,
    empty_cache,
    is_out_of_memory,
    share_cpu,
)
from vlserve.engine.encoder import Encoder
from vlserve.engine.fit import fit, prompt_limit
from vlserve.engine.guided import CompiledGuide, GuideCompiler
from vlserve.engine.long_text import LONG_TEXT_CHARS, LongTexts, text_chars
from vlserve.engine.loop import EngineLoop
from vlserve.engine.preprocess import hide_texts
from vlserve.engine.prompt import ChatPrompt, EncodedPrompt, ImageFeatures, PreparedPrompt
from vlserve.engine.request import SamplingParams, StepStats, TokenEvent
from vlserve.engine.runner import ModelRunner
from vlserve.engine.sequence import Sequence
from vlserve.engine.stream import RequestStream
from vlserve.errors import EngineError, EngineUnavailableError
from vlserve.lru import BytesLRU

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineHooks:
    """Observation and test hooks, given at construction; all but ``on_fatal`` run on the
    inference thread."""

    before_prefill: Callable[[str], None] | None = None  # request id; may raise: fails it only
    on_step: Callable[[StepStats], None] | None = None
    on_fatal: Callable[[BaseException], None] | None = None


def _encoder_batch_patches(config: EngineConfig, device: DeviceInfo) -> int:
    """CPU compute grows with the images, so batching there only makes the first wait for the
    last (measured: c=8 TTFT p50 338 ms instead of 178-207); accelerators amortize kernel
    launches over a batch."""
    if config.encoder_batch_patches is not None:
        return config.encoder_batch_patches
    return 0 if device.type == "cpu" else 32_768


class AsyncEngine:
    """The EngineClient of vlserve: model work on one inference thread (and the vision tower on
    an encoder thread), results back to asyncio through per-request queues."""

    def __init__(
        self,
        config: EngineConfig,
        device: DeviceInfo,
        runner_factory: Callable[[BytesLRU[ImageFeatures]], ModelRunner] | None = None,
        hooks: EngineHooks | None = None,
    ) -> None:
        self.config = config
        self.device = device
        self.hooks = hooks or EngineHooks()
        self.encoder_cache: BytesLRU[ImageFeatures] = BytesLRU(
            config.encoder_cache_mb * 1024 * 1024
        )
        cache_bytes = config.encoder_cache_mb * 1024 * 1024
        self._runner_factory = runner_factory or (
            lambda cache: ModelRunner(
                config.model_path,
                device,
                encoder_cache=cache,
                image_cache_bytes=cache_bytes,
                load_format=config.load_format,
                model_impl=config.model_impl,
                attention=config.attention,
            )
        )
        self._state = EngineState.LOADING
        self.failure: BaseException | None = None
        self.runner: ModelRunner | None = None
        self.loop: EngineLoop | None = None
        self._lock = threading.Condition()
        self._stop = False
        self._prep = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vlserve-prep")
        # Long texts are bounded and tokenized on a lane of their own (engine/long_text.py).
        self._long = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vlserve-long")
        self._long_texts: LongTexts | None = None
        # Grammars compile apart from preprocessing (a slow schema never delays an image), in
        # worker processes with a time budget; this thread only sets the compiler up, once.
        self._grammar_setup = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="vlserve-grammar-setup"
        )
        self._guide_compiler: concurrent.futures.Future[GuideCompiler] | None = None
        self._guide_workers: GuideCompiler | None = None  # once set up: killed at shutdown
        self._encoder = (
            Encoder(
                self._encode_on_encoder_thread,
                functools.partial(bind_thread, device, side=True),
                _encoder_batch_patches(config, device),
                patches=lambda p: sum(int(i.pixel_values.shape[0]) for i in p.visuals),
            )
            if config.encoder_thread
            else None
        )
        self._thread = threading.Thread(target=self._main, name="vlserve-engine", daemon=True)
        self._ready = threading.Event()
        self._info: ModelInfo | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    @property
    def state(self) -> EngineState:
        limit = self.config.engine_stall_timeout_s
        if self._state is EngineState.READY and limit > 0 and self.stalled_s > limit:
            return EngineState.STALLED
        return self._state

    @property
    def stalled_s(self) -> float:
        loop = self.loop
        return loop.stalled_for(time.monotonic()) if loop is not None else 0.0

    @property
    def model_info(self) -> ModelInfo | None:
        return self._info

    def start(self) -> None:
        self._thread.start()

    async def wait_ready(self) -> None:
        await asyncio.to_thread(self._ready.wait)
        if self._state is not EngineState.READY:
            raise EngineUnavailableError(f"engine failed to start: {self.failure}")

    def shutdown(self, timeout_s: float = 10.0) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._prep.shutdown(wait=False, cancel_futures=True)
        self._long.shutdown(wait=False, cancel_futures=True)
        self._grammar_setup.shutdown(wait=False, cancel_futures=True)
        if self._guide_workers is not None:
            self._guide_workers.shutdown()
        if self._encoder is not None:
            self._encoder.shutdown()
        if self._state is EngineState.READY:
            self._state = EngineState.STOPPED

    @property
    def num_running(self) -> int:
        return self.loop.scheduler.num_running if self.loop else 0

    @property
    def num_waiting(self) -> int:
        return self.loop.scheduler.num_waiting if self.loop else 0

    def cache_bytes(self) -> dict[str, int]:
        """The processed-media cache (images and videos through the processor) and the
        encoder cache (vision-tower outputs), in bytes."""
        processed = self.runner.preprocess.cache.nbytes if self.runner is not None else 0
        return {"processed_media": processed, "encoder": self.encoder_cache.nbytes}

    # -- the one entry --------------------------------------------------------------------------
    async def generate(
        self, prompt: ChatPrompt, params: SamplingParams, request_id: str
    ) -> RequestStream:
        """Prepare (preprocessing thread; texts over ``LONG_TEXT_CHARS`` are first bounded and
        tokenized on the long-text lane, so short prompts never queue behind them) → fit and
        admit (400/429 before any image work) → encode (encoder thread, unless the encoder cache holds every image and video patch
        already: then the preprocessing thread finished it, and a cache hit never queues behind
        another request's vision forward) → queue. Returns the request's event stream."""
        _, loop = self._require_ready()
        aio = asyncio.get_running_loop()
        guide = None
        if params.guide is not None:  # a 400 for a bad schema comes before any image work
            guide = await (await self._guides()).obtain(params.guide)
        pieces = None
        if text_chars(prompt.messages) > LONG_TEXT_CHARS:  # bounded, then tokenized, apart
            pieces = await aio.run_in_executor(self._long, self._tokenize_long, prompt, loop)
        prepared, encoded = await aio.run_in_executor(self._prep, self._prepare, prompt, pieces)
        params = fit(
            prepared,
            params,
            max_model_len=self._loaded().max_model_len,
            kv_tokens=loop.scheduler.blocks.capacity_tokens,
            max_image_tokens=self.config.max_image_tokens,
            default_max_tokens=self.config.default_max_tokens,
        )
        with self._lock:
            loop.scheduler.check_admissible(prepared.num_tokens, params.max_tokens or 0, params.n)
        if encoded is None:
            encoded = await self._encode(prepared)
        return self._submit(encoded, params, request_id, guide)

    def _tokenize_long(self, prompt: ChatPrompt, loop: EngineLoop) -> list[list[int]]:
        """Long-text lane: the texts' ids, or a 400 once they provably cannot fit the context
        or the KV cache (whichever is smaller), before or while tokenizing."""
        runner = self._loaded()
        if self._long_texts is None:
            self._long_texts = LongTexts(runner.preprocess.tokenizer)
        limit, what = prompt_limit(runner.max_model_len, loop.scheduler.blocks.capacity_tokens)
        return self._long_texts.tokenize(hide_texts(prompt.messages)[1], limit, what)

    def _prepare(
        self, prompt: ChatPrompt, pieces: list[list[int]] | None = None
    ) -> tuple[PreparedPrompt, EncodedPrompt | None]:
        """Preprocessing thread: the prepared prompt, and its encoding when that needs no
        device work (text only, or every visual input's features in the encoder cache)."""
        runner = self._loaded()
        prepared = runner.preprocess(prompt, pieces)
        hit = runner.encode_cached(prepared) if self._encoder is not None else None
        return prepared, hit

    async def _guides(self) -> GuideCompiler:
        """The grammar compiler, set up on its own thread by the first request with a grammar
        (its vocabulary takes about 1 s, half of it holding the GIL; the workers start then),
        not at startup: a server whose clients never ask for one never pays. A failed setup is
        tried again by the next request."""
        if self._guide_compiler is None:
            self._guide_compiler = self._grammar_setup.submit(self._make_guides)
        setup = self._guide_compiler
        try:  # shielded: one waiter's cancellation must not cancel the setup for the others
            return await asyncio.shield(asyncio.wrap_future(setup))
        except Exception:
            if self._guide_compiler is setup:
                self._guide_compiler = None
            raise

    def _make_guides(self) -> GuideCompiler:
        runner = self._loaded()
        self._guide_workers = GuideCompiler(
            runner.token_bytes,
            runner.tokenizer,
            sorted(runner.eos_token_ids),
            workers=self.config.grammar_workers,
            timeout_s=self.config.grammar_compile_timeout_s,
        )
        return self._guide_workers

    def _encode_on_encoder_thread(self, prompts: list[PreparedPrompt]) -> list[EncodedPrompt]:
        share_cpu(self.device, busy=self.num_running > 0)
        return self._loaded().encode(prompts)

    async def _encode(self, prepared: PreparedPrompt) -> EncodedPrompt:
        try:
            if self._encoder is not None:
                return await self._encoder.encode(prepared)
            # no encoder thread: positions now, image features inside the prefill
            runner = self._loaded()
            aio = asyncio.get_running_loop()
            encode = functools.partial(runner.encode, [prepared], with_features=False)
            return (await aio.run_in_executor(self._prep, encode))[0]
        except Exception as exc:
            if is_out_of_memory(exc):
                log.error("out of memory while encoding images")
                empty_cache(self.device)
                raise EngineError("the device ran out of memory for this request's images") from exc
            log.exception("encoding images failed")
            raise EngineError("encoding the images failed inside the engine") from exc

    def _submit(
        self,
        prompt: EncodedPrompt,
        params: SamplingParams,
        request_id: str,
        guide: CompiledGuide | None = None,
    ) -> RequestStream:
        """Queue one sequence per choice. Choice i of a seeded request draws from seed + i."""
        _, loop = self._require_ready()
        aio = asyncio.get_running_loop()
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()

        def emit(event: TokenEvent) -> None:
            # the caller's event loop may be closed: then nobody is left to tell
            with contextlib.suppress(RuntimeError):
                aio.call_soon_threadsafe(queue.put_nowait, event)

        seqs = []
        for i in range(params.n):
            seed = None if params.seed is None else params.seed + i
            choice = dataclasses.replace(params, seed=seed, n=1) if params.n > 1 else params
            seqs.append(
                loop.new_sequence(
                    prompt,
                    choice,
                    request_id if i == 0 else f"{request_id}-{i}",
                    emit,
                    self.config.request_timeout_s,
                    index=i,
                    guide=guide,
                )
            )
        stream = RequestStream(
            request_id,
            queue,
            functools.partial(self._abort, seqs),
            lambda: (seqs[0].num_prompt_tokens, sum(s.num_output_tokens for s in seqs)),
            n=params.n,
            # enforced here too, on the event loop: a step that never returns cannot hold it
            deadline=(seqs[0].deadline, self.config.request_timeout_s),
        )
        with self._lock:
            first = seqs[0]  # 429 for all the choices or none
            loop.scheduler.check_admissible(first.num_prompt_tokens, first.max_tokens, len(seqs))
            for seq in seqs:
                loop.scheduler.add(seq)  # raises 400 (never fits) or 429 (queue full)
            self._lock.notify_all()
        return stream

    def _abort(self, seqs: list[Sequence]) -> None:
        with self._lock:
            for seq in seqs:
                if not seq.done:
                    seq.aborted = True
            self._lock.notify_all()

    def _require_ready(self) -> tuple[ModelRunner, EngineLoop]:
        if self._state is EngineState.LOADING:
            raise EngineUnavailableError("the model is still loading; retry shortly")
        if self.state is EngineState.STALLED:
            raise EngineUnavailableError(
                "the engine has finished no step for over "
                f"{self.config.engine_stall_timeout_s:g} s (stalled); retry shortly",
                retry_after_s=5,
            )
        if self._state is not EngineState.READY or self.runner is None or self.loop is None:
            raise EngineUnavailableError("the engine is not running", retry_after_s=30)
        return self.runner, self.loop

    def _loaded(self) -> ModelRunner:
        if self.runner is None:
            raise EngineError("the model is not loaded")
        return self.runner

    # -- inference thread -------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            bind_thread(self.device)
            runner = self._runner_factory(self.encoder_cache)
            self.runner = runner
            self.loop = EngineLoop(self.config, runner, self._lock, self.hooks)
            self.loop.warm_up()
            self._info = ModelInfo(
                self.config.model_path,
                runner.max_model_len,
                runner.vocab_size,
                runner.generation_config,
                self.device.type,
                self.device.dtype_name,
            )
            self._state = EngineState.READY
            log.info(
                "engine ready: %s on %s (%s), KV cache %d tokens",
                self.config.model_path,
                self.device.type,
                self.device.dtype_name,
                self.loop.scheduler.blocks.capacity_tokens,
            )
        except BaseException as exc:
            self._die(exc, "failed to load the model")
            return
        finally:
            self._ready.set()
        try:
            self.loop.run(lambda: self._stop)
            self.loop.fail_all(EngineUnavailableError("the engine is shutting down"))
        except BaseException as exc:
            self.loop.fail_all()
            self._die(exc, "the inference thread died")

    def _die(self, exc: BaseException, what: str) -> None:
        log.exception("%s: %s", what, exc)
        self.failure = exc
        self._state = EngineState.FAILED
        if self.hooks.on_fatal is not None:
            self.hooks.on_fatal(exc)
