"""schemathesis against the server's own /openapi.json: no 5xx, every response as documented."""

from __future__ import annotations

from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.conftest import ServerProcess, png_data_url  # noqa: E402
from vlserve.api.protocol import MAX_NAME_CHARS, MAX_TOKENS  # noqa: E402

pytestmark = pytest.mark.integration

# Per operation; with the server's replies at a few ms (refusals) to ~1 s (generations on a
# loaded 2-core machine) this keeps the whole module near a minute (hypothesis itself costs
# most of it: generating cases from the request schema).
MAX_EXAMPLES = 200
_IMAGE = png_data_url(32, 32)


def _tame(body: Any, model: str) -> Any:
    """Keep generated requests cheap (few tokens) and local (no fetches of random hosts);
    everything else the fuzzer made is sent as is. Only values the schema allows are changed,
    so a schema-violating case stays violating."""
    if not isinstance(body, dict):
        return body
    if isinstance(body.get("model"), str) and len(body["model"]) <= MAX_NAME_CHARS:
        body["model"] = model  # reach the engine, not only the 404
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if isinstance(value, int) and 4 < value <= MAX_TOKENS:
            body[key] = 4
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = 2  # absent or null: the server's default would be 2,048 tokens
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else []:
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else []:
            url = part.get("image_url", {}) if isinstance(part, dict) else {}
            if isinstance(url, dict) and str(url.get("url", "")).startswith(("http", "file")):
                url["url"] = _IMAGE
    return body


@pytest.fixture(scope="module")
def api_schema(server: ServerProcess):  # type: ignore[no-untyped-def]
    # A schema-violating body may be refused for its size (413) before it is validated.
    rejections = [400, 401, 404, 405, 413, 415, 422, 429, 431]
    config = schemathesis.Config.from_dict(
        {"checks": {"negative_data_rejection": {"expected-statuses": rejections}}}
    )
    schema = schemathesis.openapi.from_url(server.base_url + "/openapi.json", config=config)

    @schema.hook
    def map_body(context, body):  # type: ignore[no-untyped-def]
        return _tame(body, server.model)

    return schema


def test_api_conforms_to_its_schema(api_schema, server: ServerProcess) -> None:  # type: ignore[no-untyped-def]
    # schemathesis' pytest plugin does not run under pytest 9; its Python API does the same work.
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/models", "/health"}
    for operation in operations:
        cases = st.one_of(
            operation.as_strategy(GenerationMode.POSITIVE),
            operation.as_strategy(GenerationMode.NEGATIVE),
        )

        @given(case=cases)
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            derandomize=True,  # the same cases every run: CI failures reproduce
            suppress_health_check=list(HealthCheck),
            phases=[Phase.explicit, Phase.generate],
            database=None,
        )
        def check(case) -> None:  # type: ignore[no-untyped-def]
            # positive_data_acceptance is left out on purpose: schema-valid requests the server
            # cannot honour (n > 1, tools, an undecodable image, a prompt over the context) are
            # refused with a 400 by design, never silently ignored.
            case.call_and_validate(
                base_url=server.base_url,
                timeout=60,
                excluded_checks=[positive_data_acceptance],
            )

        check()
