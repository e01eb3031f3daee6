"""WorkerModel: a model handle that lives in a worker process of its own.

librkllmrt.so is native code with known crash paths (a segfault in ``rkllm_init``
when NPU memory runs out, ``abort()`` from ggml asserts, runs that never return).
Each loaded model therefore runs in a child process (:mod:`.worker_child`) that
hosts one :class:`~.runtime.RKLLMModel`; this class offers the same interface
(methods returning ``concurrent.futures.Future``, ``abort`` from any thread,
``close``), so the engine does not care where the handle lives.

One process per model, not one per runtime entry: a model that crashes or wedges
its process takes no other model with it, and killing a wedged process frees
exactly that model's NPU memory.

The worker handles one request at a time, on the thread that read it: further
requests wait here and each is sent when the one before is answered, so a request
never waits in a pipe behind a long run. Aborts go on a pipe of their own and name
the request they stop. Its answers are read on an event loop when given one (the
host's: streamed text then needs no hand-over from another thread), else by a
thread; another thread reads its output. A worker that dies fails every pending call
at once with :class:`~.errors.WorkerDiedError` naming the signal and the runtime's
last lines. A watchdog aborts a run that produces no text for
``stall_timeout`` seconds (plus the expected prefill time before the first token)
and kills the process when the abort does not end the run within ``abort_grace``.
"""

import asyncio
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
import contextlib
from dataclasses import dataclass
import itertools
import json
import logging
import math
import os
from pathlib import Path
import select
import subprocess
import threading
import time
from typing import Any, Final

from .child import child_command, exit_description
from .errors import (
    ModelClosedError,
    ModelInitError,
    RKLLMError,
    RunStalledError,
    WorkerDiedError,
)
from .library import VerifiedLibrary, info_to_wire
from .protocol import (
    decode,
    encode,
    error_from_wire,
    params_to_wire,
    request_to_wire,
    result_from_wire,
)
from .runtime import (
    ModelParams,
    PerfStats,
    RunRequest,
    RunResult,
    TextSink,
    context_limit_in,
    init_failed,
)
from .worker_child import INIT_DONE_MARKER, READY_ID

_LOGGER = logging.getLogger(__name__)

STALL_TIMEOUT: Final = 30.0
"""Seconds a run may go without new text before it is aborted."""
ABORT_GRACE: Final = 5.0
"""Seconds an aborted run may take to end before its process is killed."""
CLOSE_TIMEOUT: Final = 10.0
"""Seconds a closing worker may take to destroy its handle before it is killed."""
OUTPUT_LINES: Final = 30
"""Lines of the runtime's own output kept for error messages and diagnostics."""
PREFILL_MS_PER_TOKEN: Final = 10.0
"""Prefill speed assumed before the first run measured one (slower than any board)."""
CHARS_PER_TOKEN: Final = 3
"""Conservative characters per token, to estimate a prompt's prefill time."""
INIT_TIMEOUT: Final = 300.0
"""Seconds loading the library and the model may take (a large model from an SD card)."""
INIT_LOG_WAIT: Final = 5.0
"""Seconds to wait for the runtime's load log to arrive after rkllm_init returned."""
_TICK: Final = 0.5
OUTPUT_DRAIN_TIMEOUT: Final = 2.0
"""How long a death waits for the runtime's last output lines (the pipe ends with it)."""


@dataclass(slots=True)
class _Call:
    """A request waiting for its answer."""

    op: str
    future: Future[Any]
    convert: Callable[[Any], Any]
    timeout: float
    """Seconds the call may take once sent (a run's text moves its deadline on)."""
    line: bytes = b""
    """The request as sent to the worker."""
    sink: TextSink | None = None
    deadline: float = math.inf
    """When the call counts as stalled (none while it waits to be sent)."""
    stalled_at: float | None = None
    """When the watchdog found it stalled and sent the abort."""


def _unchanged(value: Any) -> Any:
    return value


