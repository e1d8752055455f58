"""vlserve.media SSRF address rule and host allow-list (pure functions, no sockets)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vlserve.media import is_public_address
from vlserve.media.netguard import host_allowed


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.255.255.254",
        "10.1.2.3",
        "172.16.0.1",
        "172.31.255.255",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "100.127.255.255",
        "0.0.0.0",
        "224.0.0.1",
        "239.255.255.250",
        "240.0.0.1",
        "255.255.255.255",
        "192.0.2.1",
        "198.18.0.1",
        "::",
        "::1",
        "fe80::1",
        "fc00::1",
        "fd12:3456::1",
        "ff02::1",
        "fec0::1",
        "2001:db8::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "::ffff:169.254.169.254",
        "::127.0.0.1",
        "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
        "2002:7f00:1::",  # 6to4 of 127.0.0.1
        "2001::1",  # Teredo
    ],
)
def test_non_public_addresses_are_refused(address: str) -> None:
    assert not is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "1.1.1.1",
        "93.184.216.34",
        "100.128.0.1",
        "2606:4700:4700::1111",
        "::ffff:8.8.8.8",
    ],
)
def test_public_addresses_are_allowed(address: str) -> None:
    assert is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("example.com", True),
        ("img.example.com", True),
        ("example.com.", True),
        ("badexample.com", False),
        ("example.com.evil.net", False),
        ("com", False),
    ],
)
def test_host_allow_list(host: str, allowed: bool) -> None:
    assert host_allowed(host, ("example.com",)) is allowed
    assert host_allowed(host, ()) is True


@given(st.integers(0, 2**32 - 1))
def test_ipv4_inside_ipv6_gets_the_verdict_of_the_ipv4_address(value: int) -> None:
    v4 = ipaddress.IPv4Address(value)
    verdict = is_public_address(v4)
    mapped = ipaddress.IPv6Address((0xFFFF << 32) | value)
    nat64 = ipaddress.IPv6Address((0x64FF9B << 96) | value)
    sixtofour = ipaddress.IPv6Address((0x2002 << 112) | (value << 80) | 1)
    assert is_public_address(mapped) is verdict
    assert is_public_address(nat64) is verdict
    assert is_public_address(sixtofour) is verdict
    if verdict:
        assert v4.is_global and not v4.is_multicast


@given(st.integers(0, 2**128 - 1))
def test_public_ipv6_is_always_global_unicast(value: int) -> None:
    address = ipaddress.IPv6Address(value)
    if is_public_address(address) and address.ipv4_mapped is None:
        assert not address.is_multicast and not address.is_link_local and not address.is_private
