"""The model session on its own, without Home Assistant: the seam the entity and the bench use."""

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from custom_components.rockchip_llm.const import HistoryStrategy
from custom_components.rockchip_llm.engine import Engine
from custom_components.rockchip_llm.host.rkllm.runtime import ModelParams, Sampling
from custom_components.rockchip_llm.host.server import HostConfig
from custom_components.rockchip_llm.link import LocalHost, async_connect
from custom_components.rockchip_llm.remote import RuntimeHost
from custom_components.rockchip_llm.run_planner import Message, SystemPrefix
from custom_components.rockchip_llm.session import ModelSession
from custom_components.rockchip_llm.turn import ReplyOptions

from .conftest import HOST_PYTHON, ModelWriter

PREFIX = SystemPrefix(
    "You are a voice assistant for a home. " * 60,
    '[{"type": "function", "function": {"name": "HassTurnOn", "parameters": {}}}]',
)
OPTIONS = ReplyOptions(
    agent="agent",
    max_context_len=4096,
    max_new_tokens=64,
    max_history=10,
    sampling=Sampling(),
    enable_thinking=False,
)


class Guard:
    """The agent's side of the reuse checks: a fixed strategy, every check kept."""

    def __init__(self, strategy: HistoryStrategy = HistoryStrategy.AUTO) -> None:
        """Run with strategy; no fallback."""
        self.strategy = strategy
        self.checks: list[tuple[int, int, int, str]] = []

    def check_reuse(
        self, prefill_tokens: int, expected: int, prefix_tokens: int, source: str
    ) -> bool:
        """Keep the check; judge it as the agent would."""
        self.checks.append((prefill_tokens, expected, prefix_tokens, source))
        return prefill_tokens <= expected + prefix_tokens // 2


@pytest.fixture
async def session(
    sim_library: Path, models_dir: Path, tmp_path: Path, write_model: ModelWriter
) -> AsyncIterator[ModelSession]:
    """A session of the simulated model on a host of its own, closed afterwards."""
    write_model()
    link, hello = await async_connect(
        LocalHost(
            HostConfig(
                library=sim_library,
                models_dir=models_dir,
                cache_dir=tmp_path / "cache",
                cache_budget_bytes=10**9,
            ),
            python=HOST_PYTHON,
        ),
        "test_session",
    )
    host = RuntimeHost(link, hello)
    assert host.runtime is not None
    engine = Engine(host, host.runtime)
    try:
        info = (await host.async_scan()).models["Qwen3 Sim"]
        yield await engine.async_acquire(
            info, ModelParams(model_path=info.path, max_context_len=4096)
        )
    finally:
        await engine.async_close()
        await host.async_close()


async def ask(
    session: ModelSession,
    guard: Guard,
    messages: list[Message],
    read: Callable[[], list[Message]] | None = None,
) -> str:
    """Answer the last message in one turn; the answer joins messages before it ends.

    As in Home Assistant's chat log: when the turn ends, the session reads the
    conversation (read, default messages) to record what the KV holds.
    """
    async with session.async_conversation(PREFIX, OPTIONS, guard) as conversation:
        answer = "".join(
            [text async for text in conversation.reply(read or (lambda: messages))]
        )
        messages.append(Message("assistant", answer))
    return answer


async def test_follow_up_prefills_only_its_own_words(session: ModelSession) -> None:
    """With the prefix cached and the KV kept, a follow-up prefills only the new turn."""
    guard = Guard()
    cache = await session.async_prepare(PREFIX, "system", "test", guard)
    assert cache is not None and cache.metadata is not None
    assert cache.metadata.tokens > 300
    messages = [Message("user", "hello")]
    await ask(session, guard, messages)
    messages.append(Message("user", "and what else can you do for me today"))
    answer = await ask(session, guard, messages)
    assert answer == "Hello from the simulator."
    first, second = session.recent
    assert first.cache == second.cache == "system"
    assert second.reused_history
    assert second.prefill_tokens < 40  # its own words, not the 300+ prefix tokens
    assert session.kv_messages == 4
    assert guard.checks[-1][3] == "request"


async def test_tool_result_is_sent_as_first_sent(session: ModelSession) -> None:
    """A tool result whose text changes after the turn still matches the KV.

    Home Assistant fills the final speech into a tool result after the turn; the
    session remembers each result by its call id, so the next turn reuses the KV
    instead of prefilling the whole conversation again.
    """
    guard = Guard()
    await session.async_prepare(PREFIX, "system", "test", guard)
    result = '{"speech": {}}'
    messages = [Message("user", "turn on the kitchen")]

    def conversation() -> list[Message]:
        return [
            Message("tool", result, "call-1") if message.role == "tool" else message
            for message in messages
        ]

    async with session.async_conversation(PREFIX, OPTIONS, guard) as turn:
        call = "".join([text async for text in turn.reply(conversation)])
        assert "HassTurnOn" in call
        messages.extend([Message("assistant", call), Message("tool", "", "call-1")])
        done = "".join([text async for text in turn.reply(conversation)])
        messages.append(Message("assistant", done))
    assert done == "Done."
    result = '{"speech": {"plain": {"speech": "Turned on the kitchen"}}}'
    messages.append(Message("user", "thank you"))
    await ask(session, guard, messages, conversation)
    assert session.recent[-1].reused_history
    assert session.kv_messages == 6


async def test_deleted_cache_is_no_longer_ready(session: ModelSession) -> None:
    """Deleting a cache through the session forgets it: nobody holds a stale entry."""
    guard = Guard()
    cache = await session.async_prepare(PREFIX, "system", "test", guard)
    assert session.ready_cache("system") is cache
    assert session.loaded_cache is cache
    assert await session.async_delete_cache("system")
    assert session.ready_cache("system") is None
    assert session.loaded_cache is None
    assert not cache.bin_path.exists()


async def test_new_conversation_starts_from_the_system_prompt(
    session: ModelSession,
) -> None:
    """The first run of another conversation clears the KV back to the system prompt.

    The clear travels with the run (one round trip to the worker, not two).
    """
    guard = Guard()
    await session.async_prepare(PREFIX, "system", "test", guard)
    earlier = [Message("user", "hello")]
    await ask(session, guard, earlier)
    kv_of_one_turn = session.kv_tokens
    earlier.append(Message("user", "and what else can you do for me today"))
    await ask(session, guard, earlier)
    assert session.kv_tokens > kv_of_one_turn
    await ask(session, guard, [Message("user", "hello")])
    assert not session.recent[-1].reused_history
    assert session.kv_tokens == kv_of_one_turn
