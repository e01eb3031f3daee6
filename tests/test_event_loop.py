"""Nothing of ours blocks Home Assistant's event loop."""

import asyncio
from collections.abc import AsyncIterator
import time

import pytest

from custom_components.rockchip_llm.host.model_files import model_fingerprint
from homeassistant.components import conversation
from homeassistant.core import Context, HomeAssistant

from .conftest import EntryFactory, ModelWriter

SLOW_CALLBACK_SECONDS = 0.1
"""Twenty times the longest step of HA's own work in these tests on an idle machine
(5 ms), and shorter than any wait on the worker there: its model loads for 300 ms,
prefills at 1 ms and decodes at 10 ms a token."""


@pytest.fixture
async def slow_callbacks(
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[list[str]]:
    """The loop's callbacks that ran longer than SLOW_CALLBACK_SECONDS.

    Timed around each handle, like asyncio's debug mode (which the HA test plugin
    turns on) but with that mode off: its stack capture at every task and future
    alone tripled HA's own setup steps.
    """
    slow: list[str] = []
    run = asyncio.events.Handle._run
    loop = asyncio.get_running_loop()
    loop.set_debug(False)

    def timed_run(handle: asyncio.Handle) -> None:
        started = time.perf_counter()
        run(handle)
        took = time.perf_counter() - started
        if took > SLOW_CALLBACK_SECONDS:
            slow.append(f"{_describe(handle)} took {took:.3f} s")

    monkeypatch.setattr(asyncio.events.Handle, "_run", timed_run)
    yield slow
    loop.set_debug(True)


def _describe(handle: asyncio.Handle) -> str:
    """The task a handle steps, else the handle."""
    owner = getattr(handle._callback, "__self__", None)  # noqa: SLF001
    return repr(owner) if isinstance(owner, asyncio.Task) else repr(handle)


async def test_blocking_call_detection_is_on(
    hass: HomeAssistant, write_model: ModelWriter, blocking_calls: list[str]
) -> None:
    """The suite runs with HA's detection: our code doing file I/O in the loop is caught."""
    model_fingerprint(
        write_model()
    )  # provoking it is the point: it belongs in the executor
    assert len(blocking_calls) == 1
    assert "Detected blocking call to open" in blocking_calls[0]
    blocking_calls.clear()


async def test_slow_callback_watch_catches_a_blocked_loop(
    hass: HomeAssistant, slow_callbacks: list[str]
) -> None:
    """The watch is live: busy work HA's blocking-call detection cannot see is reported."""

    def spin() -> None:
        until = time.perf_counter() + SLOW_CALLBACK_SECONDS * 1.5
        while time.perf_counter() < until:
            pass

    done = hass.loop.create_future()
    hass.loop.call_soon(spin)
    hass.loop.call_soon(done.set_result, None)
    await done
    assert len(slow_callbacks) == 1
    assert "spin" in slow_callbacks[0]


async def test_no_slow_callbacks(
    hass: HomeAssistant, make_entry: EntryFactory, slow_callbacks: list[str]
) -> None:
    """Setup, a cache rebuild and a streamed dialogue never hold the loop."""
    entry = await make_entry(
        model_kwargs={
            "prefill_ms_per_token": 1,
            "decode_ms_per_token": 10,
            "extra": ("init_ms 300",),
        }
    )
    await hass.services.async_call("rockchip_llm", "rebuild_cache", {}, blocking=True)
    conversation_id = None
    for text in ("hello", "and again", "turn on the kitchen"):
        result = await conversation.async_converse(
            hass, text, conversation_id, Context(), agent_id="conversation.agent_0"
        )
        conversation_id = result.conversation_id
    await hass.config_entries.async_unload(entry.entry_id)
    assert slow_callbacks == []


async def test_abort_waits_off_the_loop(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """An abort that only lands after the prefill (rknn-llm #400) never holds the loop."""
    entry = await make_entry(
        model_kwargs={
            "prefill_ms_per_token": 3,
            "extra": ("abort_after_prefill 1",),
        }
    )
    loaded = next(iter(entry.runtime_data.agents.values())).session
    loop = asyncio.get_running_loop()
    ticks: list[float] = []

    async def heartbeat() -> None:
        while True:
            ticks.append(loop.time())
            await asyncio.sleep(0.01)

    beat = hass.async_create_background_task(heartbeat(), "heartbeat")
    request = hass.async_create_task(
        conversation.async_converse(
            hass, "ab " * 300, None, Context(), agent_id="conversation.agent_0"
        )
    )
    while not loaded.busy:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    started = loop.time()
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    waited = loop.time() - started
    ticks.append(loop.time())
    beat.cancel()
    assert waited > 0.4  # the run went on until its prefill was done
    gaps = [later - earlier for earlier, later in zip(ticks, ticks[1:], strict=False)]
    assert max(gaps) < 0.35  # blocked, the loop would stall for the ~0.8 s prefill
    assert not loaded.busy
