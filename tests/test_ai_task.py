"""AI Task agents through ai_task.async_generate_data, as an automation calls them."""

import pytest
import voluptuous as vol

from homeassistant.components import ai_task
from homeassistant.core import HomeAssistant
from homeassistant.exceptions import HomeAssistantError
from homeassistant.setup import async_setup_component

from .conftest import EntryFactory

TASK = "ai_task.task_0"
STRUCTURE = vol.Schema({vol.Required("name"): str, vol.Required("count"): int})


@pytest.fixture
async def ai_task_ready(hass: HomeAssistant, ha_base: None) -> None:
    """Set up the AI Task integration."""
    assert await async_setup_component(hass, "ai_task", {})


async def test_generate_text(
    hass: HomeAssistant, ai_task_ready: None, make_entry: EntryFactory
) -> None:
    """Free text comes back as it was generated."""
    await make_entry(
        ai_tasks=({},), model_kwargs={"replies": ("default => Three lights are on.",)}
    )
    result = await ai_task.async_generate_data(
        hass, task_name="count", entity_id=TASK, instructions="How many lights are on?"
    )
    assert result.data == "Three lights are on."


async def test_generate_structured(
    hass: HomeAssistant, ai_task_ready: None, make_entry: EntryFactory
) -> None:
    """A requested structure is parsed and validated."""
    await make_entry(
        ai_tasks=({},),
        model_kwargs={
            "replies": ('default => ```json\\n{"name": "Kitchen", "count": 3}\\n```',)
        },
    )
    result = await ai_task.async_generate_data(
        hass,
        task_name="lights",
        entity_id=TASK,
        instructions="Summarise the lights",
        structure=STRUCTURE,
    )
    assert result.data == {"name": "Kitchen", "count": 3}


async def test_structured_retry_with_error(
    hass: HomeAssistant, ai_task_ready: None, make_entry: EntryFactory
) -> None:
    """An invalid reply is retried once with the parse error fed back."""
    entry = await make_entry(
        ai_tasks=({},),
        model_kwargs={
            "replies": (
                'reply user not valid JSON => {"name": "Hall", "count": 1}',
                "default => The hall has one light.",
            )
        },
    )
    result = await ai_task.async_generate_data(
        hass,
        task_name="lights",
        entity_id=TASK,
        instructions="Summarise the lights",
        structure=STRUCTURE,
    )
    assert result.data == {"name": "Hall", "count": 1}
    agent = next(a for a in entry.runtime_data.agents.values() if not a.chat)
    assert len(agent.session.recent) == 2


async def test_structured_gives_up(
    hass: HomeAssistant, ai_task_ready: None, make_entry: EntryFactory
) -> None:
    """Two invalid replies give a clear error."""
    await make_entry(
        ai_tasks=({},), model_kwargs={"replies": ('default => {"name": "Hall"}',)}
    )
    with pytest.raises(
        HomeAssistantError, match="did not return valid structured data.*does not match"
    ):
        await ai_task.async_generate_data(
            hass,
            task_name="lights",
            entity_id=TASK,
            instructions="Summarise",
            structure=STRUCTURE,
        )


async def test_ai_task_shares_the_conversation_model(
    hass: HomeAssistant, ai_task_ready: None, make_entry: EntryFactory
) -> None:
    """A conversation agent and an AI Task agent on one model share the handle."""
    entry = await make_entry({}, ai_tasks=({},))
    chat, task = entry.runtime_data.agents.values()
    assert chat.session is task.session
    assert chat.system_cache is not None
    assert chat.system_cache.cache is not None
    assert task.system_cache is None
    assert hass.states.get(TASK) is not None


async def test_nul_in_instructions_is_refused(
    hass: HomeAssistant, ai_task_ready: None, make_entry: EntryFactory
) -> None:
    """Instructions with a NUL are refused clearly, never cut at the NUL."""
    entry = await make_entry(ai_tasks=({},))
    with pytest.raises(HomeAssistantError) as err:
        await ai_task.async_generate_data(
            hass, task_name="cut", entity_id=TASK, instructions="count\0the lights"
        )
    assert str(err.value).startswith("There is a NUL character in the instructions,")
    loaded = next(iter(entry.runtime_data.agents.values())).session
    assert not loaded.recent
