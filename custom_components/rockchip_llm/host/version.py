"""Versions a host and an integration compare when they connect."""

from typing import Final

HOST_VERSION: Final = "0.1.0"
"""The integration release this host ships with (manifest.json's version)."""
PROTOCOL_VERSION: Final = 1
"""The link protocol; a host and a client of different versions refuse each other."""
DEFAULT_PORT: Final = 7823
"""The TCP port a host listens on unless told otherwise."""
