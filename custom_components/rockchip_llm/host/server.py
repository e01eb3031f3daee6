"""The runtime host's server: one Home Assistant at a time, over one stream.

The first request must be ``hello`` with the client's protocol and version and an
id of the client (a Home Assistant instance and entry). A client of another version
is refused with a message that says what to update; while a client is connected,
another one is refused (a model is never shared between two Home Assistants), the
same client reconnecting takes its place. When a client goes away, its workers are
stopped at once: a restarted Home Assistant loads its models again in seconds, and
NPU memory is too scarce to hold for a client that may not come back.

Requests of a connected client run concurrently (an abort must pass a running
generation). Anything malformed ends that client's connection; the host goes on.
"""

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from concurrent.futures import Future
import contextlib
from dataclasses import dataclass
import functools
import itertools
import logging
from pathlib import Path
import sys
import threading
from typing import Any, Final, TypeAlias, TypeGuard

from . import board
from .heartbeat import HEARTBEAT, Heartbeat
from .model_files import (
    ModelInfo,
    ModelScan,
    ModelsDirError,
    model_fingerprint,
    scan_models,
)
from .prompt_cache import (
    CacheEntry,
    CacheMetadata,
    CacheWriteError,
    InvalidCacheName,
    InvalidModelName,
    PromptCacheStore,
    free_bytes,
)
from .rkllm.abi import AbiFamily
from .rkllm.errors import (
    LibraryCopyFailed,
    LibraryError,
    ModelFileMissing,
    PromptCacheNotSaved,
    RKLLMError,
    WorkerDiedError,
)
from .rkllm.library import VerifiedLibrary, info_to_wire
from .rkllm.probe import checked_copy, verify_and_copy_library
from .rkllm.protocol import params_from_wire, request_from_wire, result_to_wire
from .rkllm.worker import WorkerModel
from .version import HOST_VERSION, PROTOCOL_VERSION, update_advice
from .wire import (
    MAX_MESSAGE_BYTES,
    BadRequest,
    HostBusy,
    HostVersionMismatch,
    Message,
    decode,
    encode,
    entry_to_wire,
    error_to_wire,
    scan_to_wire,
)

_LOGGER = logging.getLogger(__name__)

PRIVATE_LIBRARY_DIR: Final = ".runtime"
"""Under the cache folder: the private copy of the runtime library the workers load."""
HELLO_TIMEOUT: Final = 10.0
"""Seconds a new connection may take to say hello."""
SERVE_END_TIMEOUT: Final = 5.0
"""Seconds a closed connection's handler may take to end when the host stops."""
CLOSE_TIMEOUT: Final = 2.0
"""Seconds a closed connection may take to flush (a stalled one is then cut off)."""


@dataclass(frozen=True, slots=True)
class HostConfig:
    """What a host serves: its library, model folders and cache folder."""

    library: Path
    models_dir: Path
    cache_dir: Path
    cache_budget_bytes: int | None = None
    abi_family: AbiFamily | None = None
    stall_timeout: float | None = None
    forward_logs: bool = True
    """Send the host's log records (INFO and up) to the client, for its log."""


class _ForwardLogs(logging.Handler):
    """Hands the host's log records to the client it serves."""

    def __init__(self, host: "Host") -> None:
        super().__init__(logging.INFO)
        self._host = host

    def emit(self, record: logging.LogRecord) -> None:
        client = self._host._client  # noqa: SLF001
        if client is None:
            return
        client.send_threadsafe(
            {
                "event": "log",
                "level": record.levelno,
                "logger": record.name.removeprefix(_PACKAGE).lstrip("."),
                "message": record.getMessage(),
            }
        )


ANSWERED: Final = object()
"""What a request handler returns when it sent the answer itself."""
_PACKAGE: Final = __name__.rpartition(".")[0]


