"""Versions a host and an integration compare when they connect."""

import re
from typing import Final

HOST_VERSION: Final = "0.1.0"
"""The integration release this host ships with (manifest.json's version)."""
PROTOCOL_VERSION: Final = 1
"""The link protocol; a host and a client of different versions refuse each other."""
DEFAULT_PORT: Final = 7823
"""The TCP port a host listens on unless told otherwise."""

UPDATE_HOST: Final = (
    "update the runtime host (copy this integration's host folder to the board "
    "again, or update its container) and restart it"
)
UPDATE_INTEGRATION: Final = (
    "update the Rockchip LLM integration in Home Assistant (HACS) and restart "
    "Home Assistant"
)


def _release(version: str) -> tuple[int, ...]:
    """Return the numbers of a release, to compare as numbers ("0.10.0" after "0.9.0")."""
    return tuple(int(part) for part in re.findall(r"\d+", version))


def update_advice(host_version: str, integration_version: str) -> str:
    """Say which side to update: the older one (the host when they look equal)."""
    if _release(integration_version) >= _release(host_version):
        return UPDATE_HOST
    return UPDATE_INTEGRATION
