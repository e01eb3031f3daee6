"""The integration stays correct on a runtime as strict as upstream reports."""

import logging
from pathlib import Path
from typing import Any

import pytest
from pytest_homeassistant_custom_component.typing import ClientSessionGenerator

from custom_components.rockchip_llm.const import CONF_PROMPT, DOMAIN
from homeassistant.config_entries import ConfigEntryState
from homeassistant.const import CONF_LLM_HASS_API
from homeassistant.core import HomeAssistant
from homeassistant.helpers import issue_registry as ir

from .conftest import EntryFactory, last_run_record, sim_counter
from .test_conversation import converse, loaded_model, speech
from .test_diagnostics import get_diagnostics


async def test_runtime_that_saves_no_cache(
    hass: HomeAssistant,
    make_entry: EntryFactory,
    cache_dir: Path,
    hass_client: ClientSessionGenerator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """rknn-llm #517: the agent works uncached, said once, no retries, no wrong repair."""
    with caplog.at_level(logging.WARNING):
        entry = await make_entry(model_kwargs={"extra": ("no_prompt_cache_save 1",)})
    assert entry.state is ConfigEntryState.LOADED
    agent = next(iter(entry.runtime_data.agents.values()))
    loaded = loaded_model(entry)
    assert agent.cache is None
    assert loaded.cache_unsupported is not None
    first = await converse(hass, "hello")
    await converse(hass, "hello again", first.conversation_id)
    assert speech(first) == "Hello from the simulator."
    await converse(hass, "a new conversation")
    await hass.async_block_till_done()
    # One build attempt (at setup), then only the three answers.
    assert sim_counter(entry, "run") == 1 + 3
    assert caplog.text.count("wrote no prompt cache file") == 1
    assert not list(cache_dir.rglob("*.json"))
    issues = ir.async_get(hass).issues
    assert not [key for key in issues if key[0] == DOMAIN]

    listed: dict[str, Any] = await hass.services.async_call(
        DOMAIN, "list_caches", {}, blocking=True, return_response=True
    )
    assert [(c["model"], c["problem"]) for c in listed["caches"]] == [
        ("Qwen3 Sim", "not_saved_by_runtime")
    ]
    data = await get_diagnostics(hass, hass_client, entry)
    assert (
        "wrote no prompt cache"
        in (data["loaded_models"]["Qwen3 Sim"]["prompt_cache_unsupported"])
    )


async def test_agent_without_tools_sets_a_template(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """No rkllm_set_function_tools("[]") (rknn-llm #377): the prompt is a chat template."""
    entry = await make_entry(
        {CONF_LLM_HASS_API: [], CONF_PROMPT: "Speak like a pirate."}
    )
    result = await converse(hass, "hello")
    assert speech(result) == "Hello from the simulator."
    assert sim_counter(entry, "set_function_tools") == 0
    assert sim_counter(entry, "set_chat_template") >= 1
    record = last_run_record(entry)
    assert record["tools"] is None
    assert record["system"].startswith("<|im_start|>system\nSpeak like a pirate.")
    # thinking off: the template closes an empty thinking block itself
    assert record["prompt"].endswith("<think>\n\n</think>\n\n")


async def test_prefix_change_clears_the_kv(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """A runtime whose set_function_tools keeps the KV: the new prompt still applies."""
    entry = await make_entry(
        {CONF_PROMPT: "First agent speaks."},
        {CONF_PROMPT: "Second agent speaks."},
        model_kwargs={"extra": ("tools_keep_kv 1",)},
    )
    await converse(hass, "hello", agent="conversation.agent_0")
    await converse(hass, "hello", agent="conversation.agent_1")
    record = last_run_record(entry)
    assert "Second agent speaks." in record["prompt"]
    assert "First agent speaks." not in record["prompt"]
