"""A request starts on the model while Home Assistant renders its prompt."""

import asyncio
from typing import Any

import pytest

from homeassistant.components import conversation
from homeassistant.components.homeassistant.exposed_entities import async_expose_entity
from homeassistant.core import HomeAssistant
from homeassistant.helpers import intent

from .conftest import EntryFactory, last_run_record, run_records
from .sim_words import words
from .test_conversation import converse, model_session, speech

HELLO = "Hello from the simulator."


async def test_a_follow_up_runs_while_its_prompt_renders(
    hass: HomeAssistant, make_entry: EntryFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model has run a follow-up before Home Assistant rendered its prompt.

    The rendering waits here until the worker ran the request: without the early
    start the run would begin only after it, and the rendering would time out.
    """
    entry = await make_entry()
    loaded = model_session(entry)
    first = await converse(hass, "hello")
    render = conversation.ChatLog.async_provide_llm_data
    runs_before = len(run_records(entry))
    rendered_after: list[int] = []

    async def render_after_the_run(
        chat_log: conversation.ChatLog, *args: Any, **kwargs: Any
    ) -> None:
        async def runs() -> int:
            return len(await hass.async_add_executor_job(run_records, entry))

        async with asyncio.timeout(10):
            while await runs() == runs_before:
                await asyncio.sleep(0.01)
        rendered_after.append(await runs())
        await render(chat_log, *args, **kwargs)

    monkeypatch.setattr(
        conversation.ChatLog, "async_provide_llm_data", render_after_the_run
    )
    result = await converse(hass, "hello again", first.conversation_id)
    assert speech(result) == HELLO
    assert rendered_after == [runs_before + 1]
    record = last_run_record(entry)
    assert record["prompt"].count("hello again") == 1
    assert "hello\n" not in record["prompt"]  # the first turn is in the KV already
    assert [run.reused_history for run in loaded.recent] == [False, True]


async def test_a_prompt_that_changed_is_answered_with_the_new_one(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """An early run with the previous prompt is dropped; the turn runs with the new one.

    The next follow-up continues the KV of that turn.
    """
    hass.states.async_set("light.porch", "off", {"friendly_name": "Porch light"})
    async_expose_entity(hass, conversation.DOMAIN, "light.porch", False)
    entry = await make_entry()
    loaded = model_session(entry)
    first = await converse(hass, "hello")
    assert "Porch light" not in last_run_record(entry)["system"]
    async_expose_entity(hass, conversation.DOMAIN, "light.porch", True)

    result = await converse(hass, "hello again", first.conversation_id)
    assert speech(result) == HELLO
    answered = last_run_record(entry)
    assert "Porch light" in answered["system"]
    # The KV of the new prompt held no turn yet: both were sent.
    assert answered["prompt"].count("hello again") == 1
    assert answered["prompt"].count("hello") == 2
    assert [run.reused_history for run in loaded.recent] == [False, False]
    assert not loaded.busy

    third = await converse(hass, "and once more", first.conversation_id)
    assert speech(third) == HELLO
    assert loaded.recent[-1].reused_history
    assert "Porch light" in last_run_record(entry)["system"]


@pytest.mark.parametrize(
    "runtime",
    [
        pytest.param({}, id="streaming"),
        # rkllm_abort returns only once the prefill ended (rknn-llm #400).
        pytest.param(
            {"prefill_ms_per_token": 3, "extra": ("abort_after_prefill 1",)},
            id="abort-after-prefill",
        ),
    ],
)
async def test_an_early_run_with_the_previous_prompt_is_aborted(
    hass: HomeAssistant, make_entry: EntryFactory, runtime: dict[str, Any]
) -> None:
    """An early run with the old prompt is aborted before the turn runs again.

    Also when the runtime's abort waits for the prefill: the turn waits for it.
    """
    reply = words(100)
    hass.states.async_set("light.porch", "off", {"friendly_name": "Porch light"})
    async_expose_entity(hass, conversation.DOMAIN, "light.porch", False)
    entry = await make_entry(
        model_kwargs={
            "replies": (f"default => {reply}",),
            "decode_ms_per_token": 5,
            **runtime,
        }
    )
    first = await converse(hass, "hello")
    async_expose_entity(hass, conversation.DOMAIN, "light.porch", True)

    result = await converse(hass, "hello again", first.conversation_id)
    assert speech(result) == reply
    early, answered = run_records(entry)[-2:]
    assert early["aborted"] is True
    assert "Porch light" not in early["system"]
    assert answered["aborted"] is False
    assert "Porch light" in answered["system"]


async def test_only_a_model_left_with_the_agents_prompt_starts_early(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """A model another agent left with its prompt waits for the rendered prompt.

    The guess (the agent's previous prompt) would put a prompt on the handle that
    the turn may not need; a busy model would make it wait before rendering.
    """
    entry = await make_entry({}, {"prompt": "Answer like a pirate."})
    agent = next(iter(entry.runtime_data.agents.values()))
    loaded = model_session(entry)
    first = await converse(hass, "hello")
    await converse(hass, "ahoy", agent="conversation.agent_1")
    assert agent.start_turn_early(None, list) is None

    result = await converse(hass, "hello again", first.conversation_id)
    assert speech(result) == HELLO
    early = agent.start_turn_early(None, list)
    assert early is not None
    await early.async_end()
    assert not loaded.busy
    async with loaded._lock:
        assert agent.start_turn_early(None, list) is None
    assert agent.start_turn_early("another device", list) is None


async def test_a_prompt_that_fails_to_render_releases_the_model(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """A rendering error is answered; the early run ends and the model is free."""
    hass.states.async_set("sensor.divisor", "1")
    entry = await make_entry(
        {"prompt": "Be brief. {{ 1 // (states('sensor.divisor') | int) }}"}
    )
    loaded = model_session(entry)
    first = await converse(hass, "hello")
    assert speech(first) == HELLO
    hass.states.async_set("sensor.divisor", "0")

    failed = await converse(hass, "hello again", first.conversation_id)
    assert failed.response.response_type is intent.IntentResponseType.ERROR
    assert "template" in speech(failed)
    assert not loaded.busy
    assert len(loaded.recent) == 1  # the early run is not the turn's

    hass.states.async_set("sensor.divisor", "1")
    again = await converse(hass, "and again", first.conversation_id)
    assert speech(again) == HELLO


async def test_cancelling_a_follow_up_aborts_its_early_run(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """A follow-up cancelled while it streams aborts the run and frees the model."""
    entry = await make_entry(
        model_kwargs={
            "replies": ("reply user short => Fine.", f"default => {words(500)}"),
            "decode_ms_per_token": 5,
        }
    )
    loaded = model_session(entry)
    first = await converse(hass, "short")
    assert speech(first) == "Fine."
    running = hass.async_create_task(converse(hass, "long", first.conversation_id))
    async with asyncio.timeout(10):
        while not loaded.busy:
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert not loaded.busy
    assert last_run_record(entry)["aborted"] is True
    assert loaded.kv_messages is None

    again = await converse(hass, "short")
    assert speech(again) == "Fine."
