"""The heartbeat of a TCP link: a beat on an idle link, a silent link declared lost.

Each end writes HEARTBEAT (an empty line, skipped by the reader) when it wrote
nothing for an interval, and gives the link up when nothing at all arrived for
MISSES intervals in a row: a link that stalls (a cable pulled, a board frozen, a
network that drops everything) is noticed within seconds, not after TCP's minutes
of retries. An end whose event loop is blocked only delays its own ticks, so it
never counts a silence twice.
"""

import asyncio
from collections.abc import Callable
from typing import Final

HEARTBEAT: Final = b"\n"
INTERVAL: Final = 2.0
"""Seconds between two ticks: a beat is written when nothing else was."""
MISSES: Final = 3
"""Ticks in a row without anything heard before the link is given up."""


class Heartbeat:
    """The heartbeat of one end; its owner sets heard and wrote as data passes."""

    def __init__(
        self,
        write: Callable[[bytes], None],
        on_silence: Callable[[], None],
        interval: float = INTERVAL,
    ) -> None:
        """Beat with write; call on_silence once when the other end fell silent."""
        self.heard = True
        """Something arrived since the last tick."""
        self.wrote = False
        """Something was written since the last tick."""
        self.watching = True
        """Whether a silence counts (an end that does not read for a while says no)."""
        self.interval = interval
        self._write = write
        self._on_silence = on_silence
        self._silent_ticks = 0
        self._handle: asyncio.TimerHandle | None = None

    @property
    def silence_limit(self) -> float:
        """About how long the other end may stay silent, in seconds."""
        return self.interval * MISSES

    def start(self) -> None:
        """Start ticking (on the running loop)."""
        self._handle = asyncio.get_running_loop().call_later(self.interval, self._tick)

    def stop(self) -> None:
        """Stop ticking."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        self._silent_ticks = (
            0 if self.heard or not self.watching else self._silent_ticks + 1
        )
        if self._silent_ticks >= MISSES:
            self._handle = None
            self._on_silence()
            return
        self.heard = False
        if not self.wrote:
            self._write(HEARTBEAT)
        self.wrote = False
        self.start()
