"""One agent that cannot run is reported on its own; the entry and the others stay up."""

from typing import Any

from pytest_homeassistant_custom_component.common import MockConfigEntry

from homeassistant.components import conversation
from homeassistant.config_entries import ConfigEntryState
from homeassistant.core import Context, HomeAssistant
from homeassistant.data_entry_flow import FlowResultType

from .conftest import (
    EntryFactory,
    ModelWriter,
    agent_issue_error,
    agent_issues,
    sim_counter,
)

BROKEN = "conversation.agent_0"
HEALTHY = "conversation.agent_1"


async def answer(hass: HomeAssistant, agent: str) -> str:
    """Ask an agent and return its plain speech."""
    result = await conversation.async_converse(
        hass, "hello", None, Context(), agent_id=agent
    )
    text: str = result.response.speech["plain"]["speech"]
    return text


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
    assert hass.states.get(BROKEN) is None
    assert await answer(hass, HEALTHY) == "Hello from the simulator."

    subentry_id = next(
        sid for sid, sub in entry.subentries.items() if sub.title == "Agent 0"
    )
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
    hass: HomeAssistant, make_entry: EntryFactory, write_model: ModelWriter
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