def version_refusal(
    side: str, their_version: str, their_protocol: object, mine: str, advice: str
) -> str:
    """Say why two versions cannot talk and what to do."""
    return (
        f"the {side} is version {their_version:.40} (protocol {their_protocol!s:.20}) and "
        f"this one is {mine} (protocol {PROTOCOL_VERSION}): {advice}"
    )


class Host:
    """The NPU side: library, models, caches; serves one client at a time."""

    def __init__(self, config: HostConfig) -> None:
        """Serve config's folders."""
        self.config = config
        self.store = PromptCacheStore(config.cache_dir, config.cache_budget_bytes)
        self.library: VerifiedLibrary | None = None
        """The library as the last hello checked it (None: unusable)."""
        self._library_check = asyncio.Lock()
        """Held while a worker's start checks (and maybe copies again) the library."""
        self._client: _Client | None = None
        self._clients: set[_Client] = set()
        self._serving: set[asyncio.Task[Any]] = set()
        """Every connection until its workers are stopped."""
        self._log_handler = _ForwardLogs(self) if config.forward_logs else None
        if self._log_handler is not None:
            logging.getLogger(_PACKAGE).addHandler(self._log_handler)

    async def async_serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        heartbeat: bool = False,
    ) -> None:
        """Serve one connection until it ends and its workers are stopped.

        With heartbeat (TCP), a connection silent for seconds is closed.
        """
        peer = str(writer.get_extra_info("peername") or "local link")
        client = _Client(self, reader, writer, peer)
        if heartbeat:
            # It beats from now on; it listens once the hello is answered (the
            # request loop reads all the time, the greeting does not).
            client.heartbeat.watching = False
            client.heartbeat.start()
        self._clients.add(client)
        serving = asyncio.current_task()
        if serving is not None:
            self._serving.add(serving)
        try:
            await client.async_run()
        finally:
            if self._client is client:
                self._client = None
            try:
                await client.async_close()
            finally:
                self._clients.discard(client)
                if serving is not None:
                    self._serving.discard(serving)

    async def async_close(self) -> None:
        """Stop every client's workers (those being stopped too); end the serving."""
        await asyncio.gather(*(client.async_close() for client in list(self._clients)))
        if self._serving:
            await asyncio.wait(self._serving, timeout=SERVE_END_TIMEOUT)
        if self._log_handler is not None:
            logging.getLogger(_PACKAGE).removeHandler(self._log_handler)

    async def _async_admit(self, client: "_Client", client_id: str) -> None:
        """Make client the one served, or refuse it while another is."""
        current = self._client
        if current is not None and current is not client:
            if current.client_id != client_id:
                _LOGGER.warning(
                    "Refused %s: the host serves another Home Assistant (%s)",
                    client.peer,
                    current.peer,
                )
                raise HostBusy(
                    "the runtime host is in use by another Home Assistant "
                    f"({current.peer}); remove or disable the Rockchip LLM entry "
                    "there, or run a host of its own for each",
                    peer=current.peer,
                )
            _LOGGER.info("%s reconnected; ending its earlier connection", client_id)
            await current.async_close()
        self._client = client

    async def _async_hello(self) -> Message:
        """Check the library (once per file version) and describe the host."""
        loop = asyncio.get_running_loop()
        config = self.config
        runtime: Message | None = None
        library_error: Message | None = None
        disk_error: Message | None = None
        try:
            library: VerifiedLibrary = await loop.run_in_executor(
                None,
                verify_and_copy_library,
                config.library,
                config.cache_dir / PRIVATE_LIBRARY_DIR,
                config.abi_family,
            )
        except LibraryError as err:
            _LOGGER.error("The runtime library cannot be used: %s", err)
            library_error = error_to_wire(err)
            if isinstance(err, LibraryCopyFailed):
                folder = config.cache_dir / PRIVATE_LIBRARY_DIR
                disk_error = error_to_wire(
                    await loop.run_in_executor(
                        None, CacheWriteError, str(err), err.os_error, folder
                    )
                )
            self.library = None
        else:
            self.library = library
            runtime = {**info_to_wire(library.info), "simulated": library.simulated}
            await loop.run_in_executor(None, self.store.clean_staging)
        facts = await loop.run_in_executor(None, board.read_host_info)
        writable = await loop.run_in_executor(None, self.store.writable)
        return {
            "host_version": HOST_VERSION,
            "protocol": PROTOCOL_VERSION,
            "hostname": board.hostname(),
            "runtime": runtime,
            "library_error": library_error,
            "library_disk_error": disk_error,
            "library_path": str(config.library),
            "models_dir": str(config.models_dir),
            "cache_dir": str(config.cache_dir),
            "cache_budget_bytes": config.cache_budget_bytes,
            "cache_writable": writable,
            "board": facts,
        }


