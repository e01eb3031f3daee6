"""The runtime worker process: one RKLLMModel, driven by messages from its parent.

Started by :class:`~.worker.WorkerModel` through :mod:`.child`. Requests arrive on one
pipe and run one at a time on the main thread, the one that read them (no hand-over
to another thread); answers and streamed text leave on another pipe (see
:mod:`.protocol`). Aborts come on a third pipe, read by a thread of their own, each
naming the request it stops. The runtime's own output (``I rkllm: …``,
``E RKLLM: …``) goes to stdout and stderr, which the parent reads. When the request
pipe closes, the worker destroys the handle and exits.
"""

from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
import contextlib
import ctypes
import functools
import json
import os
from pathlib import Path
import threading
from typing import Any, Final, TypeAlias

from .child import disable_core_dumps
from .errors import RKLLMError
from .library import info_from_wire, load_copy
from .protocol import (
    Message,
    decode,
    encode,
    error_to_wire,
    params_from_wire,
    request_from_wire,
    result_to_wire,
)
from .runtime import ModelParams, RKLLMModel, RunResult

_IOLBF: Final = 1
READY_ID: Final = 0
"""The id of the message that says the library is loaded (or why not)."""
INIT_DONE_MARKER: Final = b"rockchip_llm: model init returned"
"""Written to the output after rkllm_init: what came before is its load log."""


class _Writer:
    """Writes messages to the parent from any thread."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()

    def send(self, message: Message) -> None:
        data = encode(message)
        with self._lock:
            try:
                while data:
                    data = data[os.write(self._fd, data) :]
            except BrokenPipeError:
                pass  # the parent is gone; the request pipe's end stops us

    def answer(
        self, request_id: int, future: Future[Any], *, wire: Callable[[Any], Any]
    ) -> None:
        """Send a future's value (converted by wire) or its error."""
        try:
            value = future.result()
        except Exception as err:  # noqa: BLE001 - every error goes to the parent
            self.send({"id": request_id, "error": error_to_wire(err)})
        else:
            self.send({"id": request_id, "ok": wire(value)})


def _stream(out: _Writer, request_id: int, text: str) -> None:
    """Send a run's text as it is generated."""
    out.send({"id": request_id, "text": text})


def _unchanged(value: Any) -> Any:
    return value


def _result(value: RunResult) -> Message:
    return result_to_wire(value)


def _init(model: RKLLMModel, params: ModelParams) -> Future[None]:
    """Initialise the model, then mark the end of its load log in the output."""
    done: Future[None] = Future()

    def finish(init: Future[None]) -> None:
        os.write(2, INIT_DONE_MARKER + b"\n")  # after all the runtime printed
        if (error := init.exception()) is not None:
            done.set_exception(error)
        else:
            done.set_result(None)

    model.init(params).add_done_callback(finish)
    return done


_Call: TypeAlias = Callable[[RKLLMModel, Mapping[str, Any]], Future[Any]]

_CALLS: Final[Mapping[str, _Call]] = {
    "init": lambda model, args: _init(model, params_from_wire(args["params"])),
    "load_prompt_cache": lambda model, args: model.load_prompt_cache(
        Path(args["path"])
    ),
    "release_prompt_cache": lambda model, _args: model.release_prompt_cache(),
    "clear_kv_cache": lambda model, args: model.clear_kv_cache(
        keep_system_prompt=bool(args["keep_system_prompt"])
    ),
    "set_chat_template": lambda model, args: model.set_chat_template(
        args["system"], args["prefix"], args["postfix"]
    ),
    "set_function_tools": lambda model, args: model.set_function_tools(
        args["system"], args["tools_json"], args["tool_response_tag"]
    ),
}


class _Handling:
    """The request the main thread handles now, so an abort stops only the one it names."""

    def __init__(self, model: RKLLMModel) -> None:
        self._model = model
        self._lock = threading.Lock()
        self._request_id: int | None = None

    @contextlib.contextmanager
    def request(self, request_id: int) -> Iterator[None]:
        """Mark request_id as the one being handled while the block runs."""
        with self._lock:
            self._request_id = request_id
        try:
            yield
        finally:
            with self._lock:
                self._request_id = None

    def abort(self, request_id: int) -> None:
        """Abort the run of request_id if it is the one being handled (any thread)."""
        with self._lock:
            if self._request_id == request_id:
                self._model.abort()


def _serve(model: RKLLMModel, out: _Writer, commands: Any, handling: _Handling) -> None:
    """Handle requests on this thread until the request pipe closes."""
    for line in commands:
        message = decode(line)
        request_id = int(message["id"])
        op = message["op"]
        args: Mapping[str, Any] = message.get("args", {})
        with handling.request(request_id):
            try:
                if op == "run":
                    future: Future[Any] = model.run(
                        request_from_wire(args["request"]),
                        functools.partial(_stream, out, request_id),
                    )
                    wire: Callable[[Any], Any] = _result
                else:
                    future = _CALLS[op](model, args)
                    wire = _unchanged
            except RKLLMError as err:
                future = Future()
                future.set_exception(err)
                wire = _unchanged
        # Answered once no abort can reach it any more.
        out.answer(request_id, future, wire=wire)


def _watch_aborts(handling: _Handling, fd: int) -> None:
    """Abort the run each line of the abort pipe names, until the pipe closes."""
    with os.fdopen(fd, "rb") as aborts:
        for line in aborts:
            handling.abort(int(decode(line)["id"]))


def _line_buffer_stdout() -> None:
    """Make C stdio flush stdout per line: a pipe would hold the runtime's lines."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        libc = ctypes.CDLL(None)
        stdout = ctypes.c_void_p.in_dll(libc, "stdout")
        libc.setvbuf(stdout, None, _IOLBF, 0)


def _child_main(argv: list[str]) -> int:
    """Run in the worker: load the library, serve requests, destroy the handle."""
    request_fd, answer_fd, abort_fd = int(argv[0]), int(argv[1]), int(argv[2])
    copy, info, name = Path(argv[3]), info_from_wire(json.loads(argv[4])), argv[5]
    disable_core_dumps()
    out = _Writer(answer_fd)
    try:
        library = load_copy(copy, info)
    except RKLLMError as err:
        out.send({"id": READY_ID, "error": error_to_wire(err)})
        return 1
    _line_buffer_stdout()
    model = RKLLMModel(library, name, read_init_log=False, own_thread=False)
    handling = _Handling(model)
    threading.Thread(
        target=_watch_aborts,
        args=(handling, abort_fd),
        name="rkllm-aborts",
        daemon=True,  # ends when the parent closes the abort pipe, or with us
    ).start()
    out.send({"id": READY_ID, "ok": None})
    try:
        with os.fdopen(request_fd, "rb") as commands:
            _serve(model, out, commands, handling)
    finally:
        model.close()
    return 0
