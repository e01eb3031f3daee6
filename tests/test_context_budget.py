"""A request that fits is answered; one that does not is refused with its real cause."""

import ctypes
import logging
from pathlib import Path

import pytest
from pytest_homeassistant_custom_component.common import async_mock_service

from custom_components.rockchip_llm.agent_prefix import async_render_prefix
from custom_components.rockchip_llm.const import CONF_MODEL, CONF_PROMPT
from custom_components.rockchip_llm.run_planner import (
    ContextBudget,
    KVState,
    Message,
    PromptTooLong,
    SystemPrefix,
    plan_run,
)
from homeassistant import config_entries
from homeassistant.components import conversation
from homeassistant.components.homeassistant.exposed_entities import async_expose_entity
from homeassistant.const import CONF_LLM_HASS_API
from homeassistant.core import HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
from homeassistant.helpers import intent, llm
from homeassistant.setup import async_setup_component

from .conftest import EntryFactory
from .sim_template import sim_system_block
from .test_conversation import converse, model_session, speech

PREFIX = SystemPrefix("You are a voice assistant.", "[]")


def test_tool_result_fits_with_a_shorter_answer() -> None:
    """A prefix of 3,801 of 4,096 tokens: the tool result run gets what is left."""
    history = [Message("user", "Turn on the kitchen lights"), Message("assistant", "c")]
    budget = ContextBudget(
        max_context_len=4096, prefix_tokens=3801, kv_tokens=3880, reply_tokens=256
    )
    plan = plan_run(
        KVState(PREFIX.key, tuple(history)),
        PREFIX,
        [*history, Message("tool", '{"success": true, "name": "Kitchen"}')],
        keep_history=True,
        max_history=10,
        budget=budget,
    )
    assert plan.reuse_history
    assert plan.role == "tool"
    assert 32 <= plan.max_new_tokens < 256


def test_old_turns_go_before_the_answer_shrinks() -> None:
    """Older turns are dropped to keep a full answer; the answer shrinks only after."""
    history = [
        Message("user", "q" * 600),
        Message("assistant", "a" * 30),
        Message("user", "short"),
        Message("assistant", "ok"),
    ]
    budget = ContextBudget(
        max_context_len=1000, prefix_tokens=600, kv_tokens=600, reply_tokens=256
    )
    plan = plan_run(
        None,
        PREFIX,
        [*history, Message("user", "next")],
        keep_history=True,
        max_history=0,
        budget=budget,
    )
    assert plan.max_new_tokens == 256
    assert plan.dropped_messages == 2
    assert plan.history.startswith("short<|im_end|>")

    tight = ContextBudget(
        max_context_len=1000, prefix_tokens=900, kv_tokens=900, reply_tokens=256
    )
    plan = plan_run(
        None,
        PREFIX,
        [*history, Message("user", "next")],
        keep_history=True,
        max_history=0,
        budget=tight,
    )
    assert plan.text() == "next"
    assert plan.dropped_messages == 4
    assert plan.max_new_tokens == 1000 - 900 - 2


def test_a_tool_call_keeps_its_question() -> None:
    """For a tool result, the user's question stays; older turns go first."""
    history = [
        Message("user", "q" * 600),
        Message("assistant", "a"),
        Message("user", "turn on the lights"),
        Message("assistant", "call"),
    ]
    budget = ContextBudget(
        max_context_len=1000, prefix_tokens=600, kv_tokens=600, reply_tokens=256
    )
    plan = plan_run(
        None,
        PREFIX,
        [*history, Message("tool", '{"ok": true}')],
        keep_history=False,
        max_history=0,
        budget=budget,
    )
    assert plan.history.startswith("turn on the lights<|im_end|>")
    assert "q" * 600 not in plan.text()
    assert plan.max_new_tokens == 256


@pytest.mark.parametrize(
    ("prefix_tokens", "text", "prefix_too_long"),
    [(990, "hello", True), (500, "word " * 1000, False)],
)
def test_refusal_names_its_cause(
    prefix_tokens: int, text: str, prefix_too_long: bool
) -> None:
    """Refused only when nothing fits; a long input is not 'instructions too long'."""
    budget = ContextBudget(
        max_context_len=1000,
        prefix_tokens=prefix_tokens,
        kv_tokens=prefix_tokens,
        reply_tokens=256,
    )
    with pytest.raises(PromptTooLong) as caught:
        plan_run(
            None,
            PREFIX,
            [Message("user", text)],
            keep_history=True,
            max_history=10,
            budget=budget,
        )
    assert caught.value.prefix_too_long is prefix_too_long
    assert str(prefix_tokens) in str(caught.value)


