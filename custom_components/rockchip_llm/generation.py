"""Streaming one run of a model handle into the event loop (no Home Assistant imports).

The handle calls its sink on the loop (a worker on a runtime host) or from another
thread (the binding itself, a worker process); text from another thread reaches
the loop through ``call_soon_threadsafe``. Leaving the iteration early aborts the
run, off the loop, and waits for it to end.
"""

import asyncio
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import Future
import contextlib
import logging
import threading
import time
from typing import Any, Protocol

from .host.rkllm.runtime import PerfStats, RunRequest, RunResult, TextSink

_LOGGER = logging.getLogger(__name__)


class RunHandle(Protocol):
    """What a run needs of a model handle (WorkerModel, RKLLMModel)."""

    def run(
        self, request: RunRequest, sink: TextSink
    ) -> Future[RunResult] | asyncio.Future[RunResult]:
        """Start a run; text goes to sink, the future ends with the result."""

    def abort(self) -> None:
        """Stop the current run (may block until the runtime returns)."""


class _TextBuffer:
    """A run's text on its way to the event loop.

    Text that arrives while the consumer is busy is handed over in one piece at
    its next read: a consumer that falls behind reads fewer, longer texts.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.get_ident()
        self._pieces: list[str] = []
        self._from_other_thread = False
        self._ended = False
        self._waiter: asyncio.Future[None] | None = None

    def push(self, item: str | None) -> None:
        """Add text (None: the run ended), from the loop's thread or any other.

        Text from the loop's thread is added at once; the rest by a callback. Once
        text came from another thread, the end is added by a callback too, after
        those already scheduled: it follows the text still on its way.
        """
        if threading.get_ident() == self._thread:
            if item is None and self._from_other_thread:
                self._loop.call_soon(self._add, item)
            else:
                self._add(item)
            return
        self._from_other_thread = True
        # A closed loop means nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._add, item)

    def _add(self, item: str | None) -> None:
        if item is None:
            self._ended = True
        else:
            self._pieces.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> str | None:
        """Return the text that arrived since the last call; None once the run ended."""
        while not self._pieces:
            if self._ended:
                return None
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        pieces, self._pieces = self._pieces, []
        return "".join(pieces)


class Generation:
    """One streaming run: iterate for text, then read ``result``."""

    def __init__(
        self,
        handle: RunHandle,
        request: RunRequest,
        *,
        gate: asyncio.Lock | None = None,
        on_result: Callable[[RunResult], None] | None = None,
    ) -> None:
        """Prepare the run; it starts when iteration starts.

        gate, when given, is held during the run (runtimes before 1.2.2 run one
        handle at a time); on_result hears of the result of a run that ended.
        """
        self._handle = handle
        self._request = request
        self._gate = gate
        self._on_result = on_result
        self.result: RunResult | None = None
        self.ttft_ms: float | None = None
        """Milliseconds from the start of the run to its first text."""

    async def __aiter__(self) -> AsyncGenerator[str]:
        """Start the run and yield decoded text as the runtime produces it."""
        async with (
            self._gate or contextlib.nullcontext(),
            contextlib.aclosing(self._run()) as texts,
        ):
            async for text in texts:
                yield text

    async def _run(self) -> AsyncGenerator[str]:
        loop = asyncio.get_running_loop()
        texts = _TextBuffer(loop)
        started = time.monotonic()
        future = self._handle.run(self._request, texts.push)
        future.add_done_callback(lambda _: texts.push(None))
        try:
            while (text := await texts.get()) is not None:
                if self.ttft_ms is None:
                    self.ttft_ms = (time.monotonic() - started) * 1000
                yield text
            self.result = await asyncio.wrap_future(future)
            if self._on_result is not None:
                self._on_result(self.result)
        finally:
            if not future.done():
                # rkllm_abort may block until the prefill ends (rknn-llm #400):
                # never on the event loop.
                aborting = loop.run_in_executor(None, self._handle.abort)
                await _wait_quietly(future)
                await _wait_quietly(aborting)

    async def collect(self) -> RunResult:
        """Run to the end, discarding the text, and return the result."""
        async for _text in self:
            pass
        assert self.result is not None
        return self.result


async def _wait_quietly(future: Future[Any] | asyncio.Future[Any]) -> None:
    """Wait for an aborted run (or the abort) to end, even while being cancelled."""
    try:
        await asyncio.shield(asyncio.wrap_future(future))
    except Exception:  # noqa: BLE001 - the run's own error is irrelevant after abort
        _LOGGER.debug("Aborted run ended with an error", exc_info=True)


async def call[T](future: Future[T] | asyncio.Future[T]) -> T:
    """Await a future of a model handle."""
    return await asyncio.wrap_future(future)


def perf_or_zero(perf: PerfStats | None) -> PerfStats:
    """Return perf, or zeros when the runtime gave none (aborted runs)."""
    return perf or PerfStats(0.0, 0, 0.0, 0, 0.0)
