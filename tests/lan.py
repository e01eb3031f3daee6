"""A LAN of a test's own: network namespaces linked to this (Home Assistant's) one.

Each board is a network namespace with one link to the root namespace, on a
subnet of its own, 10.77.N.0/24 (the root side .1, the board .2), where N is a
number no other link on this machine uses. A link is a veth pair, or a shaped
one: two TAP devices joined by ``tests/lan_wire.py``, which delays and drops
frames as ``tc netem`` would (the test machines' kernel has no netem). Every
name carries a tag of this run; :meth:`Lan.close` removes what it made (the
processes started in the namespaces first), also after a failure, and
:func:`lan` does so whatever happens. Needs root.
"""

from collections.abc import Iterator, Sequence
import contextlib
from dataclasses import dataclass, field
import fcntl
import itertools
import json
import os
from pathlib import Path
import re
import select
import signal
import subprocess
import sys
import time
from typing import IO, Any

REPO = Path(__file__).parent.parent
BOARD_ADDRESSES = tuple(f"10.77.{n}.{h}" for n in range(1, 255) for h in (2, 3))
"""Every address a LAN may give a board (for a test's list of hosts it may reach)."""
_LOCK = Path("/tmp/rockchip-llm-lan.lock")  # noqa: S108 - one machine-wide lock
"""Held while a subnet is chosen, so two runs never take the same one."""
_SUBNET = re.compile(r"inet 10\.77\.(\d+)\.")
_READY_TIMEOUT = 10.0
_STOP_TIMEOUT = 20.0


def ip(*args: str) -> str:
    """Run ip(8); return what it printed (fails with its message)."""
    done = subprocess.run(
        ["ip", *args], capture_output=True, text=True, check=False, timeout=30
    )
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


@dataclass(frozen=True, slots=True)
class Shape:
    """How a shaped link delays and drops frames (as netem's delay and loss)."""

    delay_ms: float = 20
    jitter_ms: float = 10
    loss: float = 0.01
    seed: int = 1


@dataclass
class Board:
    """A namespace with its link to the root namespace."""

    namespace: str
    index: int
    """N of its subnet 10.77.N.0/24."""
    root_device: str
    """The link's end in the root namespace."""
    device: str
    """The link's end in the board's namespace."""
    wire: subprocess.Popen[str] | None = None
    """The shaping process of a shaped link."""
    host_number: int = 2
    """The board's address on its subnet: .2, .3 once it moved."""
    processes: list[subprocess.Popen[Any]] = field(default_factory=list)

    @property
    def address(self) -> str:
        """The board's address."""
        return f"10.77.{self.index}.{self.host_number}"

    @property
    def root_address(self) -> str:
        """The root namespace's address on the link."""
        return f"10.77.{self.index}.1"

    def command(self, argv: Sequence[str], hostname: str | None = None) -> list[str]:
        """Return argv run in the namespace (with a hostname of its own, if given)."""
        inner = list(argv)
        if hostname is not None:
            inner = [
                "unshare",
                "--uts",
                "sh",
                "-c",
                f'hostname {hostname} && exec "$@"',
                "-",
                *inner,
            ]
        return ["ip", "netns", "exec", self.namespace, *inner]

    def start(
        self,
        argv: Sequence[str],
        *,
        hostname: str | None = None,
        stdout: IO[Any] | int | None = None,
        stderr: IO[Any] | int | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start argv in the namespace; it is stopped when the LAN is closed."""
        process = subprocess.Popen(
            self.command(argv, hostname),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env=env,
            start_new_session=True,
        )
        self.processes.append(process)
        return process

    def set_link(self, *, up: bool) -> None:
        """Take the board's end of the link down (a pulled cable) or up again."""
        ip("-n", self.namespace, "link", "set", self.device, "up" if up else "down")

    def move(self) -> None:
        """Give the board another address on its subnet (as a new DHCP lease would)."""
        self.set_address(present=False)
        self.host_number = 5 - self.host_number
        self.set_address(present=True)

    def set_address(self, *, present: bool) -> None:
        """Take the board's address away (no lease yet) or give it back."""
        ip(
            "-n",
            self.namespace,
            "addr",
            "add" if present else "del",
            f"{self.address}/24",
            "dev",
            self.device,
        )

    def wire_counts(self) -> dict[str, int]:
        """The shaped link's counts so far: forwarded, dropped and refused frames."""
        assert self.wire is not None and self.wire.stdout is not None
        self.wire.send_signal(signal.SIGUSR1)
        counts: dict[str, int] = json.loads(_read_line(self.wire, "counts"))
        return counts


def _read_line(process: subprocess.Popen[str], what: str) -> str:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], _READY_TIMEOUT)
    line = process.stdout.readline() if ready else ""
    if not line:
        raise RuntimeError(f"the wire process gave no {what}")
    return line