_Op: TypeAlias = Callable[["_Client", int, Mapping[str, Any]], Awaitable[Any]]
_OPS: dict[str, _Op] = {}


def _op(name: str) -> Callable[[_Op], _Op]:
    def register(function: _Op) -> _Op:
        _OPS[name] = function
        return function

    return register


def _is_text(value: Any) -> TypeGuard[str]:
    """Tell whether a value is a string the runtime can take: no NUL, and UTF-8 (no lone surrogate)."""
    if not isinstance(value, str) or "\0" in value:
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _text(args: Mapping[str, Any], key: str) -> str:
    value = args[key]
    if not _is_text(value):
        raise BadRequest(f"{key} must be a text without NUL or lone surrogates")
    return value


def _optional_text(args: Mapping[str, Any], key: str) -> str | None:
    return None if args.get(key) is None else _text(args, key)


def _whole(args: Mapping[str, Any], key: str) -> int:
    value = args[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRequest(f"{key} must be a whole number")
    return value


class _Client:
    """One connection: its requests, its workers."""

    def __init__(
        self,
        host: Host,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str,
    ) -> None:
        self.host = host
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.client_id = ""
        self.workers: dict[int, WorkerModel] = {}
        self._worker_ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._closing: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()
        self.heartbeat = Heartbeat(self._write_heartbeat, self._silent)
        """Started by the host for a TCP connection."""
        self._outbox: list[Message] = []
        """Messages queued from other threads, not yet written."""
        self._outbox_lock = threading.Lock()
        self._loop_thread = threading.get_ident()

    # Connection

    def send(self, message: Message) -> None:
        """Queue a message for the client (dropped once it is gone).

        What was queued before goes first, in the same write: a run's text before
        its answer.
        """
        self._flush_outbox(message)

    def answer(
        self, request_id: int, done: Future[Any], wire: Callable[[Any], Any]
    ) -> None:
        """Send the answer of a request whose future is done (from any thread).

        Called where the future completed: on the loop, where a worker's answers
        are read, it leaves with the text read together with it, in one write.
        """
        if threading.get_ident() != self._loop_thread:
            with contextlib.suppress(RuntimeError):  # the loop is closed: host stops
                self._loop.call_soon_threadsafe(self.answer, request_id, done, wire)
            return
        if (err := done.exception()) is not None:
            self.send_error(request_id, err)
        else:
            self.send({"id": request_id, "ok": wire(done.result())})

    def send_error(self, request_id: int, err: BaseException) -> None:
        """Send why a request failed (bad arguments are the client's error)."""
        if not isinstance(err, RKLLMError | OSError):
            _LOGGER.debug("Request %s failed", request_id, exc_info=err)
        self.send({"id": request_id, "error": error_to_wire(_as_request_error(err))})

    def _write_heartbeat(self, beat: bytes) -> None:
        if not self._closed and not self.writer.is_closing():
            self.writer.write(beat)

    def _silent(self) -> None:
        """Nothing came for seconds: give the connection up (its workers stop)."""
        _LOGGER.warning(
            "Closing the connection of %s: nothing arrived from it for %g s (the "
            "network or Home Assistant stalled)",
            self.peer,
            self.heartbeat.silence_limit,
        )
        self.writer.transport.abort()

    def send_threadsafe(self, message: Message) -> None:
        """Queue a message from any thread.

        Messages that queue up while the loop is busy go out in one write, a run's
        consecutive text as one message: a consumer that falls behind gets fewer,
        longer texts, never later ones.
        """
        with self._outbox_lock:
            self._outbox.append(message)
            if len(self._outbox) > 1:
                return  # the flush of the first one is on its way
        if threading.get_ident() == self._loop_thread:  # a worker's answers, read here
            self._loop.call_soon(self._flush_outbox)
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: host stops
            self._loop.call_soon_threadsafe(self._flush_outbox)

    def _flush_outbox(self, *then: Message) -> None:
        """Write what was queued, then the given messages, in one write."""
        with self._outbox_lock:
            messages, self._outbox = self._outbox, []
        messages += then
        if messages:
            self._write(b"".join(encode(message) for message in merge_text(messages)))

    def _write(self, data: bytes) -> None:
        if not self._closed and not self.writer.is_closing():
            self.writer.write(data)
            self.heartbeat.wrote = True

    async def _read(self) -> Message | None:
        """Read one message (heartbeats skipped); None at the end of the stream."""
        line = HEARTBEAT
        while line == HEARTBEAT:
            try:
                line = await self.reader.readline()
            except ValueError as err:  # a line over the limit
                raise BadRequest(
                    f"a message longer than {MAX_MESSAGE_BYTES} bytes"
                ) from err
            self.heartbeat.heard = True
        if not line:
            return None
        if not line.endswith(b"\n"):
            raise BadRequest("the connection ended inside a message")
        try:
            return decode(line)
        except (ValueError, RecursionError) as err:  # RecursionError: nested deeply
            raise BadRequest("a message that is not a JSON object") from err

    async def async_run(self) -> None:
        """Greet the client, then serve its requests until it goes."""
        try:
            if not await self._async_greet():
                return
            self.heartbeat.watching = True
            while (message := await self._read()) is not None and not self._closed:
                request_id = message.get("id")
                op = message.get("op")
                args = message.get("args", {})
                if (
                    not isinstance(request_id, int)
                    or not isinstance(op, str)
                    or not isinstance(args, dict)
                ):
                    raise BadRequest("a request without an id, op and args")  # noqa: TRY301
                task = _start_now(self._async_handle(request_id, op, args))
                if not task.done():
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        except BadRequest as err:
            _LOGGER.warning("Closing the connection of %s: %s", self.peer, err)
        except (ConnectionError, asyncio.IncompleteReadError) as err:
            _LOGGER.info("The connection of %s broke: %s", self.peer, err)
        else:
            _LOGGER.info("%s disconnected", self.peer)

    async def _async_greet(self) -> bool:
        """Answer the hello; False when the client is refused."""
        try:
            message = await asyncio.wait_for(self._read(), HELLO_TIMEOUT)
        except TimeoutError:
            _LOGGER.warning(
                "Refused %s: no hello within %g s", self.peer, HELLO_TIMEOUT
            )
            return False
        if message is None:
            return False
        request_id = message.get("id")
        args = message.get("args")
        if message.get("op") != "hello" or not isinstance(args, dict):
            _LOGGER.warning("Refused %s: the first request was not hello", self.peer)
            return False
        try:
            self._check_version(args)
            client_id = _text(args, "client")
            await self.host._async_admit(self, client_id)  # noqa: SLF001
            self.client_id = client_id
            greeting = await self.host._async_hello()  # noqa: SLF001
        except (RKLLMError, KeyError, TypeError, ValueError) as err:
            self.send(
                {"id": request_id, "error": error_to_wire(_as_request_error(err))}
            )
            await self._async_drain()
            return False
        self.send({"id": request_id, "ok": greeting})
        _LOGGER.info("Serving %s (%s)", self.client_id, self.peer)
        return True

    def _check_version(self, args: Mapping[str, Any]) -> None:
        protocol = args.get("protocol")
        version = args.get("version")
        if protocol == PROTOCOL_VERSION and version == HOST_VERSION:
            return
        version = str(version)[:40]
        advice = update_advice(HOST_VERSION, version)
        _LOGGER.warning(
            "Refused %s: it runs version %s (protocol %s), this host %s (protocol %s)",
            self.peer,
            version,
            protocol,
            HOST_VERSION,
            PROTOCOL_VERSION,
        )
        raise HostVersionMismatch(
            version_refusal("integration", version, protocol, HOST_VERSION, advice),
            host_version=HOST_VERSION,
            client_version=version,
        )

    async def _async_drain(self) -> None:
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    async def _async_handle(
        self, request_id: int, op: str, args: Mapping[str, Any]
    ) -> None:
        handler = _OPS.get(op)
        try:
            if handler is None:
                raise BadRequest(f"unknown request {op!r:.80}")  # noqa: TRY301
            result = await handler(self, request_id, args)
        except Exception as err:  # noqa: BLE001 - every error goes to the client
            self.send_error(request_id, err)
        else:
            if result is not ANSWERED:
                self.send({"id": request_id, "ok": result})
        await self._async_drain()

    async def async_close(self) -> None:
        """Stop the client's workers and close its connection; wait until done.

        The stopping runs once, in a task of its own: a caller that is cancelled
        (the host stopping) does not cancel it half way, and every caller waits
        for the same one.
        """
        if self._closing is None:
            self._closed = True
            self._closing = asyncio.create_task(self._async_close())
        await asyncio.shield(self._closing)

    async def _async_close(self) -> None:
        self.heartbeat.stop()
        for task in list(self._tasks):
            task.cancel()
        workers, self.workers = list(self.workers.values()), {}
        loop = asyncio.get_running_loop()
        await asyncio.gather(
            *(loop.run_in_executor(None, worker.close) for worker in workers)
        )
        if workers:
            _LOGGER.info("Stopped %d worker(s) of %s", len(workers), self.peer)
        self.writer.close()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self.writer.wait_closed()
        except TimeoutError:
            self.writer.transport.abort()
        except (ConnectionError, OSError):
            pass

    # Helpers of the requests

    async def blocking(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run a blocking function (file system) off the loop."""
        return await self._loop.run_in_executor(
            None, functools.partial(function, *args)
        )

    def worker(self, args: Mapping[str, Any]) -> WorkerModel:
        """Return the client's worker a request names."""
        worker = self.workers.get(_whole(args, "worker"))
        if worker is None:
            raise BadRequest("no such worker")
        return worker

    async def library(self) -> VerifiedLibrary:
        """Return the checked library with an intact copy; refused while there is none.

        A copy damaged since the hello is made again from the original
        (probe.checked_copy), without a new hello.
        """
        host = self.host
        async with host._library_check:  # noqa: SLF001
            if host.library is None:
                raise BadRequest("the runtime library of this host cannot be used")
            host.library = await self.blocking(checked_copy, host.library)
            return host.library

    async def model(self, name: str, was: object = None) -> ModelInfo:
        """Return the scanned model of that name.

        was: the model file the client last knew of it, named when it is gone
        (only when it is a file of that model's folder).
        """
        folder = self.host.config.models_dir
        try:
            scan: ModelScan = await self.blocking(scan_models, folder)
        except ModelsDirError as err:
            raise ModelFileMissing(
                f"the models folder {folder} of the runtime host "
                f"{_FOLDER_PROBLEMS.get(err.reason, 'cannot be read')}, so model "
                f"{name} cannot be loaded",
                model=name,
                path=str(folder),
            ) from err
        if (info := scan.models.get(name)) is None:
            if isinstance(was, str) and Path(was).parent == folder / name:
                raise ModelFileMissing(
                    f"the model file {was} of {name} is gone (removed or renamed while "
                    "it was in use); put it back, or pick another model for its "
                    "agents, and reload the integration",
                    model=name,
                    path=was,
                )
            raise ModelFileMissing(
                f"model {name} is not in the runtime host's models folder {folder} "
                "(was its folder or .rkllm file removed or renamed?); put it back, or "
                "pick another model for its agents, and reload the integration",
                model=name,
                path=str(folder),
            )
        return info

    def _worker_died(self, worker_id: int, err: WorkerDiedError) -> None:
        self.send_threadsafe(
            {"event": "worker_died", "worker": worker_id, "error": error_to_wire(err)}
        )

    def cache_file(self, raw: str) -> Path:
        """Check that a path names a cache file of the store; return it."""
        path = Path(raw)
        store = self.host.store
        try:
            expected = store.bin_path(path.parent.name, path.stem)
        except (InvalidCacheName, InvalidModelName, ValueError) as err:
            raise BadRequest(
                f"{raw!r:.200} is not a prompt cache of this host"
            ) from err
        if path != expected:
            raise BadRequest(f"{raw!r:.200} is not a prompt cache of this host")
        return expected


_FOLDER_PROBLEMS: Final = {
    "models_dir_missing": "does not exist (is the drive mounted?)",
    "models_dir_not_dir": "is not a folder",
}


def _start_now(handler: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    """Run a request's handler at once, up to its first wait (eagerly, from Python 3.12).

    A run is then on its way to the worker before the next line is read, with no
    turn of the event loop in between.
    """
    if sys.version_info >= (3, 12):
        return asyncio.Task(handler, eager_start=True)
    else:  # noqa: RET505 (mypy checks each Python's branch only in this form)
        return asyncio.create_task(handler)  # Python 3.11: on the next turn


def merge_text(messages: list[Message]) -> list[Message]:
    """Join the consecutive text messages of one request into one, in order."""
    merged: list[Message] = []
    pieces: list[str] = []
    for message in messages:
        if set(message) == _TEXT_KEYS:
            if pieces and merged[-1]["id"] == message["id"]:
                pieces.append(message["text"])
                continue
            _join_text(merged, pieces)
            pieces = [message["text"]]
        else:
            _join_text(merged, pieces)
            pieces = []
        merged.append(message)
    _join_text(merged, pieces)
    return merged


_TEXT_KEYS: Final = frozenset(("id", "text"))


def _join_text(merged: list[Message], pieces: list[str]) -> None:
    if len(pieces) > 1:
        merged[-1] = {"id": merged[-1]["id"], "text": "".join(pieces)}


def _as_request_error(err: BaseException) -> BaseException:
    """Bad arguments (missing keys, wrong types) are the client's error."""
    if isinstance(err, KeyError | TypeError | ValueError) and not isinstance(
        err, RKLLMError
    ):
        return BadRequest(f"malformed request: {type(err).__name__}: {err}")
    return err


# Models and board


@_op("models.scan")
async def _models_scan(client: _Client, _id: int, _args: Mapping[str, Any]) -> Any:
    return scan_to_wire(
        await client.blocking(scan_models, client.host.config.models_dir)
    )


@_op("models.fingerprint")
async def _models_fingerprint(
    client: _Client, _id: int, args: Mapping[str, Any]
) -> Any:
    info = await client.model(_text(args, "model"))
    return await client.blocking(model_fingerprint, info.path)


@_op("board.info")
async def _board_info(client: _Client, _id: int, _args: Mapping[str, Any]) -> Any:
    return await client.blocking(board.read_host_info)


@_op("board.npu_load")
async def _board_npu_load(client: _Client, _id: int, _args: Mapping[str, Any]) -> Any:
    return await client.blocking(board.read_npu_load)


# Workers


@_op("worker.open")
async def _worker_open(client: _Client, _id: int, args: Mapping[str, Any]) -> Any:
    """Start a worker for a model and load the model in it."""
    name = _text(args, "model")
    raw_params = args["params"]
    if not isinstance(raw_params, dict):
        raise BadRequest("params must be an object")
    info = await client.model(name, raw_params.get("model_path"))
    params = params_from_wire({**raw_params, "model_path": str(info.path)})
    worker_id = next(client._worker_ids)  # noqa: SLF001
    worker = WorkerModel(
        await client.library(),
        name,
        stall_timeout=client.host.config.stall_timeout,
        on_death=functools.partial(client._worker_died, worker_id),  # noqa: SLF001
        loop=asyncio.get_running_loop(),
    )
    client.workers[worker_id] = worker
    try:
        await asyncio.wrap_future(worker.init(params))
    except BaseException:
        client.workers.pop(worker_id, None)
        await client.blocking(worker.close)
        raise
    return {
        "worker": worker_id,
        "context_limit": worker.context_limit,
        "pid": worker.pid,
    }


@_op("worker.close")
async def _worker_close(client: _Client, _id: int, args: Mapping[str, Any]) -> Any:
    worker = client.workers.pop(_whole(args, "worker"), None)
    if worker is not None:
        await client.blocking(worker.close)


@_op("worker.abort")
async def _worker_abort(client: _Client, _id: int, args: Mapping[str, Any]) -> Any:
    client.worker(args).abort()


@_op("worker.tail")
async def _worker_tail(client: _Client, _id: int, args: Mapping[str, Any]) -> Any:
    worker = client.worker(args)
    return {"output": worker.output_tail(), "pid": worker.pid}


@_op("worker.run")
async def _worker_run(client: _Client, request_id: int, args: Mapping[str, Any]) -> Any:
    worker = client.worker(args)
    raw = args["request"]
    if not isinstance(raw, dict):
        raise BadRequest("request must be an object")
    request = request_from_wire(raw)
    if request.save_prompt_cache is not None:
        client.host.store.check_staging(request.save_prompt_cache)
    if not _is_text(request.prompt):
        raise BadRequest("a prompt with a NUL character or a lone surrogate")

    def sink(text: str) -> None:
        client.send_threadsafe({"id": request_id, "text": text})

    # Answered where the worker's answer is read; nothing waits for it here: a
    # client that goes away has its workers closed, which aborts the run.
    worker.run(request, sink).add_done_callback(
        functools.partial(client.answer, request_id, wire=result_to_wire)
    )
    return ANSWERED


@_op("worker.load_prompt_cache")
async def _worker_load_cache(client: _Client, _id: int, args: Mapping[str, Any]) -> Any:
    worker = client.worker(args)
    path = client.cache_file(_text(args, "path"))
    # The runtime is given only a .bin that holds what its metadata describes.
    await client.blocking(client.host.store.verify, path.parent.name, path.stem)
    await asyncio.wrap_future(worker.load_prompt_cache(path))


@_op("worker.release_prompt_cache")
async def _worker_release(client: _Client, _id: int, args: Mapping[str, Any]) -> Any:
    await asyncio.wrap_future(client.worker(args).release_prompt_cache())


@_op("worker.clear_kv_cache")
async def _worker_clear(client: _Client, _id: int, args: Mapping[str, Any]) -> Any:
    keep = args["keep_system_prompt"]
    if not isinstance(keep, bool):
        raise BadRequest("keep_system_prompt must be true or false")
    await asyncio.wrap_future(
        client.worker(args).clear_kv_cache(keep_system_prompt=keep)
    )


@_op("worker.set_chat_template")
async def _worker_template(client: _Client, _id: int, args: Mapping[str, Any]) -> Any:
    await asyncio.wrap_future(
        client.worker(args).set_chat_template(
            _text(args, "system"), _text(args, "prefix"), _text(args, "postfix")
        )
    )


@_op("worker.set_function_tools")
async def _worker_tools(client: _Client, _id: int, args: Mapping[str, Any]) -> Any:
    await asyncio.wrap_future(
        client.worker(args).set_function_tools(
            _text(args, "system"),
            _text(args, "tools_json"),
            _text(args, "tool_response_tag"),
        )
    )


# The prompt cache store


def _model_name(args: Mapping[str, Any]) -> str:
    return _text(args, "model")


@_op("cache.list")
async def _cache_list(client: _Client, _id: int, args: Mapping[str, Any]) -> Any:
    store = client.host.store

    def listing() -> list[Message]:
        return [
            {**entry_to_wire(entry), "disk_bytes": store.disk_bytes(entry)}
            for entry in store.list(_optional_text(args, "model"))
        ]

    return await client.blocking(listing)


@_op("cache.get")
async def _cache_get(client: _Client, _id: int, args: Mapping[str, Any]) -> Any:
    entry: CacheEntry | None = await client.blocking(
        client.host.store.get, _model_name(args), _text(args, "name")
    )
    return entry_to_wire(entry) if entry is not None else None


@_op("cache.delete")
async def _cache_delete(client: _Client, _id: int, args: Mapping[str, Any]) -> Any:
    return await client.blocking(
        client.host.store.delete, _model_name(args), _text(args, "name")
    )


@_op("cache.touch")
async def _cache_touch(client: _Client, _id: int, args: Mapping[str, Any]) -> Any:
    await client.blocking(
        client.host.store.touch_named, _model_name(args), _text(args, "name")
    )


@_op("cache.make_room")
async def _cache_make_room(client: _Client, _id: int, args: Mapping[str, Any]) -> Any:
    evicted: list[CacheEntry] = await client.blocking(
        client.host.store.make_room,
        _model_name(args),
        _text(args, "name"),
        _whole(args, "prompt_length"),
        _text(args, "evictable"),
    )
    return [entry_to_wire(entry) for entry in evicted]


@_op("cache.staging")
async def _cache_staging(client: _Client, _id: int, args: Mapping[str, Any]) -> Any:
    path = await client.blocking(
        client.host.store.staging_bin_path, _model_name(args), _text(args, "name")
    )
    return str(path)


@_op("cache.commit")
async def _cache_commit(client: _Client, _id: int, args: Mapping[str, Any]) -> Any:
    staging = Path(_text(args, "staging"))
    metadata = CacheMetadata.from_json(args["metadata"])
    store = client.host.store

    def commit() -> CacheEntry:
        store.check_staging(staging)
        if not staging.exists():
            raise PromptCacheNotSaved(
                f"the runtime wrote no prompt cache file for {metadata.model}; "
                "it may not support saving one for this model (rknn-llm #517)"
            )
        return store.commit(staging, metadata)

    return entry_to_wire(await client.blocking(commit))


@_op("cache.discard")
async def _cache_discard(client: _Client, _id: int, args: Mapping[str, Any]) -> Any:
    await client.blocking(client.host.store.discard, Path(_text(args, "staging")))


@_op("cache.write_problem")
async def _cache_write_problem(
    client: _Client, _id: int, args: Mapping[str, Any]
) -> Any:
    problem = await client.blocking(
        client.host.store.write_problem, Path(_text(args, "staging"))
    )
    return error_to_wire(problem) if problem is not None else None


@_op("cache.disk_problem")
async def _cache_disk_problem(
    client: _Client, _id: int, args: Mapping[str, Any]
) -> Any:
    problem = await client.blocking(
        client.host.store.disk_problem,
        _optional_text(args, "model"),
        _text(args, "name"),
        _whole(args, "needed_bytes"),
        _text(args, "evictable"),
    )
    return error_to_wire(problem) if problem is not None else None


@_op("cache.usage")
async def _cache_usage(client: _Client, _id: int, _args: Mapping[str, Any]) -> Any:
    store = client.host.store

    def usage() -> Message:
        return {
            "path": str(store.root),
            "budget_bytes": store.budget_bytes,
            "used_bytes": store.used_bytes(),
            "free_bytes": free_bytes(store.root),
        }

    return await client.blocking(usage)
