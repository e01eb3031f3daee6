"""The integration stays correct on a runtime as strict as upstream reports."""

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from pytest_homeassistant_custom_component.typing import ClientSessionGenerator

from custom_components.rockchip_llm.const import CONF_PROMPT, DOMAIN, HistoryStrategy
from homeassistant.config_entries import ConfigEntryState
from homeassistant.const import CONF_LLM_HASS_API
from homeassistant.core import HomeAssistant
from homeassistant.helpers import issue_registry as ir

from .conftest import EntryFactory, last_run_record, sim_counter
from .test_conversation import converse, model_session, speech
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
    loaded = model_session(entry)
    assert agent.system_cache.cache is None
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


async def test_cache_ignored_with_keep_history_found_at_setup(
    hass: HomeAssistant,
    make_entry: EntryFactory,
    hass_client: ClientSessionGenerator,
) -> None:
    """rknn-llm #399: the warm-up finds it; the first request is already fast.

    The agent falls back to prompt_cache_only, a repair says so with the numbers,
    diagnostics show it, and a reload tries auto again.
    """
    entry = await make_entry(model_kwargs={"extra": ("ignore_cache_with_history 1",)})
    agent = next(iter(entry.runtime_data.agents.values()))
    loaded = model_session(entry)
    assert agent.history.strategy is HistoryStrategy.PROMPT_CACHE_ONLY
    [failure] = agent.history.failures
    assert failure["source"] == "warm-up"
    assert failure["strategy"] == "auto"
    assert failure["prefill_tokens"] > failure["prefix_tokens"] > 50
    issue = ir.async_get(hass).async_get_issue(
        DOMAIN, f"reuse_not_honoured_{agent.subentry_id}"
    )
    assert issue is not None
    assert issue.translation_placeholders is not None
    assert issue.translation_placeholders["fallback"] == "prompt_cache_only"

    first = await converse(hass, "hello")
    await converse(hass, "and again", first.conversation_id)
    assert speech(first) == "Hello from the simulator."
    assert all(run.prefill_tokens < 40 for run in loaded.recent)
    assert all(not run.reused_history for run in loaded.recent)

    data = await get_diagnostics(hass, hass_client, entry)
    described = data["agents"][agent.subentry_id]
    assert described["history_strategy_in_force"] == "prompt_cache_only"
    assert described["reuse_failures"][0]["switched_to"] == "prompt_cache_only"

    await hass.config_entries.async_reload(entry.entry_id)
    await hass.async_block_till_done()
    agent = next(iter(entry.runtime_data.agents.values()))
    assert [f["strategy"] for f in agent.history.failures] == ["auto"]


async def test_request_that_is_not_reused_falls_back(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """A request that prefilled the whole prefix again switches the agent down."""
    entry = await make_entry(model_kwargs={"extra": ("ignore_cache_with_history 1",)})
    agent = next(iter(entry.runtime_data.agents.values()))
    agent.history.strategy = HistoryStrategy.AUTO  # as if the warm-up had not run
    await converse(hass, "hello")
    assert agent.history.strategy is HistoryStrategy.PROMPT_CACHE_ONLY
    assert agent.history.failures[-1]["source"] == "request"
    await converse(hass, "hello")
    assert model_session(entry).recent[-1].prefill_tokens < 40


async def test_realistic_cache_files_survive_a_reload(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """Caches of a real KV's size per token are loaded after a reload, not rebuilt."""
    entry = await make_entry(model_kwargs={"extra": ("cache_bytes_per_token 4096",)})
    loaded = model_session(entry)
    assert loaded.loaded_cache is not None
    metadata = loaded.loaded_cache.metadata
    assert metadata is not None
    assert metadata.size_bytes >= metadata.tokens * 4096
    saves = sim_counter(entry, "prompt_cache_save")
    loads = sim_counter(entry, "prompt_cache_load")
    await hass.config_entries.async_reload(entry.entry_id)
    await hass.async_block_till_done()
    assert sim_counter(entry, "prompt_cache_save") == saves
    assert sim_counter(entry, "prompt_cache_load") == loads + 1
    result = await converse(hass, "hello")
    assert speech(result) == "Hello from the simulator."
    assert model_session(entry).recent[-1].prefill_tokens < 40


async def test_prompt_cache_only_falls_back_to_off(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """The second step: a cache not honoured without history either means off."""
    entry = await make_entry({"history_strategy": "prompt_cache_only"})
    agent = next(iter(entry.runtime_data.agents.values()))
    assert (
        agent.history.strategy is HistoryStrategy.PROMPT_CACHE_ONLY
    )  # the warm-up passed
    assert agent.history.check_reuse(30, 40, 1800, "request")
    assert not agent.history.check_reuse(1830, 40, 1800, "request")
    assert agent.history.strategy is HistoryStrategy.OFF
    issue = ir.async_get(hass).async_get_issue(
        DOMAIN, f"reuse_not_honoured_{agent.subentry_id}"
    )
    assert issue is not None
    assert issue.translation_placeholders == {
        "agent": "Agent 0",
        "strategy": "prompt_cache_only",
        "fallback": "off",
        "prefill_tokens": "1830",
        "expected_tokens": "40",
        "prefix_tokens": "1800",
    }
    result = await converse(hass, "hello")
    assert speech(result) == "Hello from the simulator."
    assert model_session(entry).loaded_cache is None


async def test_cache_of_a_tool_list_prefix_is_rebuilt_as_a_template(
    hass: HomeAssistant, make_entry: EntryFactory, cache_dir: Path
) -> None:
    """A tool-less agent's cache from set_function_tools("[]") holds other tokens.

    It is stale (rebuilt once), not loaded and then found not reused.
    """
    entry = await make_entry({CONF_LLM_HASS_API: []}, setup=False)
    await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    json_path = next(cache_dir.rglob("system.json"))
    metadata = json.loads(json_path.read_text())
    assert metadata["context"]["system_template"] == "chatml"
    del metadata["context"]["system_template"]  # as an earlier version wrote it
    json_path.write_text(json.dumps(metadata))
    await hass.config_entries.async_reload(entry.entry_id)
    await hass.async_block_till_done()
    agent = next(iter(entry.runtime_data.agents.values()))
    assert agent.system_cache.cache is not None
    assert agent.system_cache.cache.metadata is not None
    assert agent.system_cache.cache.metadata.created_at != metadata["created_at"]
    assert agent.history.strategy is HistoryStrategy.AUTO
    assert not agent.history.failures
