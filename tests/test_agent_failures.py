"""One agent that cannot run is reported on its own; the entry and the others stay up.

Where people look: its repair (with a fix flow), its entities (unavailable), its
Assist answer (one sentence: what is wrong, where to fix it) and diagnostics.
"""

import json
from pathlib import Path
from typing import Any

import pytest
from pytest_homeassistant_custom_component.common import MockConfigEntry
from pytest_homeassistant_custom_component.components.diagnostics import (
    get_diagnostics_for_config_entry,
)
from pytest_homeassistant_custom_component.typing import ClientSessionGenerator

from custom_components.rockchip_llm.const import DOMAIN
from homeassistant.components import ai_task, conversation
from homeassistant.config_entries import ConfigEntryState
from homeassistant.const import STATE_UNAVAILABLE
from homeassistant.core import Context, HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers import (
    device_registry as dr,
    entity_registry as er,
    issue_registry as ir,
)
from homeassistant.setup import async_setup_component

from .conftest import (
    PACKAGE,
    EntryFactory,
    ModelWriter,
    agent_issue_error,
    agent_issues,
    sim_counter,
)
from .test_repairs import start_fix, submit_fix

BROKEN = "conversation.agent_0"
HEALTHY = "conversation.agent_1"
EXCEPTIONS = json.loads((PACKAGE / "translations" / "en.json").read_text())[
    "exceptions"
]


def answer_text(key: str, **placeholders: object) -> str:
    """The translated answer of a failed agent, as Assist says it."""
    return str(EXCEPTIONS[key]["message"]).format(**placeholders)


async def answer(hass: HomeAssistant, agent: str) -> str:
    """Ask an agent and return its plain speech."""
    result = await conversation.async_converse(
        hass, "hello", None, Context(), agent_id=agent
    )
    text: str = result.response.speech["plain"]["speech"]
    return text


def subentry_of(entry: MockConfigEntry, title: str) -> str:
    """The subentry id of the agent titled title."""
    return next(sid for sid, sub in entry.subentries.items() if sub.title == title)


def agent_entities(hass: HomeAssistant, subentry_id: str) -> dict[str, str]:
    """The states of an agent's enabled entities, by the key of their unique id."""
    registry = er.async_get(hass)
    states: dict[str, str] = {}
    for entity in er.async_entries_for_config_entry(
        registry, next(iter(hass.config_entries.async_entries(DOMAIN))).entry_id
    ):
        if entity.config_subentry_id != subentry_id or entity.disabled_by:
            continue
        key = entity.unique_id.removeprefix(subentry_id).lstrip("_") or entity.domain
        state = hass.states.get(entity.entity_id)
        assert state is not None, entity.entity_id
        states[key] = state.state
    return states


async def diagnostics_agent(
    hass: HomeAssistant,
    hass_client: ClientSessionGenerator,
    entry: MockConfigEntry,
    subentry_id: str,
) -> dict[str, Any]:
    """An agent as the entry's diagnostics list it."""
    data = await get_diagnostics_for_config_entry(hass, hass_client, entry)
    agent: dict[str, Any] = data["agents"][subentry_id]
    return agent


def suggested(result: Any) -> dict[str, Any]:
    """The values a form suggests (the agent's current options)."""
    values: dict[str, Any] = {}
    for key in result["data_schema"].schema:
        description = getattr(key, "description", None) or {}
        if "suggested_value" in description:
            values[str(key)] = description["suggested_value"]
    return values


