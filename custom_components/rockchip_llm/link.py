"""Home Assistant's end of the link to a runtime host (no Home Assistant imports).

A :class:`HostLink` carries requests to the host and their answers, streamed text
and events back, over one stream: a socket pair to a host this machine started
(:class:`LocalHost`), a Unix socket (:class:`UnixHost`) or TCP (:class:`TcpHost`).
Every request is a coroutine; the link fails all of them with
:class:`~.host.wire.HostLost` the moment the stream ends.

TCP is TLS 1.3 with the host's certificate pinned by its identity (the SHA-256 of
its DER form, checked before anything is sent), then the pairing check of
``host/pairing.py``, then a heartbeat (``host/heartbeat.py``) that gives up a link
silent for seconds.
"""

import asyncio
from collections.abc import Callable
import contextlib
from dataclasses import dataclass, field
import hmac
import itertools
import logging
import os
from pathlib import Path
import socket
import ssl
import subprocess
import sys
import tempfile
from typing import IO, Any, Final

from .host.heartbeat import HEARTBEAT, Heartbeat
from .host.identity import PAIRING_KEY_FILE, identity_of, parse_pairing_key
from .host.pairing import PairingFailed, async_prove_client
from .host.server import HostConfig
from .host.tcp_server import FAILURE_LIMIT, FAILURE_WINDOW
from .host.version import HOST_VERSION, PROTOCOL_VERSION, update_advice
from .host.wire import (
    MAX_MESSAGE_BYTES,
    HostIdentityChanged,
    HostLost,
    HostPairingRefused,
    HostUnreachable,
    HostVersionMismatch,
    Message,
    decode,
    encode,
    error_from_wire,
)

_LOGGER = logging.getLogger(__name__)
_HOST_LOGGER: Final = f"{__package__}.host"
"""Records the host logged are logged here again (its module names below)."""

HOST_FOLDER: Final = Path(__file__).parent / "host"
CONNECT_TIMEOUT: Final = 10.0
"""Seconds to reach a host and hear its hello."""
HELLO_TIMEOUT: Final = 120.0
"""Seconds a host may take to answer hello (it checks the runtime library first)."""
LOCAL_EXIT_TIMEOUT: Final = 20.0
"""Seconds a local host may take to stop its workers and end after its link closed."""

type TextSink = Callable[[str], None]
type EventHandler = Callable[[Message], None]


@dataclass(frozen=True, slots=True)
class LocalHost:
    """A host this machine starts for Home Assistant, over a socket pair."""

    config: HostConfig
    """What the host serves: its library, folders and settings."""
    python: str = sys.executable
    """The interpreter of the host (Home Assistant's own by default)."""

    def describe(self) -> str:
        """Say where the host runs, for messages."""
        return "this machine"

    def command(self, fd: int) -> list[str]:
        """Return the host's command line, serving the socket fd."""
        config = self.config
        command = [
            self.python,
            "-I",
            "-S",
            str(HOST_FOLDER),
            "--fd",
            str(fd),
            "--library",
            str(config.library),
            "--models",
            str(config.models_dir),
            "--cache",
            str(config.cache_dir),
        ]
        if config.cache_budget_bytes is not None:
            command += [
                "--cache-budget-mb",
                repr(config.cache_budget_bytes / 1_000_000),
            ]
        if config.abi_family is not None:
            command += ["--abi-family", str(config.abi_family)]
        if config.stall_timeout is not None:
            command += ["--stall-timeout", str(config.stall_timeout)]
        return command


@dataclass(frozen=True, slots=True)
class UnixHost:
    """A host listening on a Unix socket."""

    path: Path

    def describe(self) -> str:
        """Say where the host runs, for messages."""
        return f"unix:{self.path}"


@dataclass(frozen=True, slots=True)
class TcpHost:
    """A host listening on TCP (TLS, and the pairing key)."""

    address: str
    port: int
    pairing_key: str = field(default="", repr=False)
    """The key the host printed, as typed."""
    identity: str | None = None
    """The identity paired with; None while pairing (the key proves the host)."""

    def describe(self) -> str:
        """Say where the host runs, for messages."""
        return f"{self.address}:{self.port}"


