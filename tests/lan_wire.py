"""A lossy, slow wire between two TAP devices: a stand-in for ``tc netem``.

The test machines' kernel has no netem (nor tbf) queueing discipline, so this
process makes the two ends of a link itself: two TAP devices, and every Ethernet
frame one side sends is written to the other after a delay (uniform in delay ±
jitter, so frames may overtake each other, as with netem's jitter) unless it is
dropped (loss, multicast included: mDNS crosses it like any frame). The devices
exist while this process runs; they vanish with it, and it ends with the process
that started it.

``python -m tests.lan_wire NAME_A NAME_B --delay-ms 20 --jitter-ms 10 --loss 0.01``
prints ``ready`` once both devices exist; SIGUSR1 prints the counts so far as a
JSON line, SIGTERM ends it.
"""

import argparse
import contextlib
import fcntl
import heapq
import itertools
import json
import os
import random
import select
import signal
import struct
import sys
import time
from typing import Final

_TUNSETIFF: Final = 0x400454CA
_IFF_TAP: Final = 0x0002
_IFF_NO_PI: Final = 0x1000
_MAX_FRAME: Final = 65536


def open_tap(name: str) -> int:
    """Create a TAP device (gone when its descriptor closes); return the descriptor."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(
        fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TAP | _IFF_NO_PI)
    )
    return fd


class Wire:
    """Frames between two descriptors, each delayed or dropped."""

    def __init__(
        self, a: int, b: int, delay: float, jitter: float, loss: float, seed: int
    ) -> None:
        """Join a and b; times in seconds, loss a fraction."""
        self._peer = {a: b, b: a}
        self._delay = delay
        self._jitter = jitter
        self._loss = loss
        self._random = random.Random(seed)
        self._queue: list[tuple[float, int, int, bytes]] = []
        self._order = itertools.count()
        self.counts = {"forwarded": 0, "dropped": 0, "failed": 0}
        """Frames written to the other side, dropped on purpose, refused (a link down)."""

    def _take(self, fd: int) -> None:
        with contextlib.suppress(BlockingIOError):
            while frame := os.read(fd, _MAX_FRAME):
                if self._random.random() < self._loss:
                    self.counts["dropped"] += 1
                    continue
                due = time.monotonic() + self._random.uniform(
                    self._delay - self._jitter, self._delay + self._jitter
                )
                heapq.heappush(
                    self._queue, (due, next(self._order), self._peer[fd], frame)
                )

    def _deliver(self) -> None:
        now = time.monotonic()
        while self._queue and self._queue[0][0] <= now:
            _due, _order, fd, frame = heapq.heappop(self._queue)
            try:
                os.write(fd, frame)
            except OSError:  # the device is down: the frame is lost on the wire
                self.counts["failed"] += 1
            else:
                self.counts["forwarded"] += 1

    def run_once(self) -> None:
        """Wait for a frame or the next delivery, then move what is due."""
        timeout = max(0.0, self._queue[0][0] - time.monotonic()) if self._queue else 1.0
        try:
            readable, _, _ = select.select(list(self._peer), [], [], timeout)
        except InterruptedError:
            readable = []
        for fd in readable:
            self._take(fd)
        self._deliver()


def _say(line: str) -> None:
    """Tell the process that started this one (a line on standard output)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> None:
    """Make the two devices and carry frames until SIGTERM."""
    parser = argparse.ArgumentParser(prog="lan_wire")
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--delay-ms", type=float, default=20)
    parser.add_argument("--jitter-ms", type=float, default=10)
    parser.add_argument("--loss", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    wire = Wire(
        open_tap(args.a),
        open_tap(args.b),
        args.delay_ms / 1000,
        args.jitter_ms / 1000,
        args.loss,
        args.seed,
    )
    running = True

    def stop(_signum: int, _frame: object) -> None:
        nonlocal running
        running = False

    def report(_signum: int, _frame: object) -> None:
        _say(json.dumps(wire.counts))

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGUSR1, report)
    _say("ready")
    parent = os.getppid()
    while running and os.getppid() == parent:  # ends with the process that made it
        wire.run_once()
    with contextlib.suppress(OSError):  # nobody reads any more
        _say(json.dumps(wire.counts))
    sys.exit(0)


if __name__ == "__main__":
    main()