async def test_bad_setting_fails_one_agent_that_stays_editable(
    hass: HomeAssistant, make_entry: EntryFactory, write_model: ModelWriter
) -> None:
    """A context above the model's limit: that agent is reported, fixed in its form."""
    write_model()
    write_model("Other")
    entry: MockConfigEntry = await make_entry(
        {"max_context_len": 8192}, {"model": "Other"}
    )
    assert entry.state is ConfigEntryState.LOADED
    error = agent_issue_error(hass)
    assert "above the model's limit of 4096" in error
    assert await answer(hass, BROKEN) == answer_text(
        "agent_context_above_limit",
        agent="Agent 0",
        model="Qwen3 Sim",
        max_context_len=8192,
        model_limit=4096,
    )
    assert await answer(hass, HEALTHY) == "Hello from the simulator."

    subentry_id = subentry_of(entry, "Agent 0")
    result = await entry.start_subentry_reconfigure_flow(hass, subentry_id)
    assert result["type"] is FlowResultType.FORM
    result = await hass.config_entries.subentries.async_configure(
        result["flow_id"], {**suggested(result), "max_context_len": 4096}
    )
    assert result["type"] is FlowResultType.ABORT
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.LOADED
    assert not agent_issues(hass)
    assert await answer(hass, BROKEN) == "Hello from the simulator."


async def test_model_that_crashes_while_loading_is_reported_once(
    hass: HomeAssistant,
    hass_client: ClientSessionGenerator,
    make_entry: EntryFactory,
    write_model: ModelWriter,
) -> None:
    """SIGSEGV in rkllm_init: a repair with the signal and the runtime's last lines,
    no setup retry loop, and the other model's agent answers."""
    write_model(extra=("crash_in_init 1",))
    write_model("Other")
    entry = await make_entry({}, {"model": "Other"})
    assert entry.state is ConfigEntryState.LOADED
    error = agent_issue_error(hass)
    assert "SIGSEGV" in error
    assert "max_context_limit" in error  # what the runtime printed before dying
    assert await answer(hass, HEALTHY) == "Hello from the simulator."
    inits = sim_counter(entry, "init")
    await hass.async_block_till_done()
    assert sim_counter(entry, "init") == inits  # nothing tries it again by itself
    assert entry.state is ConfigEntryState.LOADED
    assert await answer(hass, BROKEN) == answer_text(
        "agent_load_crashed", agent="Agent 0", model="Qwen3 Sim"
    )
    [failed] = agent_issues(hass)
    assert failed.is_fixable
    described = await diagnostics_agent(
        hass, hass_client, entry, subentry_of(entry, "Agent 0")
    )
    assert (described["state"], described["reason"]) == ("failed", "load_crashed")
    assert described["error"] == error


