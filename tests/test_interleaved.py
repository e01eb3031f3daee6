"""Conversations that interleave on one model (several voice satellites at once).

Each conversation's follow-up must act on its own latest request: the simulator
reads the whole context as a model does and acts on the latest user turn, so a
follow-up only switches its device when the integration sends the conversation's
own turns as turns, the new request last.
"""

import asyncio
from typing import Any

import pytest

from custom_components.rockchip_llm.const import DOMAIN
from custom_components.rockchip_llm.session import ModelSession
from homeassistant.components import conversation
from homeassistant.components.homeassistant.exposed_entities import async_expose_entity
from homeassistant.core import Context, HomeAssistant
from homeassistant.helpers import chat_session
from homeassistant.setup import async_setup_component

from .conftest import EntryFactory, run_records

AGENT = "conversation.agent_0"
DEVICES = ("Kitchen", "Porch", "Hall", "Attic", "Garage")


async def _devices(hass: HomeAssistant, count: int) -> list[str]:
    """Real switchable entities (input_boolean), exposed to Assist, all off."""
    names = list(DEVICES[:count])
    assert await async_setup_component(hass, "intent", {})
    assert await async_setup_component(
        hass,
        "input_boolean",
        {"input_boolean": {name.lower(): {"name": name} for name in names}},
    )
    for name in names:
        async_expose_entity(
            hass, conversation.DOMAIN, f"input_boolean.{name.lower()}", True
        )
    return names


def _states(hass: HomeAssistant, names: list[str]) -> list[str]:
    return [hass.states.get(f"input_boolean.{name.lower()}").state for name in names]  # type: ignore[union-attr]


def _session(entry: Any) -> ModelSession:
    loaded: ModelSession = next(iter(entry.runtime_data.agents.values())).session
    return loaded


def _requests_read(entry: Any) -> list[tuple[str, str]]:
    """What the simulated model read as the latest request, run by run (no cache builds)."""
    return [
        (run["request_role"], run["request"])
        for run in run_records(entry)
        if run["prompt_cache_saved"] is None
    ]


async def _round(
    hass: HomeAssistant, ids: list[str | None], texts: list[str]
) -> list[conversation.ConversationResult]:
    """One request in each conversation, all at once (queued in this order).

    A cache rebuild queues among them, as an automation's would.
    """
    asks = [
        conversation.async_converse(
            hass, text, conversation_id, Context(), agent_id=AGENT
        )
        for conversation_id, text in zip(ids, texts, strict=True)
    ]
    rebuild = hass.services.async_call(DOMAIN, "rebuild_cache", {}, blocking=True)
    middle = len(asks) // 2
    done = await asyncio.gather(*asks[:middle], rebuild, *asks[middle:])
    return [*done[:middle], *done[middle + 1 :]]


@pytest.mark.parametrize("count", [2, 5])
async def test_interleaved_follow_ups_switch_their_own_device(
    hass: HomeAssistant, make_entry: EntryFactory, count: int
) -> None:
    """Commands in follow-ups of interleaved conversations each switch the device they name.

    Every follow-up finds another conversation in the KV; its answer and tool calls
    belong to its own conversation only.
    """
    names = await _devices(hass, count)
    entry = await make_entry()
    session = _session(entry)
    ids: list[str | None] = [None] * count
    for verb in ("on", "off", "on"):
        results = await _round(hass, ids, [f"turn {verb} the {n}" for n in names])
        assert [r.response.speech["plain"]["speech"] for r in results] == [
            "Done."
        ] * count
        ids = [r.conversation_id for r in results]
        assert _states(hass, names) == [verb] * count
        # Each conversation's turn: its request, then the result of its call.
        read = _requests_read(entry)[-2 * count :]
        assert [role for role, _text in read] == ["user", "tool"] * count
        assert sorted(text for role, text in read if role == "user") == sorted(
            f"turn {verb} the {n}" for n in names
        )
        # Every request finds another conversation in the KV (or none).
        turns = list(session.recent)[-2 * count :]
        assert [run.reused_history for run in turns] == [False, True] * count
    assert len(set(ids)) == count
    for name, conversation_id in zip(names, ids, strict=True):
        with (
            chat_session.async_get_chat_session(hass, conversation_id) as chat,
            conversation.async_get_chat_log(hass, chat) as chat_log,
        ):
            called = [
                call.tool_args["name"]
                for content in chat_log.content
                if isinstance(content, conversation.AssistantContent)
                for call in content.tool_calls or ()
            ]
            asked = [
                content.content
                for content in chat_log.content
                if isinstance(content, conversation.UserContent)
            ]
        assert called == [name] * 3
        assert asked == [f"turn {v} the {name}" for v in ("on", "off", "on")]


async def test_switched_back_follow_up_sees_its_turns_as_turns(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """A conversation coming back to the model re-sends its turns in the chat template's form."""
    names = await _devices(hass, 2)
    entry = await make_entry()
    first = await conversation.async_converse(
        hass, "turn on the Kitchen", None, Context(), agent_id=AGENT
    )
    await conversation.async_converse(
        hass, "turn on the Porch", None, Context(), agent_id=AGENT
    )
    await conversation.async_converse(
        hass, "turn off the Kitchen", first.conversation_id, Context(), agent_id=AGENT
    )
    assert _states(hass, names) == ["off", "on"]
    switched = run_records(entry)[
        -2
    ]  # the follow-up's request (the last run is its tool result)
    assert switched["role"] == "user"
    assert "<|im_start|>assistant\n<tool_call>" in switched["prompt"]
    assert "Porch" not in switched["prompt"]
    assert "Earlier in this conversation" not in switched["prompt"]
    assert switched["prompt"].index("turn on the Kitchen") < switched["prompt"].index(
        "<|im_start|>user\nturn off the Kitchen<|im_end|>"
    )
