"""W3C traceparent parsing (https://www.w3.org/TR/trace-context/#traceparent-header) and the
JSON log formatter."""

from __future__ import annotations

import json
import logging

import pytest

from vlserve.api.accesslog import JsonFormatter, log_line, request_fields
from vlserve.api.metrics import RequestRecord
from vlserve.tracecontext import TraceParent

GOOD = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_a_valid_header_parses_and_a_child_keeps_the_trace() -> None:
    parent = TraceParent.parse(GOOD)
    assert parent == TraceParent("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", "01")
    assert parent.header() == GOOD and TraceParent.parse(GOOD.encode()) == parent
    child = parent.child()
    assert child.trace_id == parent.trace_id and child.flags == "01"
    assert child.parent_id != parent.parent_id and len(child.parent_id) == 16
    # a later version may add fields; this implementation reads the first four
    assert TraceParent.parse("01-" + GOOD[3:] + "-extra") is not None


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "garbage",
        GOOD.upper(),  # hex must be lower-case
        "ff" + GOOD[2:],  # version ff is invalid
        GOOD + "-extra",  # version 00 has exactly four fields
        "00-" + "0" * 32 + "-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-" + "0" * 16 + "-01",
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",  # short trace id
        "01-" + GOOD[3:] + "-" + "x" * 600,  # too long to bother
    ],
)
def test_malformed_headers_are_ignored(value: str | None) -> None:
    assert TraceParent.parse(value) is None


def test_new_traces_are_random_and_not_sampled() -> None:
    a, b = TraceParent.new(), TraceParent.new()
    assert a.trace_id != b.trace_id and a.flags == "00"
    assert TraceParent.parse(a.header()) == a


def test_the_json_formatter_puts_request_fields_at_the_top_level() -> None:
    record = RequestRecord(request_id="r1", method="POST", path='/v1/x"\n')
    record.status, record.client, record.trace_id = 200, "10.0.0.1:5555", "ab" * 16
    fields = request_fields(record, 0.5)
    log_record = logging.LogRecord(
        "vlserve.request", logging.INFO, __file__, 1, "%s", (log_line(record, 0.5),), None
    )
    log_record.fields, log_record.event = fields, "request"
    line = JsonFormatter().format(log_record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "request" and entry["level"] == "info"
    assert entry["path"] == '/v1/x"\n' and entry["client"] == "10.0.0.1:5555"
    assert entry["e2e_ms"] == 500.0 and entry["time"].endswith("Z")
    assert 'client=10.0.0.1:5555' in log_line(record, 0.5)