type HostAddress = LocalHost | UnixHost | TcpHost


def _tls_context() -> ssl.SSLContext:
    """TLS 1.3 that accepts any certificate: the caller pins it by its identity."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


_TLS: Final = _tls_context()


def _log_host_record(event: Message) -> None:
    """Log what the host logged, under this package's host logger."""
    name = str(event.get("logger") or "")
    logger = logging.getLogger(f"{_HOST_LOGGER}.{name}" if name else _HOST_LOGGER)
    level = event.get("level")
    logger.log(
        level if isinstance(level, int) else logging.WARNING,
        "%s",
        str(event.get("message", "")),
    )


class HostLink:
    """One connection to a runtime host."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        where: str,
        process: subprocess.Popen[bytes] | None = None,
        stderr: IO[bytes] | None = None,
        *,
        identity: str | None = None,
        heartbeat: bool = False,
    ) -> None:
        """Serve a connected stream; start() begins reading it (and beating)."""
        self.where = where
        self.identity = identity
        """The TCP host's identity (sha256:<hex> of its certificate), else None."""
        self._reader = reader
        self._writer = writer
        self._process = process
        self._stderr = stderr
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[asyncio.Future[Any], TextSink | None]] = {}
        self._event_handlers: dict[str, EventHandler] = {"log": _log_host_record}
        self._lost_listeners: list[Callable[[HostLost], None]] = []
        self._reading: asyncio.Task[None] | None = None
        self.lost: HostLost | None = None
        """Why the link ended, once it has."""
        self._closing = False
        self._heartbeat = Heartbeat(self._write_heartbeat, self._silent)
        self._beating = heartbeat

    @property
    def pid(self) -> int | None:
        """The process id of a host this machine started."""
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        """Start reading answers and events."""
        self._reading = asyncio.get_running_loop().create_task(
            self._async_read(), name=f"rockchip_llm host link {self.where}"
        )
        if self._beating:
            self._heartbeat.start()

    def on_event(self, event: str, handler: EventHandler) -> None:
        """Call handler with every event of that name."""
        self._event_handlers[event] = handler

    def on_lost(self, listener: Callable[[HostLost], None]) -> Callable[[], None]:
        """Call listener once when the link ends unexpectedly; return its remover."""
        self._lost_listeners.append(listener)
        return lambda: self._lost_listeners.remove(listener)

    async def request(
        self, op: str, args: Message | None = None, *, sink: TextSink | None = None
    ) -> Any:
        """Send a request and return its answer (text before it goes to sink)."""
        if self.lost is not None:
            raise self.lost
        request_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = (future, sink)
        try:
            self._writer.write(encode({"id": request_id, "op": op, "args": args or {}}))
            self._heartbeat.wrote = True
            await self._writer.drain()
            return await future
        except ConnectionError as err:
            raise self.lost or self._lost_error(str(err)) from err
        finally:
            self._pending.pop(request_id, None)

    def send(self, op: str, args: Message) -> None:
        """Send a request whose answer nobody waits for (an abort)."""
        if self.lost is None and not self._writer.is_closing():
            self._writer.write(encode({"id": 0, "op": op, "args": args}))
            self._heartbeat.wrote = True

    def _write_heartbeat(self, beat: bytes) -> None:
        if not self._writer.is_closing():
            self._writer.write(beat)

    def _silent(self) -> None:
        """Nothing came for seconds: the link is lost (the answer in flight fails)."""
        self._end(
            self._lost_error(
                f"nothing arrived for {self._heartbeat.silence_limit:g} s (the "
                "network or the host stalled)"
            )
        )
        self._writer.transport.abort()

    async def _async_read(self) -> None:
        why = "the host closed the connection"
        try:
            while line := await self._reader.readline():
                self._heartbeat.heard = True
                if line != HEARTBEAT:
                    self._dispatch(decode(line))
        except (ConnectionError, OSError) as err:
            why = f"the connection broke ({err})"
        except ValueError as err:
            why = f"the host sent an unreadable message ({err})"
        self._end(self._lost_error(why))

    def _dispatch(self, message: Message) -> None:
        if (event := message.get("event")) is not None:
            if (handler := self._event_handlers.get(str(event))) is not None:
                handler(message)
            return
        pending = self._pending.get(message.get("id"))  # type: ignore[arg-type]
        if pending is None:
            return
        future, sink = pending
        if "text" in message:
            if sink is not None:
                sink(str(message["text"]))
        elif future.done():
            pass
        elif "error" in message:
            future.set_exception(error_from_wire(message["error"]))
        else:
            future.set_result(message.get("ok"))

    def _lost_error(self, why: str) -> HostLost:
        return HostLost(
            f"the connection to the Rockchip LLM runtime host ({self.where}) was "
            f"lost: {why}",
            model="",
            how=why,
        )

    def _end(self, error: HostLost) -> None:
        if self.lost is not None:
            return
        self.lost = error
        self._heartbeat.stop()
        pending, self._pending = self._pending, {}
        for future, _sink in pending.values():
            if not future.done():
                future.set_exception(error)
        if self._closing:
            return
        _LOGGER.warning("%s", error)
        for listener in list(self._lost_listeners):
            listener(error)

    async def async_close(self) -> None:
        """Close the link; a local host then stops its workers and ends."""
        self._closing = True
        self._heartbeat.stop()
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()
        if self._reading is not None:
            await self._reading
        self._end(self._lost_error("the link was closed"))
        if self._process is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._reap)

    def _reap(self) -> None:
        """Wait for a local host to end (blocking); kill it when it does not."""
        process = self._process
        assert process is not None
        try:
            process.wait(timeout=LOCAL_EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            _LOGGER.warning(
                "The local runtime host (pid %s) did not end; killing it", process.pid
            )
            process.kill()
            process.wait()
        if self._stderr is not None:
            self._stderr.close()

    def stderr_tail(self) -> str:
        """Return the last lines a local host wrote to its standard error (blocking)."""
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        lines = self._stderr.read().decode(errors="replace").splitlines()
        return "\n".join(lines[-10:])


def _spawn(
    local: LocalHost,
) -> tuple[socket.socket, subprocess.Popen[bytes], IO[bytes]]:
    """Start a local host on one end of a socket pair (blocking)."""
    ours, theirs = socket.socketpair()
    stderr = tempfile.TemporaryFile()  # noqa: SIM115 - kept for the link's life
    try:
        process = subprocess.Popen(
            local.command(theirs.fileno()),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            pass_fds=(theirs.fileno(),),
            start_new_session=True,  # a Ctrl-C meant for HA is not the host's
        )
    except OSError:
        ours.close()
        stderr.close()
        raise
    finally:
        theirs.close()
    return ours, process, stderr


async def _async_check_host(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    address: TcpHost,
    key: bytes,
) -> str:
    """Check a TLS host's identity (before sending anything) and pair; return it."""
    where = address.describe()
    ssl_object = writer.get_extra_info("ssl_object")
    seen = identity_of(ssl_object.getpeercert(binary_form=True))
    if address.identity is not None and not hmac.compare_digest(seen, address.identity):
        raise HostIdentityChanged(
            f"the runtime host at {where} shows another identity ({seen}) than "
            f"the one paired ({address.identity}): it was reinstalled or lost its "
            "state folder, or another machine answers at this address",
            address=where,
            identity=seen,
            paired=address.identity,
        )
    try:
        await async_prove_client(reader, writer, key, seen)
    except PairingFailed as err:
        raise HostPairingRefused(
            f"the runtime host at {where} did not accept the pairing key ({err}): "
            f"check the key it prints at its start (in its state folder, file "
            f"{PAIRING_KEY_FILE}); after {FAILURE_LIMIT} failed tries it refuses "
            f"this machine for up to {FAILURE_WINDOW:g} s",
            address=where,
        ) from err
    return seen


async def _async_open_tls(
    address: TcpHost,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
    """Open TLS to a TCP host, check its identity and pair; return the stream and it."""
    where = address.describe()
    try:
        key = parse_pairing_key(address.pairing_key)
    except ValueError as err:
        raise HostPairingRefused(
            f"no usable pairing key for the runtime host at {where} ({err}): pair "
            "it again with the key it prints at its start",
            address=where,
        ) from err
    try:
        reader, writer = await asyncio.open_connection(
            address.address, address.port, limit=MAX_MESSAGE_BYTES, ssl=_TLS
        )
    except ssl.SSLError as err:
        raise HostUnreachable(
            f"the TLS handshake with the runtime host at {where} failed "
            f"({err.reason or err}): is it a runtime host of this version, "
            "listening with --tcp?",
            address=where,
            reason=f"TLS: {err.reason or err}",
        ) from err
    try:
        seen = await _async_check_host(reader, writer, address, key)
    except BaseException:
        writer.transport.abort()
        raise
    return reader, writer, seen


async def async_open(address: HostAddress) -> HostLink:
    """Open a link to the host, not greeted yet (starting it when it is this machine's)."""
    loop = asyncio.get_running_loop()
    where = address.describe()
    try:
        if isinstance(address, LocalHost):
            sock, process, stderr = await loop.run_in_executor(None, _spawn, address)
            reader, writer = await asyncio.open_connection(
                sock=sock, limit=MAX_MESSAGE_BYTES
            )
            return HostLink(reader, writer, where, process, stderr)
        async with asyncio.timeout(CONNECT_TIMEOUT):
            if isinstance(address, UnixHost):
                reader, writer = await asyncio.open_unix_connection(
                    str(address.path), limit=MAX_MESSAGE_BYTES
                )
                return HostLink(reader, writer, where)
            reader, writer, identity = await _async_open_tls(address)
    except TimeoutError as err:
        raise HostUnreachable(
            f"no runtime host answered at {where} within {CONNECT_TIMEOUT:g} s",
            address=where,
            reason="timeout",
        ) from err
    except OSError as err:
        raise HostUnreachable(
            f"cannot reach the runtime host at {where}: {err.strerror or err}",
            address=where,
            reason=str(err.strerror or err),
        ) from err
    return HostLink(reader, writer, where, identity=identity, heartbeat=True)


async def async_greet(link: HostLink, client_id: str) -> Message:
    """Start an open link and say hello; return the host's hello (the link closed if not)."""
    link.start()
    try:
        async with asyncio.timeout(HELLO_TIMEOUT):
            hello: Message = await link.request(
                "hello",
                {
                    "protocol": PROTOCOL_VERSION,
                    "version": HOST_VERSION,
                    "client": client_id,
                },
            )
    except HostLost as err:
        await link.async_close()
        detail = await asyncio.get_running_loop().run_in_executor(
            None, link.stderr_tail
        )
        raise HostUnreachable(
            f"the runtime host at {link.where} ended the connection before it "
            f"answered{': ' + detail if detail else ''}",
            address=link.where,
            reason=detail or str(err),
        ) from err
    except BaseException:
        await link.async_close()
        raise
    if (
        hello.get("protocol") != PROTOCOL_VERSION
        or hello.get("host_version") != HOST_VERSION
    ):
        await link.async_close()
        raise HostVersionMismatch(
            f"the runtime host at {link.where} is version {hello.get('host_version')} "
            f"(protocol {hello.get('protocol')}) and this integration {HOST_VERSION} "
            f"(protocol {PROTOCOL_VERSION}): "
            + update_advice(str(hello.get("host_version")), HOST_VERSION),
            host_version=str(hello.get("host_version")),
            client_version=HOST_VERSION,
        )
    return hello


async def async_connect(
    address: HostAddress, client_id: str
) -> tuple[HostLink, Message]:
    """Connect to a host and greet it; return the link and the host's hello."""
    link = await async_open(address)
    return link, await async_greet(link, client_id)


def local_python() -> str:
    """Return the interpreter of a local host (ROCKCHIP_LLM_HOST_PYTHON, else HA's)."""
    return os.environ.get("ROCKCHIP_LLM_HOST_PYTHON") or sys.executable
