"""A crash, abort() or hang of the runtime never takes Home Assistant down."""

import asyncio
import logging
import os
from pathlib import Path
import signal
from typing import Any

import pytest

from custom_components.rockchip_llm import session as session_module
from custom_components.rockchip_llm.const import CONF_STALL_TIMEOUT
from custom_components.rockchip_llm.host.rkllm import worker as worker_module
from custom_components.rockchip_llm.session import ModelSession
from homeassistant.components import conversation
from homeassistant.config_entries import ConfigEntryState
from homeassistant.const import STATE_UNAVAILABLE
from homeassistant.core import Context, HomeAssistant
from homeassistant.helpers import chat_session, intent

from .conftest import EntryFactory, ModelWriter, agent_issue_error, agent_issues
from .sim_words import words

AGENT = "conversation.agent_0"
SLOW = words(200)


@pytest.fixture(autouse=True)
def quick_restarts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Restart died workers without the production pauses."""
    monkeypatch.setattr(session_module, "RESTART_BACKOFF_S", (0.0, 0.0, 0.0, 0.0))


async def converse(
    hass: HomeAssistant, text: str, agent: str = AGENT
) -> conversation.ConversationResult:
    """Ask an agent."""
    return await conversation.async_converse(
        hass, text, None, Context(), agent_id=agent
    )


def speech(result: conversation.ConversationResult) -> str:
    """The plain speech of a result."""
    text: str = result.response.speech["plain"]["speech"]
    return text


def session_of(entry: object, index: int = 0) -> ModelSession:
    """The loaded model of the entry's agent number index."""
    agents = list(entry.runtime_data.agents.values())  # type: ignore[attr-defined]
    loaded: ModelSession = agents[index].session
    return loaded


async def start_answer(hass: HomeAssistant) -> asyncio.Task:
    """Start a long answer and return once its text is streaming."""
    streaming = asyncio.Event()

    def listener(_chat_log: conversation.ChatLog, delta: dict[str, Any]) -> None:
        if delta.get("content"):
            streaming.set()

    async def answer() -> conversation.ConversationResult:
        with (
            chat_session.async_get_chat_session(hass) as session,
            conversation.async_get_chat_log(
                hass, session, chat_log_delta_listener=listener
            ),
        ):
            return await conversation.async_converse(
                hass, "talk", session.conversation_id, Context(), agent_id=AGENT
            )

    task = hass.async_create_task(answer())
    await asyncio.wait_for(streaming.wait(), 30)
    return task


