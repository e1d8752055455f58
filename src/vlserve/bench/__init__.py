"""The benchmark client: OpenAI-compatible chat endpoints under load; imports no torch."""

from __future__ import annotations

from vlserve.bench.client import RequestResult, send_once
from vlserve.bench.config import (
    BenchConfig,
    DatasetConfig,
    LoadConfig,
    OutputConfig,
    RequestOptions,
    RetryPolicy,
)
from vlserve.bench.dataset import BenchRequest, Dataset, DatasetIssue, Turn, load_dataset
from vlserve.bench.metrics import percentile, summarize
from vlserve.bench.runner import RunOutcome, run_benchmark
from vlserve.bench.sse import SSEEvent, SSEParser

__all__ = [
    "BenchConfig",
    "BenchRequest",
    "Dataset",
    "DatasetConfig",
    "DatasetIssue",
    "LoadConfig",
    "OutputConfig",
    "RequestOptions",
    "RequestResult",
    "RetryPolicy",
    "RunOutcome",
    "SSEEvent",
    "SSEParser",
    "Turn",
    "load_dataset",
    "percentile",
    "run_benchmark",
    "send_once",
    "summarize",
]
