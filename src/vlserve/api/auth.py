"""API keys: `Authorization: Bearer KEY` on every /v1 route, compared in constant time."""

from __future__ import annotations

import hmac

PROTECTED_PREFIX = "/v1"


class ApiKeys:
    """The accepted keys; ``check`` compares against every key, so timing reveals nothing."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self._keys = tuple(k.encode() for k in keys)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def check(self, authorization: bytes | None) -> bool:
        return self.identify(authorization) is not None

    def identify(self, authorization: bytes | None) -> int | None:
        """Which key the header carries (its position), or None."""
        if authorization is None:
            return None
        scheme, _, token = authorization.partition(b" ")
        if scheme.lower() != b"bearer":
            return None
        token = token.strip()
        found = None
        for i, key in enumerate(self._keys):  # no early exit: every key is compared
            if hmac.compare_digest(token, key):
                found = i
        return found


_DOC_PATHS = frozenset({"/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"})


def is_protected(path: str, *, metrics: bool = False) -> bool:
    """Every /v1 route and the API docs need a key; /health stays open for probes, and
    /metrics for scrapers unless ``metrics`` (``--metrics-auth``)."""
    if path == PROTECTED_PREFIX or path.startswith(PROTECTED_PREFIX + "/"):
        return True
    return path in _DOC_PATHS or (metrics and path == "/metrics")