async def test_crash_mid_answer_is_an_error_and_the_model_comes_back(
    hass: HomeAssistant,
    make_entry: EntryFactory,
    write_model: ModelWriter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SIGSEGV in the runtime: a spoken error, other models answer, the next request works.

    What is spoken is one plain sentence; the signal and the runtime's last lines
    are in the log.
    """
    write_model(replies=(f"default => {SLOW}",), decode_ms_per_token=5)
    write_model("Other")
    entry = await make_entry({}, {"model": "Other"})
    loaded = session_of(entry)
    first_pid = loaded.worker.pid
    assert first_pid is not None and first_pid != os.getpid()
    task = await start_answer(hass)
    with caplog.at_level(logging.WARNING):
        os.kill(first_pid, signal.SIGSEGV)
        result = await task
    assert result.response.response_type is intent.IntentResponseType.ERROR
    assert speech(result) == (
        "Sorry, my language model stopped while answering; please ask again"
    )
    assert "ended (SIGSEGV); its last output:" in caplog.text
    assert "I rkllm: rkllm-runtime version" in caplog.text
    # Home Assistant and the other model's worker are untouched.
    other = await converse(hass, "hello", "conversation.agent_1")
    assert speech(other) == "Hello from the simulator."
    assert entry.state is ConfigEntryState.LOADED
    # The crashed model is started again for the next request.
    again = await converse(hass, "talk")
    assert speech(again) == SLOW
    assert loaded.worker.pid not in (None, first_pid)
    assert loaded.failure is None


async def test_abort_signal_in_an_idle_worker_is_survived(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """A worker that dies between requests (abort()) is replaced by the next one."""
    entry = await make_entry()
    loaded = session_of(entry)
    pid = loaded.worker.pid
    assert pid is not None
    os.kill(pid, signal.SIGABRT)
    while loaded.worker.death is None:
        await asyncio.sleep(0.01)
    assert "SIGABRT" in str(loaded.worker.death)
    assert speech(await converse(hass, "hello")) == "Hello from the simulator."


async def test_a_model_that_keeps_dying_is_given_up_until_reload(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """No restart loop hammering the NPU: after 5 deaths in 10 minutes it stays down."""
    entry = await make_entry()
    loaded = session_of(entry)
    for _death in range(session_module.MAX_DEATHS):
        pid = loaded.worker.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        while loaded.worker.death is None:
            await asyncio.sleep(0.01)
        result = await converse(hass, "hello")
    assert result.response.response_type is intent.IntentResponseType.ERROR
    assert speech(result) == (
        "Sorry, my language model keeps stopping, so it was switched off; reload "
        "the Rockchip LLM integration to try again"
    )
    assert loaded.failure is not None
    assert loaded.worker.pid == pid  # not started again
    # Given up: its agent says so in one sentence and its entities are unavailable.
    assert speech(await converse(hass, "hello")) == (
        "Agent 0 cannot answer: the runtime process of model Qwen3 Sim kept crashing "
        "and was stopped; reload the integration (Settings, Devices & services, "
        "Rockchip LLM) to try again"
    )
    assert hass.states.get(AGENT).state == STATE_UNAVAILABLE
    [issue] = agent_issues(hass)  # its repair: reload (its fix flow tries again)
    assert issue.is_fixable
    # The repair has the details, the runtime's last lines among them.
    error = agent_issue_error(hass)
    assert "died 5 times within 10 minutes" in error
    assert "I rkllm: rkllm-runtime version" in error
    assert await hass.config_entries.async_reload(entry.entry_id)
    assert speech(await converse(hass, "hello")) == "Hello from the simulator."
    assert hass.states.get(AGENT).state != STATE_UNAVAILABLE
    assert not agent_issues(hass)


async def test_a_wedged_run_is_stopped_and_the_model_comes_back(
    hass: HomeAssistant,
    make_entry: EntryFactory,
    write_model: ModelWriter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run that stops producing text and ignores the abort: the worker is killed.

    The watchdog time is the entry's setting (1 s here).
    """
    monkeypatch.setattr(worker_module, "ABORT_GRACE", 0.5)
    write_model(replies=(f"default => {SLOW}",), decode_ms_per_token=5)
    entry = await make_entry(setup=False)
    hass.config_entries.async_update_entry(
        entry, data={**entry.data, CONF_STALL_TIMEOUT: 1}
    )
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    loaded = session_of(entry)
    pid = loaded.worker.pid
    assert pid is not None
    task = await start_answer(hass)
    os.kill(pid, signal.SIGSTOP)  # frozen: no text, no reaction to the abort
    result = await task
    assert result.response.response_type is intent.IntentResponseType.ERROR
    assert "produced no text for 1 s" in speech(result)
    assert "SIGKILL" in str(loaded.worker.death)
    assert speech(await converse(hass, "talk")) == SLOW


async def test_model_file_removed_while_running(
    hass: HomeAssistant,
    make_entry: EntryFactory,
    models_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The model's file removed, then its worker restarted: the answer and log say so.

    Not "rkllm_init failed ... check the model file, the runtime version and the
    context length": the file is named, the spoken answer says what to do.
    """
    entry = await make_entry()
    loaded = session_of(entry)
    path = models_dir / "Qwen3 Sim" / "model.rkllm"
    await hass.async_add_executor_job(path.unlink)
    pid = loaded.worker.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    while loaded.worker.death is None:
        await asyncio.sleep(0.01)
    with caplog.at_level(logging.WARNING):
        result = await converse(hass, "hello")
    assert result.response.response_type is intent.IntentResponseType.ERROR
    assert speech(result) == (
        "Sorry, my model file is gone from the runtime host; put it back or pick "
        "another model for me, then reload the Rockchip LLM integration"
    )
    assert f"the model file {path} of Qwen3 Sim is gone" in caplog.text
    assert "rkllm_init failed" not in caplog.text
