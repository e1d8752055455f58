"""MediaLoader: an image URL from a request → a safe RGB PIL image, without blocking the loop."""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from PIL import Image

from vlserve.errors import MediaError
from vlserve.lru import BytesLRU
from vlserve.media.config import MediaConfig
from vlserve.media.dataurl import parse_data_url
from vlserve.media.decode import decode_image
from vlserve.media.fetch import ImageFetcher
from vlserve.media.local import is_local_reference, read_local_file
from vlserve.media.netguard import AddressPolicy, Resolver, system_resolver

T = TypeVar("T")
# RFC 3986 scheme, kept short: it is echoed in the error message.
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]{0,15}):")


class MediaLoader:
    """Loads the images of requests: data URLs, http(s) URLs and allowed local files.

    One per server. Decoding runs in worker threads (at most ``max_concurrent_decodes`` at
    once), fetching on the event loop with httpx (at most ``max_concurrent_fetches`` at once).
    Every failure is a ``MediaError`` whose message can be shown to the client.
    """

    def __init__(
        self,
        config: MediaConfig,
        *,
        address_policy: AddressPolicy | None = None,
        resolver: Resolver = system_resolver,
    ) -> None:
        # address_policy/resolver exist for tests of the network guard; the server passes neither.
        self.config = config
        self._fetcher = ImageFetcher(config, policy=address_policy, resolver=resolver)
        self._decode_slots = asyncio.Semaphore(config.max_concurrent_decodes)
        # the same bytes always decode to the same image: repeated images skip decoding
        self._decoded: BytesLRU[Image.Image] = BytesLRU(
            config.decoded_cache_bytes, size=lambda im: im.width * im.height * len(im.getbands())
        )

    async def load(self, url: str) -> Image.Image:
        """One image as RGB, downsized to ``max_image_pixels``; raises ``MediaError``."""
        if not isinstance(url, str):
            raise MediaError("image URL must be a string")
        if not url:
            raise MediaError("image URL is empty")
        match = _SCHEME.match(url)
        scheme = match.group(1).lower() if match else ""
        if scheme == "data":
            return await self._in_worker(self._decode_data_url, url)
        if scheme in ("http", "https"):
            data = await self._fetcher.fetch(url)
            return await self._in_worker(self._decode, data)
        if is_local_reference(url):
            return await self._in_worker(self._decode_local_file, url)
        what = (
            f"image URL scheme '{scheme}' is not supported" if scheme else "not a valid image URL"
        )
        raise MediaError(f"{what} (use a data: URL, http(s): URL or allowed local file)")

    async def load_many(
        self, urls: Sequence[str], params: Sequence[str] | None = None
    ) -> list[Image.Image]:
        """The images of one request, loaded concurrently, in order.

        Errors name the image by its 1-based position ("image 2: ..."), and carry ``params[i]``
        (the request field of image i) as their ``param``; the first failing image (by
        position) is reported and the others are cancelled.
        """
        limit = self.config.max_images_per_request
        if len(urls) > limit:
            raise MediaError(f"too many images: {len(urls)}, at most {limit} allowed per request")
        if not urls:
            return []
        tasks = [asyncio.ensure_future(self.load(url)) for url in urls]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            # Reached on the first error and when our caller is cancelled (client gone).
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for position, task in enumerate(tasks, start=1):
            error = None if task.cancelled() else task.exception()
            if isinstance(error, MediaError):
                param = error.param or (params[position - 1] if params else None)
                raise MediaError(f"image {position}: {error.message}", param=param) from error
            if error is not None:
                raise error
        return [task.result() for task in tasks]

    async def aclose(self) -> None:
        """Close the HTTP client; the loader must not be used afterwards."""
        await self._fetcher.aclose()

    async def _in_worker(self, function: Callable[..., T], *args: object) -> T:
        await self._decode_slots.acquire()
        task = asyncio.ensure_future(asyncio.to_thread(function, *args))
        # A thread cannot be stopped: when our caller gives up (client gone), the decode runs on,
        # so its slot is released when the thread ends, not when the caller is cancelled.
        task.add_done_callback(self._release_decode_slot)
        return await asyncio.shield(task)

    def _release_decode_slot(self, task: asyncio.Future[Any]) -> None:
        self._decode_slots.release()
        if not task.cancelled():
            task.exception()  # mark an abandoned task's error as seen: no "never retrieved" log

    def _decode_data_url(self, url: str) -> Image.Image:
        # The same URL text always parses to the same bytes: a repeated data URL skips the
        # base64 check and decode too (about 2 ms for a 600 kB PNG, holding the GIL).
        key = b"url:" + hashlib.blake2b(url.encode(), digest_size=16).digest()
        image = self._decoded.get(key)
        if image is None:
            _, data = parse_data_url(url, max_bytes=self.config.max_image_bytes)
            image = decode_image(data, self.config)
            self._decoded.put(key, image)
        return image

    def _decode_local_file(self, url: str) -> Image.Image:
        data = read_local_file(
            url, self.config.allowed_local_media_path, self.config.max_image_bytes
        )
        return self._decode(data)

    def _decode(self, data: bytes) -> Image.Image:
        """``decode_image``, or the image those exact bytes decoded to before (never mutated by
        anyone: the processor copies)."""
        key = b"bytes:" + hashlib.blake2b(data, digest_size=16).digest()
        image = self._decoded.get(key)
        if image is None:
            image = decode_image(data, self.config)
            self._decoded.put(key, image)
        return image
