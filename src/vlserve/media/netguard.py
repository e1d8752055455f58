"""SSRF guard: which hosts and addresses an image URL may reach, enforced where sockets connect."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import httpcore

from vlserve.aio import within
from vlserve.errors import MediaError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
AddressPolicy = Callable[[IPAddress], bool]
Resolver = Callable[[str, int], Awaitable[list[str]]]

# Special-purpose ranges (IANA registries) that an image URL must never reach. Python's
# ``is_global`` is checked as well, but its tables changed between patch releases, so the ranges
# that matter are spelled out here.
_BLOCKED_NETWORKS: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = tuple(
    ipaddress.ip_network(net)
    for net in (
        "0.0.0.0/8",  # "this network", unspecified
        "10.0.0.0/8",  # private
        "100.64.0.0/10",  # carrier-grade NAT
        "127.0.0.0/8",  # loopback
        "169.254.0.0/16",  # link-local, cloud metadata (169.254.169.254)
        "172.16.0.0/12",  # private
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",  # documentation
        "192.88.99.0/24",  # 6to4 relay anycast
        "192.168.0.0/16",  # private
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # documentation
        "203.0.113.0/24",  # documentation
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, broadcast
        "::/8",  # unspecified, loopback, IPv4-compatible, IPv4-mapped (unwrapped first)
        "64:ff9b:1::/48",  # local-use NAT64
        "100::/64",  # discard
        "2001::/23",  # IETF protocol assignments (Teredo, ORCHID, ...)
        "2001:db8::/32",  # documentation
        "3fff::/20",  # documentation
        "5f00::/16",  # segment routing
        "fc00::/7",  # unique local
        "fe80::/10",  # link-local
        "fec0::/10",  # site-local (deprecated)
        "ff00::/8",  # multicast
    )
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def is_public_address(address: IPAddress) -> bool:
    """True if ``address`` is a globally routable unicast address, IPv4 forms inside IPv6 included."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            return is_public_address(embedded)
    if any(address in net for net in _BLOCKED_NETWORKS if net.version == address.version):
        return False
    return address.is_global and not address.is_multicast


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 form routes to: IPv4-mapped, 6to4 or NAT64."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def host_allowed(host: str, allowed_domains: Sequence[str]) -> bool:
    """True if ``host`` (lower-case) is one of ``allowed_domains`` or a subdomain of one."""
    if not allowed_domains:
        return True
    host = host.rstrip(".")
    return any(host == domain or host.endswith("." + domain) for domain in allowed_domains)


async def system_resolver(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to, looked up in a worker thread (off the event loop)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class GuardedNetworkBackend(httpcore.AsyncNetworkBackend):
    """An httpcore backend that resolves each host itself, checks every address it resolves to,
    and connects to a checked address.

    Connecting to the very address that was checked is what defeats DNS rebinding: the name is
    never resolved a second time between the check and the connect. TLS still verifies the
    certificate against the host name, because httpcore passes the name, not the address, as
    SNI and for hostname checking.
    """

    def __init__(
        self,
        policy: AddressPolicy,
        resolver: Resolver = system_resolver,
        inner: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        self._policy = policy
        self._resolver = resolver
        self._inner = inner if inner is not None else httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        *others, last = await self._checked_addresses(host, port, timeout)
        for address in others:  # try each address in turn, as browsers do
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout, local_address, socket_options
                )
            except httpcore.ConnectError:
                continue
        return await self._inner.connect_tcp(last, port, timeout, local_address, socket_options)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise MediaError("image URLs may not use unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)

    async def _checked_addresses(self, host: str, port: int, timeout: float | None) -> list[str]:
        try:
            resolved = await within(self._resolver(host, port), timeout)
        except (OSError, UnicodeError, asyncio.TimeoutError):
            raise MediaError(f"could not resolve the image host '{host[:100]}'") from None
        if not resolved:
            raise MediaError(f"could not resolve the image host '{host[:100]}'")
        for text in resolved:
            # A scope id (fe80::1%eth0) only appears on link-local addresses, which are refused.
            address = ipaddress.ip_address(text.split("%", 1)[0])
            if not self._policy(address):
                raise MediaError(
                    f"image host '{host[:100]}' resolves to a private or reserved address"
                )
        return resolved
