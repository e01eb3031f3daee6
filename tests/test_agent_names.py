"""Agents added without a name say what they are; forms fit the kind of agent."""

from typing import Any

from pytest_homeassistant_custom_component.common import MockConfigEntry

from custom_components.rockchip_llm.const import (
    AI_TASK_MAX_NEW_TOKENS,
    CONF_MAX_NEW_TOKENS,
    DOMAIN,
    SUBENTRY_AI_TASK,
    SUBENTRY_CONVERSATION,
)
from custom_components.rockchip_llm.host_device import host_device_identifier
from homeassistant import config_entries
from homeassistant.const import CONF_NAME
from homeassistant.core import HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
from homeassistant.helpers import (
    device_registry as dr,
    issue_registry as ir,
    translation,
)

from .conftest import EntryFactory, ModelWriter


async def open_form(
    hass: HomeAssistant, entry: MockConfigEntry, subentry_type: str
) -> dict[str, Any]:
    """Open the form that adds an agent of subentry_type."""
    result = await hass.config_entries.subentries.async_init(
        (entry.entry_id, subentry_type),
        context={"source": config_entries.SOURCE_USER},
    )
    assert result["type"] is FlowResultType.FORM
    return dict(result)


def suggested(form: dict[str, Any]) -> dict[str, Any]:
    """What the form suggests: what a user who only presses Submit sends."""
    return {
        str(key): key.description["suggested_value"]
        for key in form["data_schema"].schema
        if key.description and "suggested_value" in key.description
    }


async def add_agent(
    hass: HomeAssistant, entry: MockConfigEntry, subentry_type: str, name: str = ""
) -> dict[str, Any]:
    """Add an agent with the form's suggestions and name; return the flow's result."""
    form = await open_form(hass, entry, subentry_type)
    result = await hass.config_entries.subentries.async_configure(
        form["flow_id"], {CONF_NAME: name, **suggested(form)}
    )
    await hass.async_block_till_done()
    return dict(result)


async def test_unnamed_agents_get_names_of_their_own(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """Without a name: model and kind, numbered when taken; devices read the same."""
    entry = await make_entry()
    titles = []
    for subentry_type in (SUBENTRY_AI_TASK, SUBENTRY_AI_TASK, SUBENTRY_CONVERSATION):
        result = await add_agent(hass, entry, subentry_type)
        assert result["type"] is FlowResultType.CREATE_ENTRY
        titles.append(result["title"])
    assert titles == [
        "Qwen3 Sim AI Task",
        "Qwen3 Sim AI Task 2",
        "Qwen3 Sim Conversation",
    ]
    devices = dr.async_entries_for_config_entry(dr.async_get(hass), entry.entry_id)
    agents = [d for d in devices if host_device_identifier(entry) not in d.identifiers]
    assert sorted(device.name for device in agents) == sorted(["Agent 0", *titles])


async def test_a_name_in_use_is_refused(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """A typed name that another agent has is a field error; nothing is added."""
    entry = await make_entry()
    form = await open_form(hass, entry, SUBENTRY_AI_TASK)
    result = await hass.config_entries.subentries.async_configure(
        form["flow_id"], {CONF_NAME: " Agent 0 ", **suggested(form)}
    )
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {CONF_NAME: "name_in_use"}
    assert len(entry.subentries) == 1
    texts = await translation.async_get_translations(
        hass, "en", "config_subentries", [DOMAIN]
    )
    for kind in (SUBENTRY_CONVERSATION, SUBENTRY_AI_TASK):
        key = f"component.{DOMAIN}.config_subentries.{kind}.error.name_in_use"
        assert "already has this name" in texts[key]


async def test_repairs_tell_the_agents_apart(
    hass: HomeAssistant, make_entry: EntryFactory, write_model: ModelWriter
) -> None:
    """When the model fails, each agent's repair names that agent, not the model."""
    entry = await make_entry()
    for subentry_type in (SUBENTRY_AI_TASK, SUBENTRY_CONVERSATION):
        await add_agent(hass, entry, subentry_type)
    write_model(extra=("init_error 1",))
    await hass.config_entries.async_reload(entry.entry_id)
    await hass.async_block_till_done()
    named = {
        issue.translation_placeholders["agent"]
        for issue in ir.async_get(hass).issues.values()
        if issue.domain == DOMAIN and issue.translation_key == "agent_failed"
    }
    assert named == {subentry.title for subentry in entry.subentries.values()}
    assert named == {"Agent 0", "Qwen3 Sim AI Task", "Qwen3 Sim Conversation"}


async def test_agent_forms_fit_their_kind_and_show_the_limit(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """AI Task answers start longer than voice answers; both forms show the model's limit."""
    entry = await make_entry()
    chat = await open_form(hass, entry, SUBENTRY_CONVERSATION)
    task = await open_form(hass, entry, SUBENTRY_AI_TASK)
    assert suggested(chat)[CONF_MAX_NEW_TOKENS] == 256
    assert suggested(task)[CONF_MAX_NEW_TOKENS] == AI_TASK_MAX_NEW_TOKENS == 1024
    for form in (chat, task):
        assert form["description_placeholders"]["model_limits"] == (
            "Qwen3 Sim: 4,096 tokens"
        )
    texts = await translation.async_get_translations(
        hass, "en", "config_subentries", [DOMAIN]
    )
    base = f"component.{DOMAIN}.config_subentries"
    for step in ("set_options", "reconfigure"):
        task_help = texts[
            f"{base}.{SUBENTRY_AI_TASK}.step.{step}.data_description.max_new_tokens"
        ]
        assert "Voice" not in task_help
        assert "JSON" in task_help
        for kind in (SUBENTRY_CONVERSATION, SUBENTRY_AI_TASK):
            assert "{model_limits}" in texts[f"{base}.{kind}.step.{step}.description"]


async def test_the_model_step_promises_no_sizes_it_does_not_show(
    hass: HomeAssistant,
) -> None:
    """Simulated models are listed without a size: the step does not promise one."""
    texts = await translation.async_get_translations(hass, "en", "config", [DOMAIN])
    step = f"component.{DOMAIN}.config.step.model"
    assert "size" not in texts[f"{step}.description"]
    assert "simulated models are marked" in texts[f"{step}.data_description.model"]
