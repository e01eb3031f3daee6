"""Announce a host listening on TCP on the LAN (zeroconf: mDNS and DNS-SD).

Home Assistant's zeroconf integration then offers the host under Discovered, with
its address. The ``zeroconf`` package is optional (Debian: python3-zeroconf):
without it the host serves all the same and is given to Home Assistant by its
address. The host runs with ``-S``, so the interpreter's site-packages are not on
the path; zeroconf is imported from there (only it, and what it imports).
"""

import asyncio
from collections.abc import Iterable
import contextlib
import ipaddress
import logging
import os
import site
import sys
from types import ModuleType
from typing import Any, Final, TypeAlias

from .version import HOST_VERSION, PROTOCOL_VERSION

_LOGGER = logging.getLogger(__name__)

SERVICE_TYPE: Final = "_rockchip-llm._tcp.local."
ZEROCONF_PATH_ENV: Final = "ROCKCHIP_LLM_ZEROCONF_PATH"
"""A folder with zeroconf for the host's Python, instead of its site-packages (tests)."""
_MAX_LABEL_BYTES: Final = 63
"""The longest DNS label: the service's instance name."""
ADDRESS_CHECK_S: Final = 10.0
"""How often a host on a wildcard address reads the machine's addresses again."""

Address: TypeAlias = tuple[Any, ...]
"""A listening socket's address, as getsockname() gives it."""


def import_zeroconf() -> ModuleType | None:
    """Return the zeroconf package (with its asyncio API), None where it is missing."""
    folders = (
        [path]
        if (path := os.environ.get(ZEROCONF_PATH_ENV))
        else site.getsitepackages()
    )
    added = [folder for folder in folders if folder not in sys.path]
    sys.path.extend(added)
    try:
        import zeroconf.asyncio  # noqa: PLC0415 - optional, looked for when announcing
    except ImportError:
        return None
    finally:
        for folder in added:
            sys.path.remove(folder)
    return zeroconf


def properties(identity: str, name: str) -> dict[str, str]:
    """Return the TXT record: the host's identity, versions and name."""
    return {
        "id": identity,
        "version": HOST_VERSION,
        "protocol": str(PROTOCOL_VERSION),
        "name": name,
    }


def _instance_name(name: str) -> str:
    """Return name as one DNS label (cut to 63 bytes, no dots)."""
    label = name.replace(".", "-").encode()[:_MAX_LABEL_BYTES]
    return label.decode(errors="ignore")


def announced_addresses(
    listening: Iterable[Address], all_addresses: Iterable[str]
) -> list[str]:
    """Return the addresses to announce: those listened on, the machine's for 0.0.0.0.

    Loopback and link-local addresses are left out: no other machine reaches them.
    """
    found: list[str] = []
    for sockname in listening:
        address = ipaddress.ip_address(str(sockname[0]))
        candidates = (
            map(ipaddress.ip_address, all_addresses)
            if address.is_unspecified
            else [address]
        )
        found += [
            str(candidate)
            for candidate in candidates
            if not candidate.is_loopback
            and not candidate.is_link_local
            and candidate.version == address.version
        ]
    return list(dict.fromkeys(found))


