"""The host on TCP: TLS, then the pairing check, then the link, with a heartbeat.

A connection is served only after a TLS 1.3 handshake with the host's certificate
and a client proof of the pairing key (``pairing.py``). Anything else (plain text,
no key, a wrong key, a replayed handshake, no answer in time) is closed without a
word and logged with the peer's address; a peer that failed FAILURE_LIMIT times
within FAILURE_WINDOW seconds is refused until its oldest failure is that old, so
the key cannot be guessed over the network.
"""

import asyncio
from collections import deque
from collections.abc import Callable
import contextlib
import logging
import ssl
import time
from typing import Final

from .identity import HostIdentity
from .pairing import PairingFailed, async_check_client
from .server import Host

_LOGGER = logging.getLogger(__name__)

PAIRING_TIMEOUT: Final = 10.0
"""Seconds a new connection may take for TLS and the pairing check together."""
FAILURE_LIMIT: Final = 5
"""Failed connections of one address within FAILURE_WINDOW before it is refused."""
FAILURE_WINDOW: Final = 60.0
MAX_TRACKED_PEERS: Final = 4096
"""Addresses whose failures are remembered (the oldest are forgotten first)."""


def peer_text(peername: object) -> str:
    """Return a peer's address as people write it: 192.0.2.1:51234, [2001:db8::1]:51234."""
    if isinstance(peername, tuple) and len(peername) >= 2:
        address, port = str(peername[0]), peername[1]
        return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    return str(peername)


class FailureLimit:
    """Counts failed connections per address and tells which are refused."""

    def __init__(
        self,
        limit: int = FAILURE_LIMIT,
        window: float = FAILURE_WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Refuse an address after limit failures within window seconds."""
        self._limit = limit
        self._window = window
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, address: str) -> deque[float]:
        failures = self._failures.get(address, deque())
        now = self._clock()
        while failures and failures[0] <= now - self._window:
            failures.popleft()
        return failures

    def refused(self, address: str) -> bool:
        """Whether the address failed too often lately."""
        return len(self._recent(address)) >= self._limit

    def failed(self, address: str) -> bool:
        """Count a failure; return whether the address is refused from now on."""
        failures = self._recent(address)
        failures.append(self._clock())
        self._failures.pop(address, None)
        self._failures[address] = failures  # the most recent last
        while len(self._failures) > MAX_TRACKED_PEERS:
            del self._failures[next(iter(self._failures))]
        return len(failures) == self._limit

    def succeeded(self, address: str) -> None:
        """Forget an address's failures: it proved the key."""
        self._failures.pop(address, None)

    @property
    def window(self) -> float:
        """Seconds a failure is remembered."""
        return self._window


class TcpServer:
    """Checks each TCP connection, then hands it to the host."""

    def __init__(self, host: Host, identity: HostIdentity) -> None:
        """Serve host with this identity (its TLS context is made here)."""
        self._host = host
        self._identity = identity
        self._context: ssl.SSLContext = identity.server_context()
        self.failures = FailureLimit()

    async def async_serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Serve one connection that proves the pairing key; close any other."""
        peername = writer.get_extra_info("peername")
        peer = peer_text(peername)
        address = str(peername[0]) if isinstance(peername, tuple) else peer
        if self.failures.refused(address):
            # TLS first, then closed: its client reads this as a refused key.
            with contextlib.suppress(TimeoutError, OSError):
                async with asyncio.timeout(PAIRING_TIMEOUT):
                    await writer.start_tls(self._context)
            writer.transport.abort()
            return
        why = await self._async_check(reader, writer)
        if why is None:
            self.failures.succeeded(address)
            await self._host.async_serve(reader, writer, heartbeat=True)
            return
        _LOGGER.warning("Refused %s: %s", peer, why)
        if self.failures.failed(address):
            _LOGGER.warning(
                "Refusing %s for up to %g s: %d failed connections",
                address,
                self.failures.window,
                FAILURE_LIMIT,
            )
        writer.transport.abort()

    async def _async_check(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> str | None:
        """TLS and the pairing check; return why the connection failed, None if not."""
        try:
            async with asyncio.timeout(PAIRING_TIMEOUT):
                await writer.start_tls(self._context)
                await async_check_client(
                    reader,
                    writer,
                    self._identity.pairing_key,
                    self._identity.identity,
                )
        except TimeoutError:
            return f"no TLS handshake and pairing within {PAIRING_TIMEOUT:g} s"
        except ssl.SSLError as err:
            return f"no TLS handshake (plain text or another protocol: {err.reason})"
        except PairingFailed as err:
            return str(err)
        except OSError as err:
            return f"the connection broke during TLS or pairing ({err})"
        return None
