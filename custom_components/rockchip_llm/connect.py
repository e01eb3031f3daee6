"""Where an entry's runtime host runs, and connecting to it."""

from collections.abc import Mapping
import dataclasses
from pathlib import Path
from typing import Any

from homeassistant.config_entries import ConfigEntry
from homeassistant.core import HomeAssistant
from homeassistant.exceptions import (
    ConfigEntryAuthFailed,
    ConfigEntryError,
    ConfigEntryNotReady,
    HomeAssistantError,
)
from homeassistant.helpers import instance_id

from .const import (
    CONF_ABI_FAMILY,
    CONF_CACHE_BUDGET,
    CONF_CACHE_DIR,
    CONF_HOST_ADDRESS,
    CONF_HOST_IDENTITY,
    CONF_LIBRARY_PATH,
    CONF_MODELS_DIR,
    CONF_PAIRING_KEY,
    CONF_STALL_TIMEOUT,
    DEFAULT_CACHE_BUDGET_MB,
    DEFAULT_STALL_TIMEOUT_S,
    DOMAIN,
)
from .host.address import parse_tcp_address
from .host.rkllm.abi import parse_family
from .host.server import HostConfig
from .host.wire import (
    HostError,
    HostIdentityChanged,
    HostPairingRefused,
    HostVersionMismatch,
)
from .link import HostAddress, LocalHost, TcpHost, UnixHost, async_connect, local_python
from .remote import RuntimeHost


def parse_address(text: str) -> UnixHost | TcpHost:
    """Read a host address: a Unix socket path, or host[:port] for TCP."""
    text = text.strip()
    if text.startswith("unix:"):
        text = text.removeprefix("unix:")
    if text.startswith("/"):
        return UnixHost(Path(text))
    return TcpHost(*parse_tcp_address(text))


def host_address(data: Mapping[str, Any]) -> HostAddress:
    """Where an entry's host runs: its address (with a TCP host's pairing), or here."""
    if address := data.get(CONF_HOST_ADDRESS):
        parsed = parse_address(str(address))
        if isinstance(parsed, TcpHost):
            return dataclasses.replace(
                parsed,
                pairing_key=str(data.get(CONF_PAIRING_KEY, "")),
                identity=data.get(CONF_HOST_IDENTITY),
            )
        return parsed
    return LocalHost(
        HostConfig(
            library=Path(data[CONF_LIBRARY_PATH]),
            models_dir=Path(data[CONF_MODELS_DIR]),
            cache_dir=Path(data[CONF_CACHE_DIR]),
            cache_budget_bytes=int(
                data.get(CONF_CACHE_BUDGET, DEFAULT_CACHE_BUDGET_MB) * 1_000_000
            ),
            abi_family=parse_family(data.get(CONF_ABI_FAMILY)),
            stall_timeout=float(data.get(CONF_STALL_TIMEOUT, DEFAULT_STALL_TIMEOUT_S)),
        ),
        python=local_python(),
    )


async def async_client_id(hass: HomeAssistant, name: str) -> str:
    """Name this Home Assistant (and entry or flow) to a host."""
    return f"{await instance_id.async_get(hass)}/{name}"


async def async_open_host(
    hass: HomeAssistant, data: Mapping[str, Any], name: str
) -> RuntimeHost:
    """Connect to the host data describes (HostError when it cannot be used)."""
    link, hello = await async_connect(
        host_address(data), await async_client_id(hass, name)
    )
    return RuntimeHost(link, hello)


async def async_connect_host(hass: HomeAssistant, entry: ConfigEntry) -> RuntimeHost:
    """Connect to an entry's host; not ready (retried) while it does not answer.

    A TCP host that refuses the pairing key, or shows another identity, asks the
    user to pair it again (the reauth flow).
    """
    try:
        return await async_open_host(hass, entry.data, entry.entry_id)
    except HostError as err:
        failure: type[HomeAssistantError]
        if isinstance(err, HostPairingRefused | HostIdentityChanged):
            failure = ConfigEntryAuthFailed
        elif isinstance(err, HostVersionMismatch):
            failure = ConfigEntryError
        else:
            failure = ConfigEntryNotReady
        raise failure(
            translation_domain=DOMAIN,
            translation_key=err.translation_key,
            translation_placeholders={"error": str(err), **err.placeholders},
        ) from err
