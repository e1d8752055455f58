"""API keys: `Authorization: Bearer KEY` on every /v1 route, compared in constant time."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from vlserve.api.errors import send_error

PROTECTED_PREFIX = "/v1"


class ApiKeys:
    """The accepted keys; ``check`` compares against every key, so timing reveals nothing."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self._keys = tuple(k.encode() for k in keys)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: bytes | None) -> bool:
        if authorization is None:
            return False
        scheme, _, token = authorization.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        token = token.strip()
        matched = False
        for key in self._keys:  # no early exit: every key is compared
            matched |= hmac.compare_digest(token, key)
        return matched


def parse_keys(values: list[str] | tuple[str, ...], env_value: str | None) -> tuple[str, ...]:
    """Keys from repeated ``--api-key`` flags plus a comma-separated env value, deduplicated."""
    keys = [*values, *(env_value or "").split(",")]
    return tuple(dict.fromkeys(k.strip() for k in keys if k.strip()))


class AuthMiddleware:
    """Refuses /v1 requests without a valid key (401, OpenAI shape); other paths stay open."""

    def __init__(self, app: ASGIApp, keys: ApiKeys) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not _protected(path):
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization")
        if self.keys.check(header):
            await self.app(scope, receive, send)
            return
        message = (
            "missing API key: send 'Authorization: Bearer <key>'"
            if header is None
            else "invalid API key"
        )
        await send_error(send, 401, message, "invalid_api_key", ((b"www-authenticate", b"Bearer"),))


def _protected(path: str) -> bool:
    return path == PROTECTED_PREFIX or path.startswith(PROTECTED_PREFIX + "/")