class WorkerModel:
    """One loaded model in its own worker process (RKLLMModel's interface)."""

    def __init__(
        self,
        library: VerifiedLibrary,
        name: str,
        *,
        stall_timeout: float | None = None,
        abort_grace: float | None = None,
        on_death: Callable[[WorkerDiedError], None] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        """Prepare the worker; init() starts the process and loads the model.

        loop: read the answers on it, so sinks and futures are served on it (close
        must then run off it, as it blocks until the loop saw the worker end).
        """
        self.library = library
        self.name = name
        self.last_perf: PerfStats | None = None
        self.context_limit: int | None = None
        """The model's max_context_limit, as the runtime logged it at init."""
        self.stall_timeout = STALL_TIMEOUT if stall_timeout is None else stall_timeout
        self.abort_grace = ABORT_GRACE if abort_grace is None else abort_grace
        self._on_death = on_death
        self._loop = loop
        self._lock = threading.Lock()
        self._calls: dict[int, _Call] = {}
        self._waiting: deque[int] = deque()
        """Requests not sent yet, in order."""
        self._current: int | None = None
        """The request the worker handles now (sent, not answered)."""
        self._ids = itertools.count(READY_ID + 1)
        self._process: subprocess.Popen[bytes] | None = None
        self._request_fd: int | None = None
        self._abort_fd: int | None = None
        self._answer_fd: int | None = None
        self._buffer = b""
        """Answers read up to an incomplete line."""
        self._reading: asyncio.AbstractEventLoop | None = None
        """The loop that reads the answers, once it does."""
        self._watch_tick: asyncio.TimerHandle | None = None
        self._reaped = threading.Event()
        """Set once the answers ended and the worker's end was handled."""
        self._threads: list[threading.Thread] = []
        self._output_reader: threading.Thread | None = None
        self._output: deque[str] = deque(maxlen=OUTPUT_LINES)
        self._closed = False
        self._death: WorkerDiedError | None = None
        self._init_logged = threading.Event()

    # Lifecycle

    @property
    def pid(self) -> int | None:
        """The worker's process id once started."""
        return self._process.pid if self._process is not None else None

    @property
    def closed(self) -> bool:
        """Whether close() was called."""
        return self._closed

    @property
    def death(self) -> WorkerDiedError | None:
        """Why the worker died, if it did."""
        return self._death

    def output_tail(self) -> list[str]:
        """Return the runtime's last output lines (for messages and diagnostics)."""
        with self._lock:
            return list(self._output)

    def init(self, params: ModelParams) -> Future[None]:
        """Start the worker process and initialise the model in it."""
        future: Future[None] = Future()
        thread = threading.Thread(
            target=self._start,
            args=(params, future),
            name=f"rkllm-worker-start-{self.name}",
            daemon=True,
        )
        thread.start()
        self._threads.append(thread)
        return future

    def _start(self, params: ModelParams, future: Future[None]) -> None:
        """Spawn the worker, wait until its library is loaded, then init the model."""
        ready: Future[None] = Future()
        try:
            self._spawn(ready)
            ready.result()
            self._request(
                "init", {"params": params_to_wire(params)}, timeout=INIT_TIMEOUT
            ).result()
        except ModelInitError as err:
            self.context_limit = self._logged_context_limit()
            code = int(err.placeholders.get("code", "-1"))
            future.set_exception(
                init_failed(params, code, self.context_limit, self.output_tail())
            )
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            future.set_exception(err)
        else:
            self.context_limit = self._logged_context_limit()
            future.set_result(None)

    def _logged_context_limit(self) -> int | None:
        """Return the context limit in the runtime's load log, once it is all here."""
        self._init_logged.wait(INIT_LOG_WAIT)
        return context_limit_in("\n".join(self.output_tail()).encode())

    def _spawn(self, ready: Future[None]) -> None:
        request_read, request_write = os.pipe()
        answer_read, answer_write = os.pipe()
        abort_read, abort_write = os.pipe()
        theirs = (request_read, answer_write, abort_read)
        try:
            process = subprocess.Popen(
                child_command(
                    "worker_child",
                    *(str(fd) for fd in theirs),
                    str(self.library.copy),
                    json.dumps(info_to_wire(self.library.info)),
                    self.name,
                ),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                pass_fds=theirs,
                start_new_session=True,  # a Ctrl-C meant for HA is not the worker's
            )
        except OSError as err:
            for fd in (*theirs, request_write, answer_read, abort_write):
                os.close(fd)
            raise WorkerDiedError(
                f"cannot start the runtime process of {self.name}: {err}",
                model=self.name,
                how=str(err),
            ) from err
        for fd in theirs:
            os.close(fd)
        with self._lock:
            self._process = process
            self._request_fd = request_write
            self._abort_fd = abort_write
            self._calls[READY_ID] = _Call(
                "load the library",
                ready,
                _unchanged,
                INIT_TIMEOUT,
                deadline=time.monotonic() + INIT_TIMEOUT,
            )
            self._answer_fd = answer_read
        self._output_reader = self._start_thread(self._read_output, "output")
        if not self._schedule_reading_on_loop():
            self._start_thread(self._read_answers, "answers")
        _LOGGER.debug(
            "Started the runtime process of %s (pid %s)", self.name, process.pid
        )

    def close(self) -> None:
        """Abort any run, let the worker destroy the handle, and reap it (blocking)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._send_abort()
            request_fd, self._request_fd = self._request_fd, None
            abort_fd, self._abort_fd = self._abort_fd, None
            process = self._process
        for fd in (abort_fd, request_fd):
            if fd is not None:
                os.close(fd)  # the worker destroys the handle and exits
        if process is not None:
            try:
                process.wait(timeout=CLOSE_TIMEOUT)
            except subprocess.TimeoutExpired:
                _LOGGER.warning(
                    "The runtime process of %s did not end within %g s; killing it",
                    self.name,
                    CLOSE_TIMEOUT,
                )
                process.kill()
                process.wait()
            self._wait_reaped()
        current = threading.current_thread()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            if thread is not current:
                thread.join()

    def _wait_reaped(self) -> None:
        """Wait until the worker's end was handled; read its last answers if nobody does.

        A loop that reads them sees the end after the process is gone; once it is
        closed, nobody would: its part is taken over here.
        """
        while not self._reaped.wait(_TICK):
            with self._lock:
                reading = self._reading
                orphaned = reading is not None and reading.is_closed()
                if orphaned:
                    self._reading = None
            if orphaned and self._answer_fd is not None:
                os.set_blocking(self._answer_fd, True)
                self._read_answers()

    # Requests

    def _request(
        self,
        op: str,
        args: dict[str, Any] | None = None,
        *,
        convert: Callable[[Any], Any] = _unchanged,
        sink: TextSink | None = None,
        timeout: float | None = None,
    ) -> Future[Any]:
        """Send a request; its answer (or the watchdog's verdict) completes the future.

        timeout: seconds until the call counts as stalled (default stall_timeout).
        """
        future: Future[Any] = Future()
        with self._lock:
            if self._death is not None:
                raise self._death
            if self._closed or self._request_fd is None:
                raise ModelClosedError(f"model {self.name} is closed")
            request_id = next(self._ids)
            self._calls[request_id] = _Call(
                op,
                future,
                convert,
                self.stall_timeout if timeout is None else timeout,
                encode({"id": request_id, "op": op, "args": args or {}}),
                sink,
            )
            self._waiting.append(request_id)
            self._send_next()
        return future

    def _send_next(self) -> None:
        """Send the next waiting request if the worker is free (holding the lock).

        The worker reads it at once, so the write never waits behind a run.
        """
        while self._current is None and self._waiting:
            request_id = self._waiting.popleft()
            if (
                call := self._calls.get(request_id)
            ) is None or self._request_fd is None:
                continue
            self._current = request_id
            call.deadline = time.monotonic() + call.timeout
            data = call.line
            try:
                while data:
                    data = data[os.write(self._request_fd, data) :]
            except OSError:
                # The worker is gone; its answer thread reports how.
                _LOGGER.debug(
                    "Cannot send %s to the runtime process of %s", call.op, self.name
                )

    def run(self, request: RunRequest, sink: TextSink) -> Future[RunResult]:
        """Run one input; decoded text goes to sink (where the answers are read)."""
        return self._request(
            "run",
            {"request": request_to_wire(request)},
            convert=self._run_result,
            sink=sink,
            timeout=self.stall_timeout + self._expected_prefill_s(request),
        )

    def _expected_prefill_s(self, request: RunRequest) -> float:
        perf = self.last_perf
        ms_per_token = (
            perf.prefill_time_ms / perf.prefill_tokens
            if perf is not None and perf.prefill_tokens
            else PREFILL_MS_PER_TOKEN
        )
        return len(request.prompt) / CHARS_PER_TOKEN * ms_per_token / 1000

    def _run_result(self, data: Any) -> RunResult:
        result = result_from_wire(data)
        if result.perf is not None:
            self.last_perf = result.perf
        if result.aborted and self._closed:
            # Cut short by close() (an unload or reload), not by its caller.
            raise ModelClosedError(
                f"model {self.name} was unloaded while it was answering"
            )
        return result

    def abort(self) -> None:
        """Stop the running generation (safe from any thread)."""
        with self._lock:
            if self._death is None:
                self._send_abort()

    def _send_abort(self) -> None:
        """Ask the worker to abort the request it handles, if any (holding the lock)."""
        if self._abort_fd is not None and self._current is not None:
            with contextlib.suppress(OSError):
                os.write(self._abort_fd, encode({"id": self._current}))

    def load_prompt_cache(self, path: Path) -> Future[None]:
        """Load a prompt cache file for later runs to reuse."""
        return self._request("load_prompt_cache", {"path": str(path)})

    def release_prompt_cache(self) -> Future[None]:
        """Release the loaded prompt cache."""
        return self._request("release_prompt_cache")

    def clear_kv_cache(self, *, keep_system_prompt: bool) -> Future[None]:
        """Clear the KV cache, optionally keeping the system prompt."""
        return self._request(
            "clear_kv_cache", {"keep_system_prompt": keep_system_prompt}
        )

    def set_chat_template(self, system: str, prefix: str, postfix: str) -> Future[None]:
        """Override the chat template (system prompt, user prefix and postfix)."""
        return self._request(
            "set_chat_template",
            {"system": system, "prefix": prefix, "postfix": postfix},
        )

    def set_function_tools(
        self, system: str, tools_json: str, tool_response_tag: str = "tool_response"
    ) -> Future[None]:
        """Set the system prompt and the tools (a JSON array) for tool calling."""
        return self._request(
            "set_function_tools",
            {
                "system": system,
                "tools_json": tools_json,
                "tool_response_tag": tool_response_tag,
            },
        )

    # Reading the answers and the output

    def _start_thread(self, target: Callable[[], None], role: str) -> threading.Thread:
        thread = threading.Thread(
            target=target, name=f"rkllm-worker-{role}-{self.name}", daemon=True
        )
        with self._lock:
            self._threads.append(thread)
        thread.start()
        return thread

    def _read_output(self) -> None:
        """Keep the runtime's last output lines and log them."""
        process = self._process
        assert process is not None and process.stdout is not None
        for raw in process.stdout:
            if raw.rstrip() == INIT_DONE_MARKER:
                self._init_logged.set()
                continue
            line = raw.decode(errors="replace").rstrip()
            if line:
                with self._lock:
                    self._output.append(line)
                _LOGGER.debug("%s: %s", self.name, line)

    def _read_answers(self) -> None:
        """On a thread: dispatch answers and streamed text, watch the run, until the end."""
        fd = self._answer_fd
        assert fd is not None
        while True:
            readable, _, _ = select.select([fd], [], [], _TICK)
            if not readable:
                self._check_watch()
                continue
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            self._feed(chunk)
        self._reap()

    def _schedule_reading_on_loop(self) -> bool:
        """Have the loop read the answers; False without a loop (or a closed one)."""
        if self._loop is None:
            return False
        try:
            self._loop.call_soon_threadsafe(self._read_on_loop, self._loop)
        except RuntimeError:  # closed: a thread reads them
            return False
        return True

    def _read_on_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the loop: read the answers as they come, watch the run every tick."""
        fd = self._answer_fd
        assert fd is not None
        os.set_blocking(fd, False)
        with self._lock:
            self._reading = loop
        loop.add_reader(fd, self._answers_ready, loop, fd)
        self._watch_tick = loop.call_later(_TICK, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self._check_watch()
        self._watch_tick = loop.call_later(_TICK, self._tick, loop)

    def _answers_ready(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        try:
            chunk = os.read(fd, 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if chunk:
            self._feed(chunk)
            return
        # The end: what remains (waiting for the process, its last output) blocks.
        loop.remove_reader(fd)
        if self._watch_tick is not None:
            self._watch_tick.cancel()
        with self._lock:
            self._reading = None
        self._start_thread(self._reap, "end")

    def _feed(self, chunk: bytes) -> None:
        """Dispatch the complete messages in what was read; check the watchdog."""
        *lines, self._buffer = (self._buffer + chunk).split(b"\n")
        for line in lines:
            try:
                message = decode(line)
            except ValueError:
                _LOGGER.warning(
                    "The runtime process of %s sent an unreadable line: %r",
                    self.name,
                    line[:200],
                )
            else:
                self._dispatch(message)
        self._check_watch()

    def _reap(self) -> None:
        """After the answers ended: wait for the process, its last output; report."""
        if self._answer_fd is not None:
            os.close(self._answer_fd)
            self._answer_fd = None
        process = self._process
        assert process is not None
        returncode = process.wait()
        # The runtime's last lines (why it died) may still be in the output pipe.
        if self._output_reader is not None:
            self._output_reader.join(OUTPUT_DRAIN_TIMEOUT)
        self._died(returncode)
        self._reaped.set()

    def _dispatch(self, message: dict[str, Any]) -> None:
        request_id = message.get("id")
        if not isinstance(request_id, int):
            return
        with self._lock:
            if "text" in message:
                call = self._calls.get(request_id)
                if call is not None:
                    call.deadline = time.monotonic() + self.stall_timeout
            else:
                call = self._calls.pop(request_id, None)
                if request_id == self._current:
                    self._current = None
                    self._send_next()
        if call is None:
            return
        if "text" in message:
            if call.sink is not None:
                call.sink(str(message["text"]))
            return
        if call.stalled_at is not None:
            call.future.set_exception(self._stall_error(call))
        elif "error" in message:
            call.future.set_exception(error_from_wire(message["error"]))
        else:
            try:
                call.future.set_result(call.convert(message.get("ok")))
            except RKLLMError as err:
                call.future.set_exception(err)
            except (KeyError, TypeError, ValueError) as err:
                call.future.set_exception(
                    RKLLMError(
                        f"the runtime process of {self.name} sent an unreadable "
                        f"answer: {err}"
                    )
                )

    def _stall_error(self, call: _Call) -> RunStalledError:
        if call.op == "run":
            message = (
                f"{self.name} produced no text for {self.stall_timeout:g} s; "
                "the run was stopped"
            )
        else:
            message = f"the runtime of {self.name} did not finish {call.op} in time"
        return RunStalledError(
            message, model=self.name, seconds=f"{self.stall_timeout:g}"
        )

    def _check_watch(self) -> None:
        """Abort stalled calls; kill the worker when the abort does not end them."""
        now = time.monotonic()
        with self._lock:
            overdue = [
                call
                for call in self._calls.values()
                if call.stalled_at is None and now >= call.deadline
            ]
            for call in overdue:
                call.stalled_at = now
            kill = any(
                call.stalled_at is not None and now - call.stalled_at > self.abort_grace
                for call in self._calls.values()
            )
        if overdue:
            _LOGGER.warning(
                "%s: the runtime is stuck in %s; aborting",
                self.name,
                ", ".join(call.op for call in overdue),
            )
            self.abort()
        if kill and self._process is not None and self._process.poll() is None:
            _LOGGER.error(
                "%s did not stop within %g s of the abort; killing its runtime process",
                self.name,
                self.abort_grace,
            )
            self._process.kill()

    def _died(self, returncode: int) -> None:
        """Fail every pending call: the worker is gone."""
        with self._lock:
            expected = self._closed
            calls, self._calls = self._calls, {}
            self._waiting.clear()
            self._current = None
            tail = "\n".join(self._output) or "(no output)"
            if not expected:
                self._death = WorkerDiedError(
                    f"the runtime process of {self.name} ended ({exit_description(returncode)}); "
                    f"its last output:\n{tail}",
                    model=self.name,
                    how=exit_description(returncode),
                )
            death = self._death
        if death is not None:
            _LOGGER.error("%s", death)
        for call in calls.values():
            if call.stalled_at is not None:
                call.future.set_exception(self._stall_error(call))
            else:
                call.future.set_exception(
                    death or ModelClosedError(f"model {self.name} is closed")
                )
        if death is not None and self._on_death is not None:
            self._on_death(death)