class Announcer:
    """The host's announcement, from start() until close().

    A host listening on a wildcard address follows the machine's addresses: it is
    announced again at the new ones after a new DHCP lease, and once the network
    is up when it started before (checked every ADDRESS_CHECK_S).
    """

    def __init__(self, identity: str, name: str) -> None:
        """Announce the host of this identity under this name."""
        self.identity = identity
        self.name = name
        self.addresses: list[str] = []
        """The addresses announced now (none: not announced)."""
        self._listening: list[Address] = []
        self._wanted: list[str] = []
        """The addresses last found: announced, or the announcement failed."""
        self._zeroconf_module: ModuleType | None = None
        self._zeroconf: Any = None
        self._following: asyncio.Task[None] | None = None

    async def async_start(self, listening: list[Address]) -> bool:
        """Announce the host at the addresses it listens on; False where it is not.

        It is not announced without the zeroconf package, when it listens on
        loopback only, or when the network refuses multicast; each is logged once.
        """
        zeroconf = import_zeroconf()
        if zeroconf is None:
            _LOGGER.info(
                "Discovery is off: this Python has no zeroconf package (Debian: "
                "apt install python3-zeroconf); give Home Assistant the address"
            )
            return False
        self._zeroconf_module, self._listening = zeroconf, listening
        addresses = self._wanted = await self._async_reachable_addresses()
        wildcard = any(
            ipaddress.ip_address(str(sockname[0])).is_unspecified
            for sockname in listening
        )
        if wildcard:
            self._following = asyncio.create_task(self._async_follow_addresses())
        if not addresses:
            if wildcard:
                _LOGGER.info(
                    "Discovery waits: this machine has no address another machine "
                    "reaches yet; the host is announced once it has one"
                )
            else:
                _LOGGER.info(
                    "Discovery is off: the host listens on %s only, which no other "
                    "machine reaches (--tcp 0.0.0.0 or the board's address to be "
                    "found)",
                    ", ".join(str(sockname[0]) for sockname in listening),
                )
            return False
        return await self._async_announce(addresses)

    async def async_close(self) -> None:
        """Withdraw the announcement (goodbye packets) and stop answering queries."""
        if self._following is not None:
            self._following.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._following
            self._following = None
        await self._async_withdraw()

    async def _async_reachable_addresses(self) -> list[str]:
        """Return the addresses listened on that others reach (read off the loop)."""
        zeroconf = self._zeroconf_module
        assert zeroconf is not None

        def machine_addresses() -> list[str]:
            return [
                *zeroconf.get_all_addresses(),
                *_v6(zeroconf.get_all_addresses_v6()),
            ]

        loop = asyncio.get_running_loop()
        machine = await loop.run_in_executor(None, machine_addresses)
        return announced_addresses(self._listening, machine)

    async def _async_follow_addresses(self) -> None:
        """Announce the host again whenever the machine's addresses change."""
        while True:
            await asyncio.sleep(ADDRESS_CHECK_S)
            try:
                addresses = await self._async_reachable_addresses()
            except OSError as err:
                _LOGGER.warning("Could not read this machine's addresses: %s", err)
                continue
            if addresses == self._wanted:
                continue  # (a failed announcement is not tried again for nothing)
            self._wanted = addresses
            if self.addresses:
                _LOGGER.info(
                    "This machine's addresses changed (%s before)",
                    ", ".join(self.addresses),
                )
            # A new AsyncZeroconf: the old one only sends on the addresses of its start.
            await self._async_withdraw()
            if addresses:
                await self._async_announce(addresses)
            else:
                _LOGGER.info(
                    "Discovery waits: this machine has no address another machine "
                    "reaches now; the host is announced again once it has one"
                )

    async def _async_announce(self, addresses: list[str]) -> bool:
        """Register the service at these addresses; False (logged) where it fails."""
        zeroconf = self._zeroconf_module
        assert zeroconf is not None
        info = zeroconf.ServiceInfo(
            SERVICE_TYPE,
            f"{_instance_name(self.name)}.{SERVICE_TYPE}",
            port=int(self._listening[0][1]),
            properties=properties(self.identity, self.name),
            server=f"rockchip-llm-{self.identity.rpartition(':')[2][:12]}.local.",
            parsed_addresses=addresses,
        )
        try:
            self._zeroconf = zeroconf.asyncio.AsyncZeroconf()
            await (
                await self._zeroconf.async_register_service(
                    info, allow_name_change=True
                )
            )
        except (OSError, zeroconf.Error) as err:
            _LOGGER.warning(
                "Discovery is off: announcing the host failed (%s); give Home "
                "Assistant the address",
                err,
            )
            await self._async_withdraw()
            return False
        self.addresses = addresses
        _LOGGER.info(
            "Announced as %r (%s) at %s", info.name, SERVICE_TYPE, ", ".join(addresses)
        )
        return True

    async def _async_withdraw(self) -> None:
        """Say goodbye at the announced addresses and close the responder."""
        self.addresses = []
        if self._zeroconf is not None:
            zeroconf, self._zeroconf = self._zeroconf, None
            await zeroconf.async_close()


def _v6(addresses: Iterable[tuple[tuple[str, int, int], int]]) -> list[str]:
    """Return the IPv6 addresses of zeroconf's list (address, flow, scope), index."""
    return [address[0] for address, _index in addresses]
