"""Bad input → an OpenAI-shaped 4xx naming the problem, and the server keeps serving."""

from __future__ import annotations

import base64

import httpx
import openai
import pytest

from tests.conftest import ServerProcess, png_data_url, serve_routes

pytestmark = pytest.mark.integration


def _post(server: ServerProcess, body: object, **kwargs) -> httpx.Response:
    return httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=60, **kwargs)


def _ok_after(server: ServerProcess) -> None:
    r = _post(
        server,
        {"model": server.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )
    assert r.status_code == 200, r.text


def _msg(content: object) -> list[dict]:
    return [{"role": "user", "content": content}]


def _image(url: str) -> list[dict]:
    return _msg([{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": url}}])


CASES = [
    ("unknown model", {"model": "nope", "messages": _msg("hi")}, 404, "model"),
    ("no messages", {"model": "M", "messages": []}, 400, "messages"),
    (
        "bad role",
        {"model": "M", "messages": [{"role": "function", "content": "x"}]},
        400,
        "messages[0].role",
    ),
    ("unknown field", {"model": "M", "messages": _msg("hi"), "frobnicate": 1}, 400, "frobnicate"),
    ("n over --max-n", {"model": "M", "messages": _msg("hi"), "n": 17}, 400, "n"),
    (
        "top_logprobs without logprobs",
        {"model": "M", "messages": _msg("hi"), "top_logprobs": 2},
        400,
        "top_logprobs",
    ),
    (
        "tool without function",
        {"model": "M", "messages": _msg("hi"), "tools": [{"type": "function"}]},
        400,
        "tools[0].function",
    ),
    (
        "negative max_tokens",
        {"model": "M", "messages": _msg("hi"), "max_tokens": -1},
        400,
        "max_tokens",
    ),
    (
        "temperature too high",
        {"model": "M", "messages": _msg("hi"), "temperature": 5},
        400,
        "temperature",
    ),
    (
        "max_tokens beyond context",
        {"model": "M", "messages": _msg("hi"), "max_tokens": 10**7},
        400,
        "max_tokens",
    ),
    (
        "stop token out of vocab",
        {"model": "M", "messages": _msg("hi"), "stop_token_ids": [10**9]},
        400,
        "stop_token_ids",
    ),
    ("unknown part type", {"model": "M", "messages": _msg([{"type": "input_audio"}])}, 400, None),
    (
        "image in system",
        {
            "model": "M",
            "messages": [
                {
                    "role": "system",
                    "content": [{"type": "image_url", "image_url": {"url": "data:,"}}],
                },
                {"role": "user", "content": "hi"},
            ],
        },
        400,
        "messages[0].content[0]",
    ),
    (
        "garbage base64",
        {"model": "M", "messages": _image("data:image/png;base64,!!!notbase64")},
        400,
        None,
    ),
    (
        "not an image",
        {
            "model": "M",
            "messages": _image(
                "data:image/png;base64," + base64.b64encode(b"hello world, no png here").decode()
            ),
        },
        400,
        None,
    ),
    (
        "unsupported scheme",
        {"model": "M", "messages": _image("ftp://example.com/a.png")},
        400,
        None,
    ),
    (
        "local file outside allowed dir",
        {"model": "M", "messages": _image("file:///etc/passwd")},
        400,
        None,
    ),
]


@pytest.mark.parametrize(("name", "body", "status", "param"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_openai_shaped(
    server: ServerProcess, name: str, body: dict, status: int, param: str | None
) -> None:
    if body.get("model") == "M":
        body = {**body, "model": server.model}
    r = _post(server, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    assert err["message"] and "Traceback" not in err["message"]
    if param is not None:
        assert err["param"] == param, err
    _ok_after(server)


def test_malformed_json_body(server: ServerProcess) -> None:
    r = httpx.post(
        server.base_url + "/v1/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    _ok_after(server)


def test_unknown_route_is_openai_shaped(server: ServerProcess) -> None:
    r = httpx.get(server.base_url + "/v1/nothing-here")
    assert r.status_code == 404
    assert "error" in r.json()


def test_openai_client_raises_typed_errors(client: openai.OpenAI, server: ServerProcess) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=_msg("hi"))
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=server.model, messages=_image("data:image/png;base64,AAAA")
        )
    assert info.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    _ok_after(server)


def test_local_file_below_allowed_path(server: ServerProcess) -> None:
    path = server.media_dir / "red.png"
    path.write_bytes(base64.b64decode(png_data_url().split(",", 1)[1]))
    r = _post(
        server, {"model": server.model, "messages": _image(f"file://{path}"), "max_tokens": 2}
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] > 196


def test_image_over_http(server: ServerProcess) -> None:
    payload = base64.b64decode(png_data_url().split(",", 1)[1])
    with serve_routes({"/red.png": (200, payload)}, "image/png") as base:
        url = base + "/red.png"
        r = _post(server, {"model": server.model, "messages": _image(url), "max_tokens": 2})
        assert r.status_code == 200, r.text
        missing = _post(
            server, {"model": server.model, "messages": _image(url + "-gone"), "max_tokens": 2}
        )
        assert missing.status_code == 400
        assert "404" in missing.json()["error"]["message"]


@pytest.mark.parametrize("size", [(30000, 150), (150, 30000), (23000, 115)])
def test_thin_images_at_the_ratio_limit_are_served(
    client: openai.OpenAI, server: ServerProcess, size: tuple[int, int]
) -> None:
    """200:1 images above --max-image-pixels: downsizing must not push them past the
    processor's 200:1 limit (it gave a 500)."""
    out = client.chat.completions.create(
        model=server.model,
        messages=[
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": png_data_url(*size)}}],
            }
        ],
        max_tokens=1,
    )
    assert out.choices[0].finish_reason == "length"
