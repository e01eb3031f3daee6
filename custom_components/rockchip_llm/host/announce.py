"""Announce a host listening on TCP on the LAN (zeroconf: mDNS and DNS-SD).

Home Assistant's zeroconf integration then offers the host under Discovered, with
its address. The ``zeroconf`` package is optional (Debian: python3-zeroconf):
without it the host serves all the same and is given to Home Assistant by its
address. The host runs with ``-S``, so the interpreter's site-packages are not on
the path; zeroconf is imported from there (only it, and what it imports).
"""

from collections.abc import Iterable
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
    """The host's announcement, from start() until close()."""

    def __init__(self, identity: str, name: str) -> None:
        """Announce the host of this identity under this name."""
        self.identity = identity
        self.name = name
        self._zeroconf: Any = None

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
        addresses = announced_addresses(
            listening,
            [*zeroconf.get_all_addresses(), *_v6(zeroconf.get_all_addresses_v6())],
        )
        if not addresses:
            _LOGGER.info(
                "Discovery is off: the host listens on %s only, which no other "
                "machine reaches (--tcp 0.0.0.0 or the board's address to be found)",
                ", ".join(str(sockname[0]) for sockname in listening),
            )
            return False
        info = zeroconf.ServiceInfo(
            SERVICE_TYPE,
            f"{_instance_name(self.name)}.{SERVICE_TYPE}",
            port=int(listening[0][1]),
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
            await self.async_close()
            return False
        _LOGGER.info(
            "Announced as %r (%s) at %s", info.name, SERVICE_TYPE, ", ".join(addresses)
        )
        return True

    async def async_close(self) -> None:
        """Withdraw the announcement (goodbye packets) and stop answering queries."""
        if self._zeroconf is not None:
            zeroconf, self._zeroconf = self._zeroconf, None
            await zeroconf.async_close()


def _v6(addresses: Iterable[tuple[tuple[str, int, int], int]]) -> list[str]:
    """Return the IPv6 addresses of zeroconf's list (address, flow, scope), index."""
    return [address[0] for address, _index in addresses]
