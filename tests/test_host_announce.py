"""A host on TCP announces itself with zeroconf where its Python has the package.

Hosts run on boards of a test LAN (network namespaces, tests/lan.py) on the
board's Python with zeroconf 0.47.3 (Debian 12's) or without it; Home Assistant's
zeroconf browses on the root side and reads each announcement as HA does.
"""

import asyncio
from functools import partial
import os
from pathlib import Path
import re
import subprocess

import pytest

from custom_components.rockchip_llm.host.announce import (
    SERVICE_TYPE,
    announced_addresses,
    properties,
)
from custom_components.rockchip_llm.host.identity import parse_pairing_key
from custom_components.rockchip_llm.host.version import (
    DEFAULT_PORT,
    HOST_VERSION,
    PROTOCOL_VERSION,
)

from .board_host import BoardHost, LanBrowser, async_start_board_host, start_board_host
from .conftest import model_text
from .host_process import (
    RawClient,
    pair,
    peer_identity,
    start_host,
    stop_host,
    tls_connect,
)
from .lan import Lan

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="network namespaces (ip netns) need root"
)

NO_ZEROCONF = "Discovery is off: this Python has no zeroconf package"
IDENTITY = re.compile(r"sha256:[0-9a-f]{64}")


def greet(host: BoardHost) -> dict[str, object]:
    """Connect to a board's host from Home Assistant's side (TLS, paired); say hello."""
    tls = tls_connect((host.board.address, host.port))
    assert peer_identity(tls) == host.identity
    pair(tls, parse_pairing_key(host.pairing_key))
    raw = RawClient(tls, beats=True)
    try:
        answer = raw.hello("announce-test")
    finally:
        raw.close()
    assert "ok" in answer, answer
    hello: dict[str, object] = answer["ok"]
    return hello


async def test_a_host_on_the_lan_is_found_as_home_assistant_sees_it(
    board_lan: Lan, tmp_path: Path
) -> None:
    """The TXT record names the host; its address and port are the board's."""
    board = board_lan.add_board()
    async with LanBrowser(board.root_address) as browser:
        host, info = await browser.async_start_host(
            board, tmp_path / "a", hostname="board-a", model_text=model_text()
        )
        assert str(info.ip_address) == board.address
        assert info.port == DEFAULT_PORT
        assert info.type == SERVICE_TYPE
        assert info.name == f"board-a.{SERVICE_TYPE}"
        assert info.properties["id"] == host.identity  # its certificate's
        assert IDENTITY.fullmatch(host.identity)
        assert info.properties == {
            "id": info.properties["id"],
            "version": HOST_VERSION,
            "protocol": str(PROTOCOL_VERSION),
            "name": "board-a",
        }
        await asyncio.to_thread(host.wait_log, f"Announced as 'board-a.{SERVICE_TYPE}'")
        assert (await asyncio.to_thread(greet, host))["hostname"] == "board-a"
        # Stopped, the host says goodbye: HA's zeroconf drops it at once.
        await asyncio.to_thread(host.stop)
        assert await browser.async_removed() == info.name


async def test_the_identity_stays_across_restarts(
    board_lan: Lan, tmp_path: Path
) -> None:
    """A restarted host is announced with the same id (Home Assistant's unique id)."""
    board = board_lan.add_board()
    async with LanBrowser(board.root_address) as browser:
        folder = tmp_path / "a"
        start = partial(
            start_board_host, board, folder, hostname="a", model_text=model_text()
        )
        host = await asyncio.to_thread(start)
        first = await browser.async_added()
        await asyncio.to_thread(host.stop)
        await browser.async_removed()
        restarted = await asyncio.to_thread(start)
        again = await browser.async_added()
    assert again.properties["id"] == first.properties["id"] == restarted.identity


async def test_a_host_whose_board_moved_is_announced_at_its_new_address(
    board_lan: Lan, tmp_path: Path
) -> None:
    """A new DHCP lease: the host is announced again, at its new address."""
    board = board_lan.add_board()
    async with LanBrowser(board.root_address) as browser:
        host, first = await browser.async_start_host(
            board, tmp_path / "a", hostname="board-a", model_text=model_text()
        )
        old_address = board.address
        assert str(first.ip_address) == old_address
        await asyncio.to_thread(board.move)
        moved = await browser.async_announced_at(board.address)
    assert board.address != old_address
    assert moved.name == first.name
    assert moved.properties["id"] == host.identity
    assert (await asyncio.to_thread(greet, host))["hostname"] == "board-a"
    await asyncio.to_thread(
        host.wait_log, f"This machine's addresses changed ({old_address} before)"
    )