async def _prompt_for_prefix_tokens(
    hass: HomeAssistant, sim_library: Path, tokens: int
) -> str:
    """A custom prompt that makes the agent's system block about tokens long."""
    count = ctypes.CDLL(str(sim_library)).rkllm_sim_count_tokens
    count.argtypes = [ctypes.c_char_p]

    async def block_tokens(prompt: str) -> int:
        prefix, _layout = await async_render_prefix(
            hass,
            {
                CONF_MODEL: "Qwen3 Sim",
                CONF_LLM_HASS_API: [llm.LLM_API_ASSIST],
                CONF_PROMPT: prompt,
            },
        )
        return int(count(sim_system_block(prefix).encode()))

    base = await block_tokens("Be brief.")
    return "Be brief." + " ab" * (tokens - base)


async def test_full_prefix_still_runs_the_tool_result(
    hass: HomeAssistant,
    make_entry: EntryFactory,
    sim_library: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The dev instance's case: the prefix nearly fills the context, the turn still works.

    The tool result run gets a shorter answer budget instead of a refusal.
    """
    assert await async_setup_component(hass, "intent", {})
    hass.states.async_set("light.kitchen", "off", {"friendly_name": "Kitchen"})
    async_expose_entity(hass, conversation.DOMAIN, "light.kitchen", True)
    calls = async_mock_service(hass, "light", "turn_on")
    prompt = await _prompt_for_prefix_tokens(hass, sim_library, 2048 - 160)
    entry = await make_entry(
        {CONF_PROMPT: prompt, "max_context_len": 2048, "max_new_tokens": 256}
    )
    loaded = model_session(entry)
    assert loaded.loaded_cache is not None
    assert loaded.loaded_cache.metadata is not None
    assert 2048 - 180 < loaded.loaded_cache.metadata.tokens < 2048 - 140
    result = await converse(hass, "Turn on the kitchen")
    assert result.response.response_type is not intent.IntentResponseType.ERROR
    assert speech(result) == "Done."
    assert len(calls) == 1
    assert all(run.generate_tokens > 0 for run in loaded.recent)
    # The tool result continued the KV (the model sees the call it answers).
    assert loaded.recent[-1].reused_history
    assert "does not fit" not in caplog.text


async def test_long_question_is_refused_as_too_long(
    hass: HomeAssistant, make_entry: EntryFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A 30 KB question is refused as too long, not as 'instructions do not fit'."""
    await make_entry({"max_context_len": 2048})
    with caplog.at_level(logging.WARNING):
        result = await converse(hass, "lorem ipsum " * 2500)
    assert result.response.response_type is intent.IntentResponseType.ERROR
    assert "too long for me" in speech(result)
    assert "instructions" not in speech(result).split("including")[0]
    assert "does not fit the context" in caplog.text
    assert "max_context_len 2048" in caplog.text


async def test_prefix_that_leaves_no_room_names_the_instructions(
    hass: HomeAssistant,
    make_entry: EntryFactory,
    sim_library: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A prefix that leaves no room for a turn and a short answer, even trimmed.

    The answer says so in one sentence and where to fix it (its repair).
    """
    prompt = await _prompt_for_prefix_tokens(hass, sim_library, 2048 - 20)
    await make_entry({CONF_PROMPT: prompt, "max_context_len": 2048})
    result = await converse(hass, "hello")
    assert result.response.response_type is intent.IntentResponseType.ERROR
    assert "context of 2048 tokens" in speech(result)
    assert "Repairs" in speech(result)
    assert "cannot answer" in caplog.text


async def test_agent_flow_checks_the_models_context_limit(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """A context length above what the loaded model allows is refused in the form."""
    entry = await make_entry()
    assert model_session(entry).worker.context_limit == 4096
    result = await hass.config_entries.subentries.async_init(
        (entry.entry_id, "conversation"),
        context={"source": config_entries.SOURCE_USER},
    )
    user_input = {
        CONF_MODEL: "Qwen3 Sim",
        CONF_PROMPT: "Be brief.",
        "max_context_len": 8192.0,
        "max_new_tokens": 128.0,
        "temperature": 0.7,
        "top_k": 20.0,
        "top_p": 0.8,
        "repeat_penalty": 1.1,
        "enable_thinking": False,
        "max_history": 10.0,
        "history_strategy": "auto",
    }
    result = await hass.config_entries.subentries.async_configure(
        result["flow_id"], user_input
    )
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"max_context_len": "context_above_model_limit"}
    assert result["description_placeholders"]["limit"] == "4096"
    result = await hass.config_entries.subentries.async_configure(
        result["flow_id"], {**user_input, "max_context_len": 4096.0}
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    await hass.async_block_till_done()