async def test_broken_model_file_shows_where_people_look(
    hass: HomeAssistant,
    hass_client: ClientSessionGenerator,
    make_entry: EntryFactory,
    write_model: ModelWriter,
    models_dir: Path,
) -> None:
    """A model file the runtime refuses: every place a user looks says so, the other
    model's agent answers, and the repair's fix flow tries again once it is fixed."""
    assert await async_setup_component(hass, "ai_task", {})
    assert await async_setup_component(hass, "repairs", {})
    broken = models_dir / "Qwen3 Sim"
    broken.mkdir()
    (broken / "model.rkllm").write_text("not a model\n")
    write_model("Other")
    entry = await make_entry({}, {"model": "Other"}, ai_tasks=({},))
    assert entry.state is ConfigEntryState.LOADED
    chat_id, task_id = subentry_of(entry, "Agent 0"), subentry_of(entry, "Task 0")

    # The repair names the runtime's own reason, and can be fixed.
    issues = {
        issue.translation_placeholders["agent"]: issue
        for issue in agent_issues(hass)
        if issue.translation_placeholders
    }
    assert set(issues) == {"Agent 0", "Task 0"}
    error = issues["Agent 0"].translation_placeholders["error"]  # type: ignore[index]
    assert "invalid rknn llm model magic" in error
    assert issues["Agent 0"].is_fixable

    # Its device and entities exist; none can explain a model that never loaded.
    [device] = [
        device
        for device in dr.async_entries_for_config_entry(
            dr.async_get(hass), entry.entry_id
        )
        if (DOMAIN, chat_id) in device.identifiers
    ]
    assert device.name == "Agent 0"
    assert device.model == "Qwen3 Sim (simulated)"
    states = agent_entities(hass, chat_id)
    assert {"conversation", "context_use", "prompt_cache", "busy"} <= set(states)
    assert set(states.values()) == {STATE_UNAVAILABLE}
    assert set(agent_entities(hass, task_id).values()) == {STATE_UNAVAILABLE}

    # Assist and AI Task answer in one sentence what is wrong and where to fix it.
    expected = answer_text("agent_load_failed", agent="Agent 0", model="Qwen3 Sim")
    assert await answer(hass, BROKEN) == expected
    assert "Repairs" in expected
    with pytest.raises(HomeAssistantError) as raised:
        await ai_task.async_generate_data(
            hass, task_name="t", entity_id="ai_task.task_0", instructions="Hi"
        )
    assert str(raised.value) == answer_text(
        "agent_load_failed", agent="Task 0", model="Qwen3 Sim"
    )
    assert await answer(hass, HEALTHY) == "Hello from the simulator."

    # Diagnostics list every agent with its state and the runtime's reason.
    described = await diagnostics_agent(hass, hass_client, entry, chat_id)
    assert described["state"] == "failed"
    assert described["reason"] == "load_failed"
    assert described["error"] == error
    assert described["title"] == "Agent 0"
    assert described["model"] == "Qwen3 Sim"
    healthy = await diagnostics_agent(
        hass, hass_client, entry, subentry_of(entry, "Agent 1")
    )
    assert healthy["state"] == "loaded"
    assert healthy["cache"] == "system"

    # The file is replaced; the fix flow, submitted unchanged, tries again.
    write_model()
    flow = await start_fix(hass_client, issues["Agent 0"].issue_id)
    assert flow["type"] == "form"
    assert "invalid rknn llm model magic" in flow["description_placeholders"]["error"]
    done = await submit_fix(
        hass_client, flow["flow_id"], {"model": "Qwen3 Sim", "max_context_len": 0}
    )
    assert done["type"] == "create_entry"
    await hass.async_block_till_done()
    assert not agent_issues(hass)
    assert await answer(hass, BROKEN) == "Hello from the simulator."
    assert STATE_UNAVAILABLE not in agent_entities(hass, chat_id).values()


async def test_context_above_the_limit_is_fixed_in_its_repair(
    hass: HomeAssistant,
    hass_client: ClientSessionGenerator,
    make_entry: EntryFactory,
) -> None:
    """The fix flow offers the context the runtime named and refuses more."""
    assert await async_setup_component(hass, "repairs", {})
    entry = await make_entry({"max_context_len": 8192})
    subentry_id = subentry_of(entry, "Agent 0")
    [issue] = agent_issues(hass)
    described = await diagnostics_agent(hass, hass_client, entry, subentry_id)
    assert described["reason"] == "context_above_limit"
    assert described["max_context_len"] == 8192
    assert described["model_limit"] == 4096

    flow = await start_fix(hass_client, issue.issue_id)
    assert flow["description_placeholders"]["limit"] == "4,096"
    fields = {field["name"]: field for field in flow["data_schema"]}
    assert fields["max_context_len"]["default"] == 4096
    refused = await submit_fix(
        hass_client, flow["flow_id"], {"model": "Qwen3 Sim", "max_context_len": 8000}
    )
    assert refused["type"] == "form"
    assert refused["errors"] == {"max_context_len": "context_above_model_limit"}
    done = await submit_fix(
        hass_client, flow["flow_id"], {"model": "Qwen3 Sim", "max_context_len": 4096}
    )
    assert done["type"] == "create_entry"
    await hass.async_block_till_done()
    assert entry.subentries[subentry_id].data["max_context_len"] == 4096
    assert not agent_issues(hass)
    assert (
        ir.async_get(hass).async_get_issue(DOMAIN, issue.issue_id) is None
    )  # not raised again
    assert await answer(hass, BROKEN) == "Hello from the simulator."