async def test_a_host_started_before_the_network_is_announced_once_it_is_up(
    board_lan: Lan, tmp_path: Path
) -> None:
    """No address at the start (a service that came up first): announced later."""
    board = board_lan.add_board()
    board.set_address(present=False)
    async with LanBrowser(board.root_address) as browser:
        host = await async_start_board_host(
            board, tmp_path / "a", hostname="board-a", model_text=model_text()
        )
        await asyncio.to_thread(host.wait_log, "Discovery waits: this machine has no")
        board.set_address(present=True)
        info = await browser.async_added()
    assert str(info.ip_address) == board.address
    assert info.properties["id"] == host.identity
    assert (await asyncio.to_thread(greet, host))["hostname"] == "board-a"
    assert "Discovery is off" not in host.log_text()


def test_a_host_without_zeroconf_is_reached_at_its_address(
    board_lan: Lan, tmp_path: Path
) -> None:
    """Its Python has no zeroconf: logged once, and it serves whoever has the address."""
    board = board_lan.add_board()
    host = start_board_host(
        board, tmp_path / "a", hostname="b", model_text=model_text(), zeroconf=False
    )
    host.wait_log(NO_ZEROCONF)
    assert greet(host)["host_version"] == HOST_VERSION
    host.stop()
    log = host.log_text()
    assert log.count(NO_ZEROCONF) == 1
    assert "apt install python3-zeroconf" in log
    assert "Announced" not in log


def test_a_host_on_loopback_is_not_announced(tmp_path: Path) -> None:
    """127.0.0.1 is nobody else's: nothing to announce, and the log says so."""
    host = start_host(tmp_path, tcp=True)
    stop_host(host)  # the announcement is decided before the host serves
    assert "Discovery is off: the host listens on 127.0.0.1 only" in host.stderr()
    assert NO_ZEROCONF not in host.stderr()


def test_a_host_whose_announcement_fails_serves_all_the_same(
    board_lan: Lan, tmp_path: Path
) -> None:
    """The mDNS port is taken (another responder): a warning, and the host serves."""
    board = board_lan.add_board()
    holder = board.start(
        [
            "python3",
            "-c",
            (
                "import socket, time\n"
                "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                "s.bind(('0.0.0.0', 5353))\n"
                "print('held', flush=True)\n"
                "time.sleep(600)"
            ),
        ],
        stdout=subprocess.PIPE,
    )
    assert holder.stdout is not None
    assert holder.stdout.readline() == b"held\n"
    host = start_board_host(
        board, tmp_path / "a", hostname="c", model_text=model_text()
    )
    host.wait_log("Discovery is off: announcing the host failed")
    assert "Address already in use" in host.log_text()
    assert greet(host)["hostname"] == "c"


@pytest.mark.parametrize(
    ("listening", "machine", "announced"),
    [
        (
            [("0.0.0.0", 7823)],
            ["127.0.0.1", "192.0.2.5", "10.1.1.1"],
            ["192.0.2.5", "10.1.1.1"],
        ),
        ([("192.0.2.5", 7823)], ["127.0.0.1", "192.0.2.5", "10.1.1.1"], ["192.0.2.5"]),
        ([("127.0.0.1", 7823)], ["127.0.0.1", "192.0.2.5"], []),
        (
            [("::", 7823, 0, 0)],
            ["::1", "fe80::1", "2001:db8::5", "192.0.2.5"],
            ["2001:db8::5"],
        ),
        (
            [("0.0.0.0", 7823), ("::", 7823, 0, 0)],
            ["192.0.2.5", "2001:db8::5"],
            ["192.0.2.5", "2001:db8::5"],
        ),
    ],
    ids=["every-v4", "one-address", "loopback", "every-v6", "both"],
)
def test_announced_addresses(
    listening: list[tuple[object, ...]], machine: list[str], announced: list[str]
) -> None:
    """Those listened on, the machine's for a wildcard; never loopback or link-local."""
    assert announced_addresses(listening, machine) == announced


def test_the_txt_record() -> None:
    """Identity, host version, protocol and the board's name."""
    assert properties("sha256:ab", "board (rk3588)") == {
        "id": "sha256:ab",
        "version": HOST_VERSION,
        "protocol": str(PROTOCOL_VERSION),
        "name": "board (rk3588)",
    }