def _stop(process: subprocess.Popen[Any]) -> None:
    """Stop a process and its session (SIGTERM, then SIGKILL)."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            stream.close()


class Lan:
    """The namespaces and links of one run."""

    _runs = itertools.count(1)

    def __init__(self) -> None:
        """Start empty (add boards with :meth:`add_board`), with a reaper.

        The reaper, a process of its own, removes the LAN should this process end
        without closing it (killed, or a test timeout's exit).
        """
        self.tag = f"rl{os.getpid():06x}{next(self._runs) % 256:02x}"
        """rl, this process and its count of LANs: no other run's names."""
        self.boards: list[Board] = []
        self._reaper = subprocess.Popen(
            [sys.executable, "-m", "tests.lan", "reap", self.tag, str(os.getpid())],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def add_board(self, shape: Shape | None = None) -> Board:
        """Make a namespace linked to the root one (through a shaped wire, if given)."""
        number = len(self.boards)
        namespace = f"{self.tag}n{number}"
        root_device, device = f"{self.tag}r{number}", f"{self.tag}b{number}"
        ip("netns", "add", namespace)
        board = Board(namespace, -1, root_device, device)
        self.boards.append(board)
        ip("-n", namespace, "link", "set", "lo", "up")
        if shape is None:
            ip(
                "link", "add", root_device, "type", "veth",
                "peer", "name", device, "netns", namespace,
            )  # fmt: skip
        else:
            board.wire = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.lan_wire",
                    root_device,
                    device,
                    f"--delay-ms={shape.delay_ms}",
                    f"--jitter-ms={shape.jitter_ms}",
                    f"--loss={shape.loss}",
                    f"--seed={shape.seed}",
                ],  # fmt: skip
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            if _read_line(board.wire, "ready line").strip() != "ready":
                raise RuntimeError("the wire process did not start")
            ip("link", "set", device, "netns", namespace)
        _assign_subnet(board)
        ip("link", "set", root_device, "up")
        ip("-n", namespace, "link", "set", device, "up")
        return board

    def close(self) -> None:
        """Stop the boards' processes and wires; remove their namespaces and links."""
        for board in self.boards:
            for process in board.processes:
                _stop(process)
            if board.wire is not None:
                _stop(board.wire)  # its TAP devices go with it
        self.boards.clear()
        try:
            remove(self.tag)
        finally:
            _stop(self._reaper)


def remove(tag: str) -> None:
    """Kill what still runs in the namespaces of tag; remove them and its links."""
    namespaces = [
        line.split()[0]
        for line in ip("netns", "list").splitlines()
        if line.startswith(tag)
    ]
    for namespace in namespaces:
        for pid in ip("netns", "pids", namespace).split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    devices = [
        line.split()[0].partition("@")[0]
        for line in ip("-br", "link").splitlines()
        if line.startswith(tag)
    ]
    for device in devices:
        with contextlib.suppress(RuntimeError):  # gone with its namespace meanwhile
            ip("link", "delete", device)
    for namespace in namespaces:
        ip("netns", "delete", namespace)


def _reap(tag: str, parent: int) -> None:
    """Wait for parent to end (or for SIGTERM: it closed the LAN); then remove tag's."""
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(0))
    while os.getppid() == parent:
        time.sleep(0.5)
    remove(tag)


def _assign_subnet(board: Board) -> None:
    """Put the board's link on a subnet 10.77.N.0/24 that no device here uses."""
    with _LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        used = {int(n) for n in _SUBNET.findall(ip("-4", "addr"))}
        board.index = next(n for n in range(1, 255) if n not in used)
        ip("addr", "add", f"{board.root_address}/24", "dev", board.root_device)
    board.set_address(present=True)


@contextlib.contextmanager
def lan() -> Iterator[Lan]:
    """A LAN that is removed afterwards, whatever happened."""
    made = Lan()
    try:
        yield made
    finally:
        made.close()


if __name__ == "__main__":  # python -m tests.lan reap TAG PARENT_PID
    _reap(sys.argv[2], int(sys.argv[3]))