async def test_prefix_that_does_not_fit_keeps_the_readings_that_explain_it(
    hass: HomeAssistant,
    hass_client: ClientSessionGenerator,
    make_entry: EntryFactory,
) -> None:
    """The model is loaded but the prompt leaves no room: the prompt readings stay
    available with the numbers, the others are unavailable until it fits."""
    long_prompt = "Be brief. " + "Remember this. " * 500
    entry = await make_entry({"prompt": long_prompt, "max_context_len": 1024})
    subentry_id = subentry_of(entry, "Agent 0")
    states = agent_entities(hass, subentry_id)
    explaining = {"prompt_cache", "system_prompt_tokens", "context_use"}
    assert {key for key, state in states.items() if state != STATE_UNAVAILABLE} == (
        explaining
    )
    assert {"conversation", "busy", "queue_length", "time_to_first_token"} <= set(
        states
    )
    context_id = er.async_get(hass).async_get_entity_id(
        "sensor", DOMAIN, f"{subentry_id}_context_use"
    )
    assert context_id is not None
    context = hass.states.get(context_id)
    assert context is not None
    tokens = context.attributes["prefix_tokens"]
    assert context.attributes["max_context_len"] == 1024
    assert context.attributes["model_context_limit"] == 4096
    assert context.attributes["fits"] is False
    assert float(context.state) > 90

    assert await answer(hass, BROKEN) == answer_text(
        "agent_prefix_does_not_fit",
        agent="Agent 0",
        model="Qwen3 Sim",
        tokens=tokens,
        max_context_len=1024,
    )
    described = await diagnostics_agent(hass, hass_client, entry, subentry_id)
    assert described["state"] == "failed"
    assert described["reason"] == "prefix_does_not_fit"
    assert described["tokens"] == tokens
    assert described["max_context_len"] == 1024
    assert described["model_limit"] == 4096

    subentry = entry.subentries[subentry_id]
    hass.config_entries.async_update_subentry(
        entry, subentry, data={**subentry.data, "prompt": "Be brief."}
    )
    await hass.async_block_till_done()
    assert STATE_UNAVAILABLE not in agent_entities(hass, subentry_id).values()
    assert await answer(hass, BROKEN) == "Hello from the simulator."


async def test_model_folder_gone_says_so(
    hass: HomeAssistant,
    hass_client: ClientSessionGenerator,
    make_entry: EntryFactory,
    write_model: ModelWriter,
    models_dir: Path,
) -> None:
    """A renamed model folder: the agent's answer says to pick another model."""
    write_model()
    write_model("Other")
    entry = await make_entry({}, {"model": "Other"})
    (models_dir / "Qwen3 Sim").rename(models_dir / "Renamed")
    assert await hass.config_entries.async_reload(entry.entry_id)
    await hass.async_block_till_done()
    subentry_id = subentry_of(entry, "Agent 0")
    assert await answer(hass, BROKEN) == answer_text(
        "agent_model_missing", agent="Agent 0", model="Qwen3 Sim"
    )
    assert set(agent_entities(hass, subentry_id).values()) == {STATE_UNAVAILABLE}
    described = await diagnostics_agent(hass, hass_client, entry, subentry_id)
    assert (described["state"], described["reason"]) == ("failed", "model_missing")
    assert "'Qwen3 Sim'" in described["error"]
    assert await answer(hass, HEALTHY) == "Hello from the simulator."


async def test_system_prompt_that_cannot_be_set_up_says_so(
    hass: HomeAssistant,
    hass_client: ClientSessionGenerator,
    make_entry: EntryFactory,
    write_model: ModelWriter,
) -> None:
    """The model loads but every run fails, so its system cache cannot be built."""
    write_model(extra=("error_at_token 0",))
    entry = await make_entry()
    subentry_id = subentry_of(entry, "Agent 0")
    [issue] = agent_issues(hass)
    assert issue.is_fixable
    assert await answer(hass, BROKEN) == answer_text(
        "agent_prepare_failed", agent="Agent 0", model="Qwen3 Sim"
    )
    assert set(agent_entities(hass, subentry_id).values()) == {STATE_UNAVAILABLE}
    described = await diagnostics_agent(hass, hass_client, entry, subentry_id)
    assert (described["state"], described["reason"]) == ("failed", "prepare_failed")
    assert described["error"] == agent_issue_error(hass)
