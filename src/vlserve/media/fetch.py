"""http(s) media fetching (images, videos): guarded connections, manual redirects, a deadline
and a byte cap."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from http.cookiejar import CookieJar, DefaultCookiePolicy
from urllib.parse import urljoin

import httpcore
import httpx

from vlserve import tracecontext
from vlserve.aio import within
from vlserve.errors import MediaError
from vlserve.media.config import MediaConfig
from vlserve.media.netguard import (
    AddressPolicy,
    GuardedNetworkBackend,
    Resolver,
    host_allowed,
    is_public_address,
    system_resolver,
)

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# What each kind asks for (the Accept header); the decoder checks what comes back anyway.
ACCEPT = {
    "image": "image/png,image/jpeg,image/webp,image/gif,image/bmp;q=0.9,*/*;q=0.1",
    "video": "video/mp4,video/webm,video/quicktime,video/x-matroska;q=0.9,*/*;q=0.1",
}
_HEADERS = {
    "User-Agent": "vlserve-media/1",
    "Accept": ACCEPT["image"],
    # Images are compressed already; a compressed body would be a zip-bomb vector.
    "Accept-Encoding": "identity",
}


def shown_url(url: str, limit: int = 100) -> str:
    """A URL as error messages show it: bounded in length, without control characters."""
    cleaned = "".join(c if c.isprintable() else "?" for c in url[: limit + 1])
    return cleaned if len(cleaned) <= limit else cleaned[:limit] + "..."


def _allow_every_address(address: object) -> bool:
    return True


class MediaFetcher:
    """Fetches media bytes over http(s) for ``MediaLoader``; one per server, shared by requests.

    ``policy`` and ``resolver`` default to the configuration's rule and the system resolver;
    tests pass their own to exercise the guard without public DNS.
    """

    def __init__(
        self,
        config: MediaConfig,
        *,
        policy: AddressPolicy | None = None,
        resolver: Resolver = system_resolver,
    ) -> None:
        self._config = config
        if policy is None:
            policy = _allow_every_address if config.allow_private_networks else is_public_address
        self._backend = GuardedNetworkBackend(policy, resolver)
        self._client: httpx.AsyncClient | None = None
        self._semaphore = asyncio.Semaphore(config.max_concurrent_fetches)

    async def fetch(self, url: str, *, max_bytes: int | None = None, what: str = "image") -> bytes:
        """The body of ``url`` (at most ``max_bytes``, by default ``max_image_bytes``); raises
        only ``MediaError``. ``what`` ("image", "video") words the messages and the Accept
        header; everything else (guard, redirects, deadline) is the same for every kind."""
        timeout_s = self._config.fetch_timeout_s
        cap = self._config.max_image_bytes if max_bytes is None else max_bytes
        async with self._semaphore:
            try:
                return await within(self._follow(url, cap, what), timeout_s)
            except MediaError:
                raise
            except asyncio.TimeoutError:
                raise MediaError(
                    f"could not fetch {shown_url(url)}: timed out after {timeout_s:g} s"
                ) from None
            except Exception as exc:
                raise MediaError(f"could not fetch {shown_url(url)}: {_describe(exc)}") from exc

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _get_client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                transport=_GuardedTransport(self._backend, self._config.max_concurrent_fetches),
                follow_redirects=False,  # each hop is checked by _follow
                # trust_env=False: an environment proxy would be mounted around our transport.
                trust_env=False,
                timeout=httpx.Timeout(self._config.fetch_timeout_s),
                headers=_HEADERS,
                # The client is shared by every request: never carry one user's cookies to another.
                cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
            )
        return self._client

    async def _follow(self, url: str, cap: int, what: str) -> bytes:
        client = self._get_client()
        current = url
        headers = {"Accept": ACCEPT.get(what, ACCEPT["image"])}
        span = tracecontext.current.get()
        if span is not None:  # the request's trace goes on to the media host (W3C Trace Context)
            headers["traceparent"] = span.header()
        for _ in range(self._config.max_redirects + 1):
            checked = self._checked_url(current, url, what)
            request = client.build_request("GET", checked, headers=headers)
            response = await client.send(request, stream=True)
            try:
                if response.status_code in _REDIRECTS:
                    location = response.headers.get("location")
                    if not location:
                        raise MediaError(
                            f"could not fetch {shown_url(url)}: redirect without Location"
                        )
                    current = urljoin(str(response.url), location)
                    continue
                if not 200 <= response.status_code < 300:
                    raise MediaError(
                        f"could not fetch {shown_url(url)}: HTTP {response.status_code}"
                    )
                return await self._read_body(response, url, cap, what)
            finally:
                await response.aclose()
        raise MediaError(
            f"could not fetch {shown_url(url)}: more than {self._config.max_redirects} redirects"
        )

    def _checked_url(self, current: str, original: str, what: str) -> httpx.URL:
        """``current`` parsed by the same parser that will connect, then scheme and host checked."""
        hop = "" if current == original else " (redirected)"
        try:
            parsed = httpx.URL(current)
        except (httpx.InvalidURL, ValueError, TypeError):
            raise MediaError(f"not a valid {what} URL{hop}: {shown_url(current)}") from None
        if parsed.scheme not in ("http", "https"):
            raise MediaError(
                f"could not fetch {shown_url(original)}: redirected to a non-http(s) URL"
            )
        host = parsed.raw_host.decode("ascii", "replace").lower()
        if not host:
            raise MediaError(f"not a valid {what} URL{hop}: it has no host")
        if not host_allowed(host, self._config.allowed_media_domains):
            raise MediaError(
                f"{what} host '{shown_url(host)}'{hop} is not in the allowed media domains"
            )
        return parsed

    async def _read_body(self, response: httpx.Response, url: str, cap: int, what: str) -> bytes:
        too_large = MediaError(
            f"could not fetch {shown_url(url)}: {what} is larger than {cap} bytes"
        )
        declared = response.headers.get("content-length", "")
        # Content-Length may only shorten the wait: the cap is enforced on the bytes read.
        if declared.isdigit() and int(declared) > cap:
            raise too_large
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise MediaError(f"could not fetch {shown_url(url)}: compressed body ({encoding[:20]})")
        chunks: list[bytes] = []
        total = 0
        async for chunk in response.aiter_raw():
            total += len(chunk)
            if total > cap:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)


def _describe(exc: Exception) -> str:
    """A short, library-free description of a transport failure."""
    if isinstance(exc, httpx.InvalidURL):
        # httpx parses a redirect's Location even when it does not follow it.
        return "redirected to an invalid URL"
    if isinstance(exc, (httpx.TimeoutException, httpcore.TimeoutException)):
        return "timed out"
    if _caused_by(exc, ssl.SSLCertVerificationError):
        return "the server's TLS certificate is not valid for this host"
    if _caused_by(exc, ssl.SSLError):
        return "TLS handshake failed"
    if isinstance(exc, (httpx.ConnectError, httpcore.ConnectError)):
        return "connection failed"
    if isinstance(exc, (httpx.RemoteProtocolError, httpcore.RemoteProtocolError)):
        return "invalid HTTP response"
    if isinstance(exc, (httpx.NetworkError, httpcore.NetworkError)):
        return "connection lost"
    return "request failed"


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    seen: BaseException | None = exc
    for _ in range(8):  # httpx wraps httpcore wraps ssl: a short chain
        if seen is None:
            return False
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


ImageFetcher = MediaFetcher  # its name when it fetched only images


class _GuardedTransport(httpx.AsyncBaseTransport):
    """httpx's transport contract over an httpcore pool that uses the guarded network backend.

    httpx's own AsyncHTTPTransport cannot take a network backend, so this is its request and
    response mapping over a pool built with one (public httpx and httpcore APIs only).
    """

    def __init__(self, backend: httpcore.AsyncNetworkBackend, max_connections: int) -> None:
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=5.0,
            network_backend=backend,
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        core_response = await self._pool.handle_async_request(core_request)
        return httpx.Response(
            status_code=core_response.status,
            headers=core_response.headers,
            stream=_ResponseStream(core_response.stream),
            extensions=core_response.extensions,
        )

    async def aclose(self) -> None:
        await self._pool.aclose()


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, stream: object) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for part in self._stream:  # type: ignore[attr-defined]
            yield part

    async def aclose(self) -> None:
        close = getattr(self._stream, "aclose", None)
        if close is not None:
            await close()
