"""EngineLoop: the inference thread's loop; ``step()`` = schedule → run → sample → emit."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from vlserve.engine.block_manager import BlockManager
from vlserve.engine.detokenizer import IncrementalDetokenizer
from vlserve.engine.device import empty_cache, free_memory_bytes, is_out_of_memory
from vlserve.engine.graphs import DecodeGraphs, graph_factory
from vlserve.engine.guided import CompiledGuide, GuideMasker
from vlserve.engine.prompt import ChatPrompt, EncodedPrompt
from vlserve.engine.request import (
    FinishReason,
    SamplingParams,
    StepStats,
    TokenEvent,
    TokenLogprob,
)
from vlserve.engine.runner import ModelRunner
from vlserve.engine.sampling import RowLogprobs, SamplerState, sample
from vlserve.engine.scheduler import (
    CPU_PREFILL_TOKENS,
    DEVICE_PREFILL_TOKENS,
    Scheduler,
    StepPlan,
    StepRow,
)
from vlserve.engine.sequence import Sequence
from vlserve.errors import EngineError, RequestTimeoutError, VLServeError

if TYPE_CHECKING:
    from vlserve.engine.engine import EngineConfig, EngineHooks

log = logging.getLogger(__name__)

CPU_DEFAULT_KV_TOKENS = 65_536
CPU_KV_MEMORY_FRACTION = 0.25  # of the host's available memory, at most


def kv_cache_tokens(config: EngineConfig, runner: ModelRunner) -> int:
    """The KV budget: ``--kv-cache-tokens``; else a fraction of the free device memory after
    loading (accelerators), or 65536 tokens within a quarter of the available RAM (CPU)."""
    if config.kv_cache_tokens is not None:
        return config.kv_cache_tokens
    per_token = runner.kv_bytes_per_token
    free = free_memory_bytes(runner.device)
    if runner.device.type == "cpu":
        return max(min(CPU_DEFAULT_KV_TOKENS, int(free * CPU_KV_MEMORY_FRACTION) // per_token), 1)
    return max(int(free * config.kv_cache_memory_fraction) // per_token, 1)


class EngineLoop:
    """Owns the scheduler and the KV cache; everything here runs on the inference thread, except
    ``new_sequence`` and what the caller does under ``lock``."""

    def __init__(
        self,
        config: EngineConfig,
        runner: ModelRunner,
        lock: threading.Condition,
        hooks: EngineHooks,
    ) -> None:
        self.config = config
        self.runner = runner
        self.lock = lock
        self.hooks = hooks
        self.progress_at: float | None = None  # since when work waits on a step (None: idle)
        blocks = max(kv_cache_tokens(config, runner) // config.block_size, 1)
        runner.allocate_kv(blocks + 1, config.block_size)  # + the null block
        buckets = config.decode_row_buckets
        runner.pad_decode_rows = runner.device.type != "cpu" if buckets is None else buckets
        self.blocks = BlockManager(blocks + 1, config.block_size, config.prefix_caching)
        scheduling = config.scheduler
        if scheduling.max_prefill_tokens is None:
            cpu = runner.device.type == "cpu"
            chunk = CPU_PREFILL_TOKENS if cpu else DEVICE_PREFILL_TOKENS
            scheduling = dataclasses.replace(scheduling, max_prefill_tokens=chunk)
        self.scheduler: Scheduler[Sequence] = Scheduler(scheduling, self.blocks)
        self._capture_decode_graphs(scheduling.max_num_seqs)
        self.masker = GuideMasker(runner.vocab_size, runner.device.torch_device)

    def _capture_decode_graphs(self, max_rows: int) -> None:
        """Decode graphs where the device has them (engine/graphs.py). A capture that fails
        in auto mode leaves the steps eager, with the reason in the log: a server that works
        beats one that does not start."""
        runner = self.runner
        make_graph = graph_factory(runner.device.type, self.config.decode_graph)
        if make_graph is None or not runner.paged_decode:
            return
        graphs = DecodeGraphs(runner, max_rows, make_graph)
        try:
            graphs.capture()
        except Exception:
            if self.config.decode_graph != "auto":
                raise
            log.exception("capturing the decode step failed: decode steps stay eager")
            return
        runner.graphs = graphs

    def new_sequence(
        self,
        prompt: EncodedPrompt,
        params: SamplingParams,
        request_id: str,
        emit: Callable[[TokenEvent], None],
        timeout_s: float,
        *,
        index: int = 0,
        guide: CompiledGuide | None = None,
    ) -> Sequence:
        now = time.monotonic()
        runner = self.runner
        seq = Sequence.for_prompt(request_id, prompt, params, emit, now + timeout_s, now)
        seq.index = index
        seq.detok = IncrementalDetokenizer(runner.tokenizer, params.stop)
        seq.sampler = SamplerState(
            params, seq.token_ids, runner.vocab_size, runner.device.torch_device
        )
        if guide is not None:
            seq.sampler.guide = guide.new_state()
        return seq

    # -- the loop -----------------------------------------------------------------------------
    def run(self, stopped: Callable[[], bool]) -> None:
        while True:
            with self.lock:
                while not stopped() and not self.scheduler.has_work():
                    self.progress_at = None
                    self.lock.wait()
                if stopped():
                    return
                if self.progress_at is None:  # work arrived after idling: the clock starts now
                    self.progress_at = time.monotonic()
                self._drop_cancelled()
                plan = self.scheduler.schedule()
            if plan.seqs:
                self.step(plan)
            self.progress_at = time.monotonic()

    def stalled_for(self, now: float) -> float:
        """Seconds the engine has had work without finishing a step (0 while idle): read by
        other threads, so a stuck device call is noticed outside the thread it holds."""
        since = self.progress_at
        return 0.0 if since is None else max(now - since, 0.0)

    def step(self, plan: StepPlan[Sequence]) -> None:
        rows, hits, queries = (
            self._before_prefill(plan.rows) if plan.is_prefill else (plan.rows, 0, 0)
        )
        if not rows:
            return
        seqs = [row.seq for row in rows]
        done = [i for i, row in enumerate(rows) if row.samples]  # a chunk samples nothing
        ready = [seqs[i] for i in done]
        try:
            logits = self.runner.run(seqs, plan.is_prefill, [row.end for row in rows])
            if len(done) < len(rows):
                logits = logits[done]
            tokens, logprobs = sample(logits, [seq.sampler for seq in ready], self.masker)
        except Exception as exc:
            self._fail(exc, seqs)
            return
        for row in rows:
            self.blocks.commit(row.seq, row.end)
        if self.hooks.on_step is not None:
            self.hooks.on_step(self._stats(rows, plan, hits, queries))
        for seq, token, row_logprobs in zip(ready, tokens, logprobs, strict=True):
            self._on_token(seq, token, row_logprobs)

    def _stats(
        self, rows: list[StepRow[Sequence]], plan: StepPlan[Sequence], hits: int, queries: int
    ) -> StepStats:
        return StepStats(
            rows=len(rows),
            tokens=sum(row.end - row.start for row in rows),
            is_prefill=plan.is_prefill,
            kv_blocks_used=self.blocks.num_used_blocks - 1,  # the null block is never free
            kv_blocks_total=self.blocks.num_blocks - 1,
            prefix_hit_tokens=hits,
            preemptions=len(plan.preempted),
            prefix_query_tokens=queries,
        )

    def warm_up(self) -> None:
        """Two short generations (one with an image) through the real path, so the first user
        does not pay for it; the caches are emptied afterwards."""
        from PIL import Image

        image = Image.new("RGB", (64, 64), (127, 127, 127))
        prompts = [
            ChatPrompt([{"role": "user", "content": [{"type": "image", "image": image}]}]),
            ChatPrompt([{"role": "user", "content": [{"type": "text", "text": "warm up"}]}]),
        ]
        encoded = self.runner.encode([self.runner.preprocess(p) for p in prompts])
        params = SamplingParams(max_tokens=2, temperature=0.0)
        seqs = [
            self.new_sequence(e, params, f"warm-up-{i}", lambda ev: None, 600.0)
            for i, e in enumerate(encoded)
        ]
        self.scheduler.waiting.extend(seqs)  # past the queue limit: nobody else is waiting yet
        while self.scheduler.has_work():
            plan = self.scheduler.schedule()
            if not plan.seqs:
                raise EngineError("the KV cache is too small for the warm-up requests")
            self.step(plan)
        if any(seq.num_output_tokens == 0 for seq in seqs):
            raise EngineError("the warm-up generation failed")
        self.blocks.reset_prefix_cache()

    # -- per-token bookkeeping ------------------------------------------------------------------
    def _before_prefill(
        self, rows: list[StepRow[Sequence]]
    ) -> tuple[list[StepRow[Sequence]], int, int]:
        """Stamp first schedules and run the test hook one request at a time, so a request it
        fails never takes its prefill batch-mates down with it. Returns the rows kept, the
        prompt tokens the prefix cache gave the sequences starting now, and their prompt
        tokens (vLLM's prefix-cache hits and queries)."""
        now = time.monotonic()
        kept = []
        hits = queries = 0
        for row in rows:
            seq = row.seq
            if seq.scheduled_time is None:
                seq.scheduled_time = now
                seq.num_prefix_hit_tokens = min(seq.num_cached_tokens, seq.num_prompt_tokens)
                hits += seq.num_prefix_hit_tokens
                queries += seq.num_prompt_tokens
            try:
                if self.hooks.before_prefill is not None:
                    self.hooks.before_prefill(seq.request_id)
            except Exception as exc:
                self._fail(exc, [seq])
                continue
            kept.append(row)
        return kept, hits, queries

    def _on_token(self, seq: Sequence, token: int, row_logprobs: RowLogprobs | None) -> None:
        if seq.detok is None:
            raise EngineError(f"request {seq.request_id} has no detokenizer")
        params = seq.params
        seq.token_ids.append(token)
        finish: FinishReason | None = None
        text = ""
        logprobs: tuple[TokenLogprob, ...] = ()
        guide = seq.sampler.guide
        if (
            token in params.stop_token_ids
            or (not params.ignore_eos and token in self.runner.eos_token_ids)
            or (guide is not None and guide.terminated)  # the grammar ended (ignore_eos too)
        ):
            finish = FinishReason.STOP
        else:
            if row_logprobs is not None:
                logprobs = (self.runner.token_bytes.logprob(token, *row_logprobs),)
            text = seq.detok.add(token)
            if seq.detok.stopped:
                finish = FinishReason.STOP
        if finish is None and (
            seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= self.runner.max_model_len
        ):
            finish = FinishReason.LENGTH
        if finish is not None:
            text += seq.detok.flush()
        seq.emit(seq.event(text, (token,), finish, logprobs=logprobs))
        if finish is not None:
            self._finish(seq, finish, emit=False)

    def _drop_cancelled(self) -> None:
        """Under the lock: remove aborted and expired requests before the next step."""
        now = time.monotonic()
        for seq in self.scheduler:
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

    def _fail(self, exc: Exception, seqs: list[Sequence]) -> None:
        if is_out_of_memory(exc):
            log.error("out of memory in a step of %d request(s); failing them only", len(seqs))
            empty_cache(self.runner.device)
            error: VLServeError = EngineError("the device ran out of memory for this request")
        else:
            log.exception("engine step failed for %d request(s)", len(seqs))
            error = EngineError("generation failed inside the engine")
        for seq in seqs:
            self._finish(seq, FinishReason.ERROR, error)

    def fail_all(self, error: VLServeError | None = None) -> None:
        """The thread is dying or stopping: everyone admitted or waiting gets an answer first."""
        for seq in list(self.scheduler):
            self._finish(seq, FinishReason.ERROR, error or EngineError("the engine failed"))

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
        with self.lock:
            self.scheduler.finish(seq)
        if emit:
            seq.emit(seq.event("", (), reason, error))
