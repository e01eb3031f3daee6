"""Addresses of a runtime host as people type them."""

from pathlib import Path

import pytest

from custom_components.rockchip_llm.connect import parse_address
from custom_components.rockchip_llm.host.address import parse_tcp_address
from custom_components.rockchip_llm.link import TcpHost, UnixHost


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1", ("127.0.0.1", 7823)),
        (" 192.168.1.20:9000 ", ("192.168.1.20", 9000)),
        ("nas.local:7000", ("nas.local", 7000)),
        ("[::1]:80", ("::1", 80)),
        ("[fe80::1]", ("fe80::1", 7823)),
        ("::1", ("::1", 7823)),
        ("::", ("::", 7823)),
    ],
)
def test_tcp_addresses(text: str, expected: tuple[str, int]) -> None:
    """A port is optional; IPv6 with a port needs brackets, without one it does not."""
    assert parse_tcp_address(text) == expected


@pytest.mark.parametrize("text", ["", ":80", "host:70000", "[::1]x", "h:x"])
def test_not_addresses(text: str) -> None:
    """An empty host, a port out of range or garbage is refused."""
    with pytest.raises(ValueError):
        parse_tcp_address(text)


def test_socket_paths_and_tcp() -> None:
    """A path (optionally unix:) is a socket; anything else TCP."""
    assert parse_address("/config/rkllm/host.sock") == UnixHost(
        Path("/config/rkllm/host.sock")
    )
    assert parse_address("unix:/run/rockchip-llm/host.sock") == UnixHost(
        Path("/run/rockchip-llm/host.sock")
    )
    assert parse_address("127.0.0.1:7823") == TcpHost("127.0.0.1", 7823)
