"""The request log line (logfmt or JSON) and the JSON formatter of `--log-format json`."""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

from vlserve.api.metrics import RequestRecord

_LOGFMT_SAFE = re.compile(r"[A-Za-z0-9._:/@+-]+")


def request_fields(record: RequestRecord, e2e_s: float) -> dict[str, Any]:
    """What the log says of one request (None fields are left out)."""
    fields: dict[str, Any] = {
        "id": record.request_id,
        "method": record.method,
        "path": record.path,
        "status": record.status,
        "model": record.model,
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "ttft_ms": None if record.ttft_s is None else round(record.ttft_s * 1000, 1),
        "queue_ms": None if record.queue_s is None else round(record.queue_s * 1000, 1),
        "e2e_ms": round(e2e_s * 1000, 1),
        "finish_reason": record.finish_reason,
        "error": record.error_code,
        "client": record.client,
        "trace_id": record.trace_id,
        "traceparent": record.traceparent,
    }
    return {k: v for k, v in fields.items() if v is not None}


def log_line(record: RequestRecord, e2e_s: float) -> str:
    """One logfmt line; client-controlled values are quoted so they cannot forge fields or lines."""
    fields = request_fields(record, e2e_s)
    return "request " + " ".join(f"{k}={_logfmt(v)}" for k, v in fields.items())


def _logfmt(value: object) -> str:
    text = str(value)
    return text if _LOGFMT_SAFE.fullmatch(text) else json.dumps(text)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and a request line's fields
    (given as ``extra={"fields": …}``) at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": getattr(record, "event", None) or record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update({k: v for k, v in fields.items() if k not in out})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure(log_format: str, level: str) -> None:
    """The root logger's one handler, on stderr, in the chosen format."""
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter()
        if log_format == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
