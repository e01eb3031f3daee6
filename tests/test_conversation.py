"""The Assist agent through conversation.async_converse and the simulator."""

import asyncio
import ctypes
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pytest_homeassistant_custom_component.common import (
    async_fire_time_changed,
    async_mock_service,
)

from custom_components.rockchip_llm.const import MAX_AUTO_CACHES
from custom_components.rockchip_llm.entity import resolve_tool_name
from custom_components.rockchip_llm.ha_compat import tool_result_data
from custom_components.rockchip_llm.session import ModelSession
from custom_components.rockchip_llm.turn import RunStats
from homeassistant.components import conversation
from homeassistant.components.homeassistant.exposed_entities import async_expose_entity
from homeassistant.config_entries import ConfigEntryState
from homeassistant.core import Context, HomeAssistant
from homeassistant.helpers import (
    area_registry as ar,
    chat_session,
    device_registry as dr,
    intent,
)
from homeassistant.setup import async_setup_component
from homeassistant.util import dt as dt_util

from .conftest import EntryFactory, agent_issue_error, last_run_record
from .sim_words import words

AGENT = "conversation.agent_0"


def model_session(entry: Any) -> ModelSession:
    """The loaded model of the entry's first agent."""
    agent = next(iter(entry.runtime_data.agents.values()))
    loaded: ModelSession = agent.session
    return loaded


async def converse(
    hass: HomeAssistant,
    text: str,
    conversation_id: str | None = None,
    agent: str = AGENT,
) -> conversation.ConversationResult:
    """Ask the agent something."""
    return await conversation.async_converse(
        hass, text, conversation_id, Context(), agent_id=agent
    )


def speech(result: conversation.ConversationResult) -> str:
    """The plain speech of a result."""
    text: str = result.response.speech["plain"]["speech"]
    return text


async def test_answers(hass: HomeAssistant, make_entry: EntryFactory) -> None:
    """A question gets the model's answer."""
    await make_entry()
    result = await converse(hass, "hello")
    assert result.response.response_type is intent.IntentResponseType.ACTION_DONE
    assert speech(result) == "Hello from the simulator."


