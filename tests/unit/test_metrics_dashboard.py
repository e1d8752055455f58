"""deploy/grafana/vlserve.json queries only series that vlserve exports: a server's /metrics
(the API against the fake engine) or the launcher's text. Renaming a series breaks this."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from vlserve.api.app import create_app
from vlserve.config import ServerConfig
from vlserve.engine.config import EngineConfig
from vlserve.launch.metrics import ChildStatus, render

from .test_api_fake_engine import FakeEngine

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "vlserve.json"

# PromQL words that look like series names but are not (functions are told by their "(").
_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool"}
    | {"and", "or", "unless", "offset"}
)
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def series_in(expr: str) -> set[str]:
    """The series an expression selects: identifiers left once strings, label matchers,
    ranges, numbers and grouping clauses are cut out, and that are neither functions nor
    keywords."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b\d[\w.]*", " ", expr)  # numbers and durations (offset 5m)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for match in _IDENT.finditer(expr):
        word = match.group()
        if word in _KEYWORDS or expr[match.end() :].lstrip().startswith("("):
            continue
        names.add(word)
    return names


def dashboard_exprs() -> list[str]:
    """Every query: the panels' targets (rows included) and the template variables'."""
    board = json.loads(DASHBOARD.read_text())
    exprs = []
    for panel in board["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            exprs += [t["expr"] for t in inner.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            # label_values(series, label): the label is not a series
            exprs.append(re.sub(r"label_values\(([^,]+),[^)]*\)", r"\1", text))
    return exprs


def sample_names(text: str) -> set[str]:
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


async def _server_metrics() -> str:
    """A chat request through the whole API, then /metrics: every request series exists."""
    config = ServerConfig(EngineConfig("/models/fake"), served_model_names=("fake",))
    app = create_app(config, FakeEngine())  # type: ignore[arg-type]
    async with app.router.lifespan_context(app):
        for _ in range(100):
            if app.state.vl.defaults is not None:
                break
            await asyncio.sleep(0.01)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            body = {"model": "fake", "messages": [{"role": "user", "content": "a b c"}]}
            assert (await http.post("/v1/chat/completions", json=body)).status_code == 200
            return (await http.get("/metrics")).text


def exported() -> set[str]:
    launcher = render([ChildStatus("instance-0", True, True, 0, 0)], 1)
    return sample_names(asyncio.run(_server_metrics())) | sample_names(launcher)


def test_every_dashboard_series_is_exported() -> None:
    exprs = dashboard_exprs()
    assert len(exprs) > 20
    names = exported()
    missing = {name: expr for expr in exprs for name in series_in(expr) if name not in names}
    assert not missing, missing
    for expr in exprs:
        assert series_in(expr), expr  # each query reads some series


def test_every_engine_series_has_a_panel() -> None:
    """The issue's list: each of them is on the dashboard."""
    queried = {name for expr in dashboard_exprs() for name in series_in(expr)}
    for name in (
        "vlserve_num_requests_running",
        "vlserve_num_requests_waiting",
        "vlserve_kv_cache_usage_ratio",
        "vlserve_prefix_cache_query_tokens_total",
        "vlserve_prefix_cache_hit_tokens_total",
        "vlserve_preemptions_total",
        "vlserve_time_to_first_token_seconds_bucket",
        "vlserve_time_per_output_token_seconds_bucket",
        "vlserve_e2e_request_latency_seconds_bucket",
        "vlserve_queue_time_seconds_bucket",
        "vlserve_prompt_tokens_total",
        "vlserve_completion_tokens_total",
        "vlserve_step_tokens_bucket",
        "vlserve_engine_stalled_seconds",
        "vlserve_launch_instances_ready",
        "vlserve_launch_restarts_total",
        "vlserve_launch_hangs_total",
    ):
        assert name in queried, name


def test_the_server_series_carry_model_name() -> None:
    families = text_string_to_metric_families(asyncio.run(_server_metrics()))
    for family in families:
        if family.name.startswith("vlserve_requests"):
            continue  # HTTP requests by route: not a model's
        for sample in family.samples:
            assert sample.labels.get("model_name") == "fake", sample


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (le) (rate(a_bucket{model_name=~"$m"}[$__rate_interval]))', {"a_bucket"}),
        ("sum(rate(a_sum[5m])) / sum(rate(a_count[5m]))", {"a_sum", "a_count"}),
        ('max without (pod) (g{x="by(y)"}) and on (i) h offset 5m', {"g", "h"}),
        ("histogram_quantile(0.99, x)", {"x"}),
        ("label_values(vlserve_x, model_name)", {"vlserve_x", "model_name"}),  # raw: see above
    ],
)
def test_series_in(expr: str, names: set[str]) -> None:
    assert series_in(expr) == names
