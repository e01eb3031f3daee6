"""A turn's first run, started while Home Assistant renders the Assist prompt.

Rendering the prompt (``async_provide_llm_data``) takes Home Assistant about as long
as a run's round trip to the model's worker. A request from a device whose last
request carried a known prefix starts its turn with that prefix at once, so both
happen together; the run's text waits until the rendered prefix is known. The same
prefix takes the turn over; another one aborts the run and releases the model, and
the turn starts again with the rendered prefix.
"""

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
import contextlib

from .turn import Conversation, MessageSource


class EarlyTurn:
    """A turn held with the prefix a request is expected to carry, its run started."""

    def __init__(
        self,
        turn: contextlib.AbstractAsyncContextManager[Conversation],
        prefix_key: str,
        messages: MessageSource,
        volatile: str,
    ) -> None:
        """Hold the model with turn and start its first run on messages, at once."""
        self.prefix_key = prefix_key
        self._stack = contextlib.AsyncExitStack()
        self._reply: AsyncGenerator[str] | None = None
        self._start = asyncio.Task(
            self._async_start(turn, messages, volatile), eager_start=True
        )

    async def _async_start(
        self,
        turn: contextlib.AbstractAsyncContextManager[Conversation],
        messages: MessageSource,
        volatile: str,
    ) -> tuple[Conversation, str | None]:
        """Take the model and run until the first text (None: the reply is empty)."""
        try:
            conversation = await self._stack.enter_async_context(turn)
            self._reply = conversation.reply(messages, volatile=volatile)
            first = await anext(self._reply, None)
        except BaseException:
            await self._async_close(None)
            raise
        return conversation, first

    async def async_take(
        self, prefix_key: str
    ) -> tuple[Conversation, AsyncIterator[str]] | None:
        """Take the turn and its reply over if prefix_key is the one expected.

        Another prefix ends the early turn (None). With the expected one, an error
        of the early start is the turn's own and is raised here.
        """
        if prefix_key != self.prefix_key:
            await self.async_end()
            return None
        conversation, first = await self._start
        return conversation, self._continued(first)

    async def _continued(self, first: str | None) -> AsyncGenerator[str]:
        if first is None or self._reply is None:
            return
        yield first
        async for text in self._reply:
            yield text

    async def async_end(self, error: BaseException | None = None) -> None:
        """Abort the run if it still runs and release the model.

        error, when given, is what ended the turn (the model's KV is then unknown).
        """
        if not self._start.done():
            self._start.cancel()
        try:
            await self._start
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
            return  # the start released the model itself
        except Exception:  # noqa: BLE001 - the start's own error: it released the model
            return
        await self._async_close(error)

    async def _async_close(self, error: BaseException | None) -> None:
        if self._reply is not None:
            await self._reply.aclose()  # aborts a run that still runs
        if error is None:
            await self._stack.aclose()
        else:
            await self._stack.__aexit__(type(error), error, error.__traceback__)
