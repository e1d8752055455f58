"""vlserve.media http(s) fetching and its SSRF guard, against real listeners on loopback."""

from __future__ import annotations

import asyncio
import io
import ipaddress
import shutil
import ssl
import subprocess
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from vlserve.errors import MediaError
from vlserve.media import MediaConfig, MediaLoader

Handler = Callable[[asyncio.StreamWriter], Awaitable[None]]


def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coroutine)


def png(size: tuple[int, int] = (8, 6)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (0, 0, 255)).save(buffer, "PNG")
    return buffer.getvalue()


class Listener:
    """A raw HTTP/1.1 listener: routes by path, counts every TCP connection it accepts."""

    def __init__(
        self,
        routes: dict[str, Handler],
        host: str = "127.0.0.1",
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.routes = routes
        self.host = host
        self.tls = tls
        self.connections = 0
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Listener:
        self._server = await asyncio.start_server(self._serve, self.host, 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def url(self, path: str, host: str | None = None) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{host or self.host}:{self.port}{path}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            path = head[0].split(" ")[1]
            headers = dict(line.split(": ", 1) for line in head[1:] if ": " in line)
            self.requests.append((path, {k.lower(): v for k, v in headers.items()}))
            await self.routes.get(path, reply(404, b"nope"))(writer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()


def reply(status: int, body: bytes, headers: str = "") -> Handler:
    async def handler(writer: asyncio.StreamWriter) -> None:
        writer.write(
            f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n{headers}"
            "Connection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()

    return handler


def redirect(location: str, status: int = 302) -> Handler:
    return reply(status, b"", f"Location: {location}\r\n")


def stream_forever(headers: str = "") -> Handler:
    async def handler(writer: asyncio.StreamWriter) -> None:
        writer.write(f"HTTP/1.1 200 OK\r\n{headers}Connection: close\r\n\r\n".encode())
        while True:  # until the client hangs up
            writer.write(b"\0" * 65536)
            await writer.drain()

    return handler


def stall(after_headers: bool) -> Handler:
    async def handler(writer: asyncio.StreamWriter) -> None:
        if after_headers:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
            await writer.drain()
        await asyncio.sleep(60)

    return handler


def drip() -> Handler:
    """One byte every 50 ms: no single read times out, only a deadline on the whole fetch."""

    async def handler(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
        while True:
            writer.write(b"\0")
            await writer.drain()
            await asyncio.sleep(0.05)

    return handler


TRUSTED = MediaConfig(allow_private_networks=True, fetch_timeout_s=5.0)


async def load(config: MediaConfig, url: str, **loader_args: Any) -> Image.Image:
    loader = MediaLoader(config, **loader_args)
    try:
        return await loader.load(url)
    finally:
        await loader.aclose()


async def refused(config: MediaConfig, url: str, **loader_args: Any) -> str:
    with pytest.raises(MediaError) as info:
        await load(config, url, **loader_args)
    return info.value.message


# --- the guard refuses before any connection ----------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "localhost",
        "[::ffff:127.0.0.1]",
        "[::ffff:7f00:1]",
        "2130706433",  # decimal, as inet_aton reads it
        "0x7f.1",
        "127.1",
        "[::1]",
        "0.0.0.0",  # reaches local listeners on Linux
    ],
)
def test_loopback_is_refused_and_never_connected(host: str) -> None:
    async def scenario() -> None:
        async with Listener({"/a.png": reply(200, png())}) as listener:
            message = await refused(MediaConfig(), listener.url("/a.png", host))
            assert message.endswith("resolves to a private or reserved address")
            assert listener.connections == 0

    run(scenario())


def test_trusted_config_fetches_from_loopback() -> None:
    async def scenario() -> None:
        async with Listener({"/a.png": reply(200, png((8, 6)))}) as listener:
            image = await load(TRUSTED, listener.url("/a.png"))
            assert image.size == (8, 6) and image.getpixel((1, 1)) == (0, 0, 255)
            headers = listener.requests[0][1]
            assert headers["accept-encoding"] == "identity"

    run(scenario())


def test_connection_goes_to_the_checked_address_not_a_second_lookup() -> None:
    """A name only our resolver knows: if httpx resolved it again, the connect would fail."""

    async def resolver(host: str, port: int) -> list[str]:
        return ["127.0.0.1"] if host == "images.rebind.test" else []

    async def scenario() -> None:
        async with Listener({"/a.png": reply(200, png())}) as listener:
            url = listener.url("/a.png", "images.rebind.test")
            image = await load(TRUSTED, url, resolver=resolver)
            assert image.size == (8, 6)
            assert listener.requests[0][1]["host"] == f"images.rebind.test:{listener.port}"

    run(scenario())


def test_a_name_resolving_to_any_private_address_is_refused() -> None:
    async def resolver(host: str, port: int) -> list[str]:
        return ["93.184.216.34", "127.0.0.1"]

    async def scenario() -> None:
        async with Listener({}) as listener:
            message = await refused(
                MediaConfig(), listener.url("/a.png", "mixed.test"), resolver=resolver
            )
            assert message == "image host 'mixed.test' resolves to a private or reserved address"
            assert listener.connections == 0

    run(scenario())


def test_redirect_to_a_refused_address_is_stopped_at_the_hop() -> None:
    """First hop allowed (127.0.0.1), second hop (127.0.0.2) refused: it must never connect."""

    async def scenario() -> None:
        async with Listener({"/a.png": reply(200, png())}, host="127.0.0.2") as inner:
            routes = {"/start": redirect(inner.url("/a.png"))}
            async with Listener(routes) as outer:
                only_first = ipaddress.ip_address("127.0.0.1").__eq__
                message = await refused(
                    MediaConfig(), outer.url("/start"), address_policy=only_first
                )
                assert "'127.0.0.2' resolves to a private or reserved address" in message
                assert outer.connections == 1 and inner.connections == 0

    run(scenario())


def test_redirect_outside_the_allowed_domains_is_refused() -> None:
    async def scenario() -> None:
        config = MediaConfig(allow_private_networks=True, allowed_media_domains=("localhost",))
        async with Listener({"/a.png": reply(200, png())}) as target:
            routes = {"/start": redirect(target.url("/a.png"))}
            async with Listener(routes) as start:
                message = await refused(config, start.url("/start", "localhost"))
            assert "'127.0.0.1' (redirected) is not in the allowed media domains" in message
            assert target.connections == 0
            assert (await load(config, target.url("/a.png", "localhost"))).size == (8, 6)

    run(scenario())


def test_domain_allow_list_admits_subdomains_only() -> None:
    config = MediaConfig(allowed_media_domains=("Example.COM",))
    assert config.allowed_media_domains == ("example.com",)
    for url in ("http://evil-example.com/a.png", "http://example.com.evil.net/a.png"):
        assert "not in the allowed media domains" in run(refused(config, url))


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("file:///etc/passwd", "redirected to a non-http(s) URL"),
        ("ftp://example.com/a.png", "redirected to a non-http(s) URL"),
        ("gopher://127.0.0.1:70/", "redirected to a non-http(s) URL"),
        ("data:image/png;base64,AAAA", "redirected to an invalid URL"),
        ("http://[::1", "invalid HTTP response"),  # httpx: bad Location header
    ],
)
def test_redirect_to_another_scheme_is_refused(location: str, expected: str) -> None:
    async def scenario() -> None:
        async with Listener({"/start": redirect(location)}) as listener:
            message = await refused(TRUSTED, listener.url("/start"))
            assert message == f"could not fetch {listener.url('/start')}: {expected}"
            assert listener.connections == 1

    run(scenario())


def test_redirects_are_followed_up_to_the_limit() -> None:
    async def scenario() -> None:
        routes = {
            "/1": redirect("/2", 301),
            "/2": redirect("/3", 307),
            "/3": redirect("/a.png", 308),
            "/a.png": reply(200, png()),
            "/loop": redirect("/loop"),
        }
        async with Listener(routes) as listener:
            assert (await load(TRUSTED, listener.url("/1"))).size == (8, 6)
            message = await refused(TRUSTED, listener.url("/loop"))
            assert message.endswith(": more than 3 redirects")
            strict = MediaConfig(allow_private_networks=True, max_redirects=2)
            assert "more than 2 redirects" in await refused(strict, listener.url("/1"))

    run(scenario())


def test_cookies_are_never_stored_or_sent() -> None:
    async def scenario() -> None:
        routes = {"/a.png": reply(200, png(), "Set-Cookie: session=secret; Path=/\r\n")}
        async with Listener(routes) as listener:
            loader = MediaLoader(TRUSTED)
            try:
                await loader.load(listener.url("/a.png"))
                await loader.load(listener.url("/a.png"))
            finally:
                await loader.aclose()
            assert [headers.get("cookie") for _, headers in listener.requests] == [None, None]

    run(scenario())


def test_http_errors_are_reported_with_their_status() -> None:
    async def scenario() -> None:
        async with Listener({"/gone": reply(410, b"gone")}) as listener:
            message = await refused(TRUSTED, listener.url("/missing"))
            assert message == f"could not fetch {listener.url('/missing')}: HTTP 404"
            assert (await refused(TRUSTED, listener.url("/gone"))).endswith("HTTP 410")

    run(scenario())


def test_body_over_the_cap_is_refused_while_streaming() -> None:
    """No Content-Length, an endless body: only counting the bytes read can stop it."""

    async def scenario() -> None:
        routes = {
            "/endless": stream_forever(),
            "/chunked": stream_forever("Content-Type: image/png\r\n"),
        }
        config = MediaConfig(allow_private_networks=True, max_image_bytes=200_000)
        async with Listener(routes) as listener:
            for path in routes:
                message = await refused(config, listener.url(path))
                assert message.endswith("image is larger than 200000 bytes"), message

    run(scenario())


def test_declared_oversize_is_refused_without_reading_the_body() -> None:
    async def scenario() -> None:
        async def promise_big(writer: asyncio.StreamWriter) -> None:
            # Headers promise 10 MB, then nothing: only the header can end this before the deadline.
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(60)

        config = MediaConfig(allow_private_networks=True, max_image_bytes=1000, fetch_timeout_s=30)
        async with Listener({"/big": promise_big}) as listener:
            assert (await refused(config, listener.url("/big"))).endswith("larger than 1000 bytes")

    run(scenario())


def test_a_low_content_length_only_shortens_the_body() -> None:
    """Content-Length says 20 but more follows: only 20 bytes are read, and they are no image."""

    async def scenario() -> None:
        async def lying(writer: asyncio.StreamWriter) -> None:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n" + png() * 100)
            await writer.drain()

        async with Listener({"/lie": lying}) as listener:
            message = await refused(TRUSTED, listener.url("/lie"))
            assert "truncated or corrupt" in message or "not a recognised image" in message

    run(scenario())


def test_compressed_bodies_are_refused() -> None:
    async def scenario() -> None:
        routes = {"/gz": reply(200, b"\x1f\x8b" + b"\0" * 20, "Content-Encoding: gzip\r\n")}
        async with Listener(routes) as listener:
            assert "compressed body (gzip)" in await refused(TRUSTED, listener.url("/gz"))

    run(scenario())


@pytest.mark.parametrize("handler", [stall(False), stall(True), drip()])
def test_stalled_servers_hit_the_deadline(handler: Handler) -> None:
    async def scenario() -> None:
        config = MediaConfig(allow_private_networks=True, fetch_timeout_s=0.5)
        async with Listener({"/slow": handler}) as listener:
            message = await refused(config, listener.url("/slow"))
            assert message == f"could not fetch {listener.url('/slow')}: timed out after 0.5 s"

    run(scenario())


def test_connection_refused_is_a_clear_error() -> None:
    async def scenario() -> None:
        async with Listener({}) as listener:
            url = listener.url("/a.png")
        assert await refused(TRUSTED, url) == f"could not fetch {url}: connection failed"

    run(scenario())


def test_fetches_are_bounded_and_run_concurrently() -> None:
    """Four slow fetches with two slots: at most two are ever in flight, all four succeed."""

    async def scenario() -> None:
        in_flight = peak = 0

        async def slow(writer: asyncio.StreamWriter) -> None:
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            await asyncio.sleep(0.1)
            in_flight -= 1
            await reply(200, png())(writer)

        config = MediaConfig(allow_private_networks=True, max_concurrent_fetches=2)
        async with Listener({"/a.png": slow}) as listener:
            loader = MediaLoader(config)
            try:
                images = await loader.load_many([listener.url("/a.png")] * 4)
            finally:
                await loader.aclose()
        assert len(images) == 4 and peak == 2

    run(scenario())


# --- https: the socket goes to the checked address, the certificate is checked against the name --


def make_certificates(directory: Path, name: str) -> tuple[Path, ssl.SSLContext]:
    """A throwaway CA (returned as a PEM path) and a server context for ``name`` signed by it."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
            "-subj", "/CN=vlserve test CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign")  # fmt: skip
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", f"/CN={name}")
    (directory / "ext.cnf").write_text(
        f"subjectAltName=DNS:{name}\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"
        "authorityKeyIdentifier=keyid,issuer\nsubjectKeyIdentifier=hash\n"
    )
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.pem", "-days", "1", "-extfile", "ext.cnf")  # fmt: skip
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(directory / "server.pem", directory / "server.key")
    return directory / "ca.pem", server


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_https_verifies_the_host_name_while_connecting_to_the_checked_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca, server_tls = make_certificates(tmp_path, "images.test")
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # honoured by httpx.create_ssl_context

    async def resolver(host: str, port: int) -> list[str]:
        return ["127.0.0.1"] if host.endswith(".test") else []

    async def scenario() -> None:
        async with Listener({"/a.png": reply(200, png())}, tls=server_tls) as listener:
            image = await load(TRUSTED, listener.url("/a.png", "images.test"), resolver=resolver)
            assert image.size == (8, 6)
            # Same address, same certificate, another name: verification must fail.
            message = await refused(
                TRUSTED, listener.url("/a.png", "other.test"), resolver=resolver
            )
            assert message.endswith("the server's TLS certificate is not valid for this host")

    run(scenario())
