"""Admission limits seen from a client: a full queue answers 429 at once, a slow request 504,
media over the request's decoding memory 400."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess, png_data_url, start_server, stop_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tight_server(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    srv = start_server(
        tiny_model_path,
        tmp_path_factory.mktemp("tight"),
        "--max-num-seqs",
        "1",
        "--max-queue",
        "1",
        "--request-timeout",
        "6",  # the 504 test waits it out; the others' requests take well under a second
        "--max-request-media-mb",
        "1",
    )
    yield srv
    stop_server(srv)


def _body(server: ServerProcess, max_tokens: int) -> dict:
    return {
        "model": server.model,
        "messages": [{"role": "user", "content": "count"}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
    }


def test_full_queue_answers_429_with_retry_after(tight_server: ServerProcess) -> None:
    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=tight_server.base_url, timeout=60) as client:
            # one running, one waiting, the rest over the limit
            tasks = [
                client.post("/v1/chat/completions", json=_body(tight_server, 24)) for _ in range(5)
            ]
            return await asyncio.gather(*tasks)

    responses = asyncio.run(main())
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) >= 2, statuses
    rejected = [r for r in responses if r.status_code == 429]
    assert rejected, statuses
    for r in rejected:
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error"
    ok = httpx.post(
        tight_server.base_url + "/v1/chat/completions", json=_body(tight_server, 2), timeout=60
    )
    assert ok.status_code == 200


def test_request_timeout_gives_504_and_frees_the_slot(tight_server: ServerProcess) -> None:
    r = httpx.post(
        tight_server.base_url + "/v1/chat/completions", json=_body(tight_server, 50_000), timeout=60
    )
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "request_timeout"
    health = httpx.get(tight_server.base_url + "/health").json()
    assert health["running"] == 0 and health["waiting"] == 0
    ok = httpx.post(
        tight_server.base_url + "/v1/chat/completions", json=_body(tight_server, 2), timeout=60
    )
    assert ok.status_code == 200


def test_media_over_the_request_memory_budget_get_400_naming_the_part(
    tight_server: ServerProcess,
) -> None:
    """A 700x700 PNG needs about 5 MiB to decode, over --max-request-media-mb 1: a 400 that
    names the part and the flag, before any pixel is decoded; a small image still passes."""

    def ask(url: str) -> httpx.Response:
        content = [{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": url}}]
        body = {**_body(tight_server, 1), "messages": [{"role": "user", "content": content}]}
        return httpx.post(tight_server.base_url + "/v1/chat/completions", json=body, timeout=60)

    refused = ask(png_data_url(700, 700))
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["code"] == "invalid_image" and error["param"] == "messages[0].content[1].image_url"
    assert error["message"].startswith("image 1: decoding it needs about 5 MiB")
    assert "--max-request-media-mb" in error["message"]
    assert ask(png_data_url(64, 64)).status_code == 200