async def test_streams_before_generation_ends(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """The first content delta reaches the chat log while the model is still generating."""
    reply = " ".join(f"word{i}" for i in range(30))
    entry = await make_entry(
        model_kwargs={"replies": (f"default => {reply}",), "decode_ms_per_token": 2}
    )
    loaded = model_session(entry)
    runs_at_first_delta: list[int] = []
    contents: list[str] = []

    def listener(_chat_log: conversation.ChatLog, delta: dict[str, Any]) -> None:
        if content := delta.get("content"):
            if not contents:
                runs_at_first_delta.append(len(loaded.recent))
            contents.append(content)

    with (
        chat_session.async_get_chat_session(hass) as session,
        conversation.async_get_chat_log(
            hass, session, chat_log_delta_listener=listener
        ),
    ):
        result = await converse(hass, "talk", session.conversation_id)
    assert speech(result) == reply
    assert len(contents) > 10
    assert runs_at_first_delta == [0]  # the run was not recorded (finished) yet
    assert len(loaded.recent) == 1


async def test_turns_on_a_light(
    hass: HomeAssistant, make_entry: EntryFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """'Turn on the kitchen' runs HassTurnOn on a real exposed entity; the answer is spoken.

    Nothing on the way uses an API this Home Assistant reports as deprecated.
    """
    assert await async_setup_component(hass, "intent", {})
    hass.states.async_set("light.kitchen", "off", {"friendly_name": "Kitchen"})
    async_expose_entity(hass, conversation.DOMAIN, "light.kitchen", True)
    calls = async_mock_service(hass, "light", "turn_on")
    await make_entry()
    result = await converse(hass, "Turn on the kitchen")
    assert speech(result) == "Done."
    assert len(calls) == 1
    assert (
        calls[0].data["entity_id"] == ["light.kitchen"]
        or calls[0].data["entity_id"] == "light.kitchen"
    )
    assert "Detected that custom integration" not in caplog.text


async def test_thinking_is_not_spoken(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """<think> goes to thinking content, never into speech."""
    entry = await make_entry(
        {"enable_thinking": True},
        model_kwargs={
            "replies": ("default => <think>The user greets me.</think>Hi there.",)
        },
    )
    with chat_session.async_get_chat_session(hass) as session:
        result = await converse(hass, "hello", session.conversation_id)
        assert speech(result) == "Hi there."
        with conversation.async_get_chat_log(hass, session) as chat_log:
            last = chat_log.content[-1]
            assert isinstance(last, conversation.AssistantContent)
            assert last.thinking_content == "The user greets me."
    assert entry is not None


async def test_malformed_tool_call_is_fed_back(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """A tool call that is not JSON becomes a tool error the model answers."""
    await make_entry(
        model_kwargs={
            "replies": (
                'reply user broken => <tool_call>{"name": "HassTurnOn", "arguments": {"name": }</tool_call>',
                "reply tool * => Sorry, I could not do that.",
            )
        }
    )
    with chat_session.async_get_chat_session(hass) as session:
        result = await converse(hass, "broken", session.conversation_id)
        assert speech(result) == "Sorry, I could not do that."
        with conversation.async_get_chat_log(hass, session) as chat_log:
            tool_results = [
                c
                for c in chat_log.content
                if isinstance(c, conversation.ToolResultContent)
            ]
    assert [r.tool_name for r in tool_results] == ["invalid_tool_call"]
    assert "not valid JSON" in str(tool_result_data(tool_results[0]))


async def test_follow_ups_prefill_only_new_tokens(
    hass: HomeAssistant, make_entry: EntryFactory, sim_library: Path
) -> None:
    """In a 5-turn dialogue every follow-up reuses the KV and prefills only its turn."""
    entry = await make_entry()
    loaded = model_session(entry)
    system_tokens = loaded.loaded_cache.metadata.tokens  # type: ignore[union-attr]
    assert system_tokens > 50
    # The test maps the simulator itself: Home Assistant's process never loads it.
    simulator = await hass.async_add_executor_job(ctypes.CDLL, str(sim_library))
    count_tokens = simulator.rkllm_sim_count_tokens
    count_tokens.argtypes = [ctypes.c_char_p]
    conversation_id = None
    for turn in range(5):
        result = await converse(hass, f"question number {turn} please", conversation_id)
        conversation_id = result.conversation_id
        record = last_run_record(entry)
        if turn:
            # Exactly the templated new turn was computed: not the system prompt,
            # not an earlier turn.
            assert record["prompt"].count("question number") == 1
            assert loaded.recent[-1].prefill_tokens == count_tokens(
                record["prompt"].encode()
            )
    runs = list(loaded.recent)
    assert len(runs) == 5
    assert [run.reused_history for run in runs] == [False, True, True, True, True]
    assert all(0 < run.prefill_tokens < 25 for run in runs)


async def test_strategy_off_prefills_everything(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """With reuse off, every request prefills the whole system prompt again."""
    entry = await make_entry({"history_strategy": "off"})
    loaded = model_session(entry)
    system_tokens = loaded.loaded_cache.metadata.tokens if loaded.loaded_cache else 0  # type: ignore[union-attr]
    result = await converse(hass, "hello")
    await converse(hass, "again", result.conversation_id)
    assert all(run.prefill_tokens > system_tokens for run in loaded.recent)


async def test_interleaved_conversations_reset_to_system(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """Another conversation resets the KV to the system prefix; the history is re-sent."""
    entry = await make_entry()
    loaded = model_session(entry)
    first = await converse(hass, "hello one")
    await converse(hass, "hello two")
    third = await converse(hass, "and one again", first.conversation_id)
    assert speech(third) == "Hello from the simulator."
    runs = list(loaded.recent)
    assert [run.reused_history for run in runs] == [False, False, False]
    assert (
        runs[2].prefill_tokens > runs[0].prefill_tokens
    )  # the earlier turns were sent again


@pytest.mark.parametrize("strategy", ["auto", "off"])
async def test_prompt_too_long_is_answered(
    hass: HomeAssistant, make_entry: EntryFactory, strategy: str
) -> None:
    """A request that cannot fit the context gets a clear spoken error; nothing crashes.

    With "off" no cache tells the prefix's size: it is estimated from its text.
    """
    entry = await make_entry(
        {"max_context_len": 2048, "max_new_tokens": 64, "history_strategy": strategy}
    )
    system_tokens = model_session(entry).loaded_cache.metadata.tokens  # type: ignore[union-attr]
    # " ab" is one simulator token: alone the question would fit, after the prefix not.
    words = 2048 - 64 - system_tokens // 2
    result = await converse(hass, "ab " * words)
    assert result.response.response_type is intent.IntentResponseType.ERROR
    assert "too long for me" in speech(result)
    assert speech(await converse(hass, "hello")) == "Hello from the simulator."


async def test_error_at_token(hass: HomeAssistant, make_entry: EntryFactory) -> None:
    """An error injected at token 2 is reported in the answer, and the next request works."""
    entry = await make_entry(model_kwargs={"extra": ("error_at_token 2",)})
    result = await converse(hass, "hello")
    assert result.response.response_type is intent.IntentResponseType.ERROR
    assert "failed while answering" in speech(result)
    assert model_session(entry).kv_messages is None


async def test_concurrent_requests_all_answered(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """20 concurrent requests on one model are served one by one, none lost."""
    entry = await make_entry(model_kwargs={"decode_ms_per_token": 1})
    results = await asyncio.gather(*(converse(hass, f"hello {i}") for i in range(20)))
    assert [speech(r) for r in results] == ["Hello from the simulator."] * 20
    assert len(model_session(entry).recent) == 20


async def long_replying_model(
    make_entry: EntryFactory, count: int
) -> tuple[ModelSession, str]:
    """Set up an agent whose model answers anything with count words, 5 ms each."""
    long_reply = words(count)
    entry = await make_entry(
        model_kwargs={
            "replies": (f"default => {long_reply}",),
            "decode_ms_per_token": 5,
        }
    )
    return model_session(entry), long_reply


async def test_cancel_while_running_and_waiting(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """Cancelling a running request aborts it; a waiting one leaves the queue."""
    loaded, _long_reply = await long_replying_model(make_entry, 500)
    running = hass.async_create_task(converse(hass, "long"))
    waiting = hass.async_create_task(converse(hass, "queued"))
    while not loaded.busy:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    waiting.cancel()
    running.cancel()
    for task in (running, waiting):
        with pytest.raises(asyncio.CancelledError):
            await task
    assert not loaded.busy
    assert loaded.kv_messages is None
    # The model is usable at once.
    result = await converse(hass, "again")
    assert speech(result).startswith(words(2))


async def test_message_on_a_busy_conversation(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """A second message while the conversation's turn runs leaves that turn the model.

    Home Assistant 2026.11 refuses it (ConversationBusyError): the user reads why,
    in our words. Older versions queue it behind the first turn on the model.
    Either way the model is free afterwards and the conversation goes on.
    """
    loaded, long_reply = await long_replying_model(make_entry, 100)
    first = hass.async_create_task(converse(hass, "first", "my-conversation"))
    while not loaded.busy:
        await asyncio.sleep(0.01)
    second = await converse(hass, "second", "my-conversation")
    if hasattr(conversation, "ConversationBusyError"):
        assert second.response.response_type is intent.IntentResponseType.ERROR
        assert speech(second) == (
            "Sorry, I am still answering your previous message in this "
            "conversation. Ask again when I have finished"
        )
        assert loaded.busy
        assert not first.done()
    else:
        assert speech(second) == long_reply
    assert speech(await first) == long_reply
    assert not loaded.busy
    third = await converse(hass, "third", "my-conversation")
    assert speech(third) == long_reply
    assert third.conversation_id == "my-conversation"


async def test_failed_turn_leaves_the_conversation_usable(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """A turn refused as too long reads well; the same conversation then goes on.

    From Home Assistant 2026.11 the failed turn stays in the chat log with its
    error; what no longer fits the context is left out of the next run.
    """
    entry = await make_entry({"max_context_len": 2048, "max_new_tokens": 64})
    # Each request in a task of its own, as each HTTP request is: HA 2026.10 leaves
    # the chat log of a failed turn set in the context of the task that ran it.
    result = await hass.async_create_task(converse(hass, "ab " * 3000, "failing"))
    assert result.response.response_type is intent.IntentResponseType.ERROR
    assert speech(result).startswith("Sorry, that is too long for me: about ")
    assert not model_session(entry).busy
    follow_up = await hass.async_create_task(converse(hass, "hello", "failing"))
    assert speech(follow_up) == "Hello from the simulator."
    assert last_run_record(entry)["prompt"].count(" ab") < 100


async def test_requests_served_in_arrival_order(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """Requests to one model are answered first come, first served."""
    await make_entry(
        model_kwargs={
            "decode_ms_per_token": 2,
            "replies": ("default => You said {input}",),
        }
    )
    finished: list[int] = []

    async def ask(index: int) -> None:
        await converse(hass, f"number {index}")
        finished.append(index)

    await asyncio.gather(*(ask(index) for index in range(6)))
    assert finished == list(range(6))


async def test_max_history_trims_resent_history(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """Without KV reuse, only the last max_history user turns are sent again."""
    entry = await make_entry(
        {"history_strategy": "prompt_cache_only", "max_history": 2}
    )
    conversation_id = None
    for turn in range(1, 5):
        result = await converse(hass, f"question number {turn}", conversation_id)
        conversation_id = result.conversation_id
    prompt = last_run_record(entry)["prompt"]
    assert "question number 4" in prompt
    assert "question number 3" in prompt
    assert "question number 2" in prompt
    assert "question number 1" not in prompt


async def test_max_history_resets_kv(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """With KV reuse, history beyond max_history resets the KV to the system prefix."""
    entry = await make_entry({"max_history": 2})
    conversation_id = None
    for turn in range(1, 5):
        result = await converse(hass, f"question number {turn}", conversation_id)
        conversation_id = result.conversation_id
    assert [run.reused_history for run in model_session(entry).recent] == [
        False,
        True,
        True,
        False,
    ]
    prompt = last_run_record(entry)["prompt"]
    assert "question number 1" not in prompt
    assert "question number 2" in prompt


async def test_warm_up_rebuilds_a_missing_cache(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """Preparing the agent (pipeline start) makes sure its system cache exists."""
    entry = await make_entry()
    agent = next(iter(entry.runtime_data.agents.values()))
    # (delete_cache refuses an agent's own cache: the session's own delete here)
    assert await agent.session.async_delete_cache("system")
    assert agent.system_cache.cache is None
    await conversation.async_prepare_agent(hass, AGENT, "en")
    assert agent.system_cache.cache is not None
    assert agent.session.loaded_cache is agent.system_cache.cache


async def test_satellites_in_areas_get_caches_of_their_own(
    hass: HomeAssistant,
    make_entry: EntryFactory,
    device_registry: dr.DeviceRegistry,
    area_registry: ar.AreaRegistry,
) -> None:
    """A satellite's area changes the prompt: it works at once, and gets its own cache.

    The system cache stays the one for requests without an area; the most recent
    MAX_AUTO_CACHES area prompts keep caches of their own.
    """
    hass.states.async_set("light.kitchen", "off", {"friendly_name": "Kitchen"})
    async_expose_entity(hass, conversation.DOMAIN, "light.kitchen", True)
    entry = await make_entry()
    agent = next(iter(entry.runtime_data.agents.values()))
    system = agent.system_cache.cache
    satellites = []
    for name in ("Kitchen", "Hall", "Attic", "Garage", "Office", "Porch"):
        area = area_registry.async_create(name)
        satellite = device_registry.async_get_or_create(
            config_entry_id=entry.entry_id, identifiers={("test", name)}, name=name
        )
        device_registry.async_update_device(satellite.id, area_id=area.id)
        satellites.append(satellite.id)
    async_fire_time_changed(hass, dt_util.utcnow() + timedelta(seconds=31))
    await hass.async_block_till_done(wait_background_tasks=True)

    async def ask(device_id: str) -> RunStats:
        result = await conversation.async_converse(
            hass, "hello", None, Context(), agent_id=AGENT, device_id=device_id
        )
        assert speech(result) == "Hello from the simulator."
        return agent.session.recent[-1]

    first = await ask(satellites[0])
    assert first.cache == "system"  # the identical leading tokens were still reused
    async_fire_time_changed(hass, dt_util.utcnow() + timedelta(seconds=62))
    await hass.async_block_till_done(wait_background_tasks=True)
    again = await ask(satellites[0])
    assert again.cache is not None
    assert again.cache.startswith("auto_")
    assert again.prefill_tokens < first.prefill_tokens
    assert agent.system_cache.cache is system  # requests without an area keep theirs

    for index, device_id in enumerate(satellites[1:], start=2):
        await ask(device_id)
        async_fire_time_changed(
            hass, dt_util.utcnow() + timedelta(seconds=31 * index + 62)
        )
        await hass.async_block_till_done(wait_background_tasks=True)
    listed = await hass.services.async_call(
        "rockchip_llm", "list_caches", {}, blocking=True, return_response=True
    )
    names = [cache["name"] for cache in listed["caches"]]  # type: ignore[index,union-attr]
    assert "system" in names
    assert len([name for name in names if name.startswith("auto_")]) == MAX_AUTO_CACHES


async def test_follow_up_after_tool_call_reuses_kv(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """HA completes a tool result after the turn; the next turn still continues the KV."""
    assert await async_setup_component(hass, "intent", {})
    hass.states.async_set("light.kitchen", "off", {"friendly_name": "Kitchen"})
    async_expose_entity(hass, conversation.DOMAIN, "light.kitchen", True)
    async_mock_service(hass, "light", "turn_on")
    entry = await make_entry()
    first = await converse(hass, "Turn on the kitchen")
    assert speech(first) == "Done."
    await converse(hass, "thanks a lot", first.conversation_id)
    runs = list(model_session(entry).recent)
    assert [run.reused_history for run in runs] == [False, True, True]
    assert runs[-1].prefill_tokens < 25


async def test_strategy_off_keeps_nothing(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """ "off" prefills the system prompt again even after another agent kept it in the KV."""
    entry = await make_entry({}, {"history_strategy": "off"})
    loaded = model_session(entry)
    system_tokens = loaded.loaded_cache.metadata.tokens  # type: ignore[union-attr]
    await converse(hass, "hello")
    await converse(hass, "hello", agent="conversation.agent_1")
    assert (
        loaded.recent[0].prefill_tokens
        < system_tokens
        < loaded.recent[1].prefill_tokens
    )


@pytest.mark.parametrize(
    "reply",
    [
        # arguments as a JSON string, an empty optional argument, text around the block
        'Sure. <tool_call>{"name": "HassTurnOn", "arguments": "{\\\\"name\\\\": \\\\"Kitchen\\\\", \\\\"area\\\\": \\\\"\\\\"}"}</tool_call> One moment.',
        # OpenAI-style wrapper inside a code fence, no closing tag
        '<tool_call>```json\\n{"function": {"name": "HassTurnOn", "arguments": {"name": "Kitchen"}}}\\n```',
        # two calls in one reply
        (
            '<tool_call>{"name": "HassTurnOn", "arguments": {"name": "Kitchen"}}</tool_call>'
            '<tool_call>{"name": "HassTurnOn", "arguments": {"name": "Porch"}}</tool_call>'
        ),
    ],
)
async def test_small_model_tool_call_forms(
    hass: HomeAssistant, make_entry: EntryFactory, reply: str
) -> None:
    """Tool calls small models get slightly wrong still run; the markup is never spoken."""
    assert await async_setup_component(hass, "intent", {})
    for name in ("Kitchen", "Porch"):
        entity_id = f"light.{name.lower()}"
        hass.states.async_set(entity_id, "off", {"friendly_name": name})
        async_expose_entity(hass, conversation.DOMAIN, entity_id, True)
    calls = async_mock_service(hass, "light", "turn_on")
    await make_entry(
        model_kwargs={
            "replies": (f"reply user lights => {reply}", "reply tool * => Done.")
        }
    )
    with chat_session.async_get_chat_session(hass) as session:
        result = await converse(hass, "lights please", session.conversation_id)
        with conversation.async_get_chat_log(hass, session) as chat_log:
            spoken = " ".join(
                c.content or ""
                for c in chat_log.content
                if isinstance(c, conversation.AssistantContent)
            )
    assert speech(result) == "Done."
    assert "<tool_call>" not in spoken
    assert "{" not in spoken
    turned_on = sorted(str(call.data["entity_id"]) for call in calls)
    assert turned_on[0] in ("light.kitchen", "['light.kitchen']")
    assert len(calls) == (2 if "Porch" in reply else 1)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("intent__HassTurnOn", "intent__HassTurnOn"),  # as the tools JSON names it
        ("HassTurnOn", "intent__HassTurnOn"),  # namespace dropped by the model
        ("GetState", "GetState"),  # two tools end with it: left for HA to refuse
        ("Unknown", "Unknown"),
    ],
)
def test_resolve_tool_name(name: str, expected: str) -> None:
    """A tool name without its namespace maps to the one tool that carries it."""
    tools = {"intent__HassTurnOn", "a__GetState", "b__GetState", "HassTurnOff"}
    assert resolve_tool_name(name, tools) == expected


async def test_nul_byte_is_refused(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """A message with a NUL is refused with a clear answer, never cut at the NUL."""
    entry = await make_entry()
    result = await converse(hass, "echo a\0b")
    assert result.response.response_type is intent.IntentResponseType.ERROR
    assert speech(result) == (
        "There is a NUL character in the message, where the runtime would silently "
        "cut the text; remove it and try again"
    )
    assert not model_session(entry).recent  # nothing reached the runtime
    assert speech(await converse(hass, "hello")) == "Hello from the simulator."


async def test_unknown_kv_size_does_not_fail_a_turn(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """A runtime that gives no KV size: turns are answered, history re-sent, not reused."""
    entry = await make_entry(model_kwargs={"extra": ("kv_cache_size_error 1",)})
    loaded = model_session(entry)
    first = await converse(hass, "hello")
    second = await converse(hass, "again", first.conversation_id)
    assert speech(first) == speech(second) == "Hello from the simulator."
    assert [run.reused_history for run in loaded.recent] == [False, False]
    record = last_run_record(entry)
    assert "hello<|im_end|>\n<|im_start|>assistant\n" in record["prompt"]
    assert record["request"] == "again"


async def test_turn_stopped_at_the_limit_resets_the_kv(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """After a run cut at max_new_tokens the KV is unknown: the next turn starts over."""
    long_reply = " ".join(f"w{i}" for i in range(60))
    entry = await make_entry(
        {"max_new_tokens": 5},
        model_kwargs={"replies": (f"default => {long_reply}",)},
    )
    loaded = model_session(entry)
    first = await converse(hass, "talk")
    assert speech(first).startswith("w0 w1")
    assert loaded.kv_messages is None
    await converse(hass, "more", first.conversation_id)
    assert [run.reused_history for run in loaded.recent] == [False, False]
    record = last_run_record(entry)
    assert "talk<|im_end|>\n<|im_start|>assistant\nw0" in record["prompt"]
    assert record["request"] == "more"


async def test_cache_without_finish_is_not_recorded(
    hass: HomeAssistant, make_entry: EntryFactory, cache_dir: Any
) -> None:
    """A build whose FINISH carries no perf fails; no cache of 0 tokens is stored."""
    entry = await make_entry(model_kwargs={"extra": ("emit_null_result 2",)})
    assert entry.state is ConfigEntryState.LOADED
    assert "did not finish building" in agent_issue_error(hass)
    assert not list(cache_dir.rglob("*.json"))
