"""Nothing of ours blocks Home Assistant's event loop."""

import asyncio
import logging

import pytest

from custom_components.rockchip_llm.model_files import model_fingerprint
from homeassistant.components import conversation
from homeassistant.core import Context, HomeAssistant

from .conftest import EntryFactory, ModelWriter

SLOW_CALLBACK_SECONDS = 0.05


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


async def test_no_slow_callbacks(
    hass: HomeAssistant, make_entry: EntryFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Setup, a cache rebuild and a streamed dialogue never hold the loop for 50 ms."""
    loop = asyncio.get_running_loop()
    loop.set_debug(True)
    loop.slow_callback_duration = SLOW_CALLBACK_SECONDS
    caplog.set_level(logging.WARNING, logger="asyncio")
    entry = await make_entry(
        model_kwargs={"prefill_ms_per_token": 0.2, "decode_ms_per_token": 2}
    )
    await hass.services.async_call("rockchip_llm", "rebuild_cache", {}, blocking=True)
    conversation_id = None
    for text in ("hello", "and again", "turn on the kitchen"):
        result = await conversation.async_converse(
            hass, text, conversation_id, Context(), agent_id="conversation.agent_0"
        )
        conversation_id = result.conversation_id
    await hass.config_entries.async_unload(entry.entry_id)
    slow = [
        record.getMessage()
        for record in caplog.records
        if "took" in record.getMessage()
    ]
    assert slow == []


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
