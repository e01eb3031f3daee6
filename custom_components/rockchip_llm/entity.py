"""Base entity of our agents: device info and the chat loop."""

from collections.abc import AsyncGenerator, Collection
import json

from homeassistant.components import conversation
from homeassistant.config_entries import ConfigSubentry
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers import device_registry as dr, llm
from homeassistant.helpers.entity import Entity
from homeassistant.util import ulid

from . import RockchipConfigEntry
from .agent import Agent
from .agent_prefix import prefix_from_chat_log
from .const import DOMAIN, LOGGER, MAX_TOOL_ITERATIONS, HistoryStrategy
from .engine import Generation, RunStats, perf_or_zero
from .ha_compat import tool_error_delta, tool_result_data
from .rkllm.errors import RKLLMError
from .rkllm.runtime import RunRequest
from .run_planner import (
    ContextBudget,
    KVState,
    Message,
    PromptTooLong,
    SystemPrefix,
    estimate_tokens,
    expected_prefill,
    plan_run,
)
from .simulation import simulated_label
from .stream_parser import (
    ParsedToolCall,
    Piece,
    StreamParser,
    TextPiece,
    ThinkingPiece,
    ToolCallError,
)

INVALID_TOOL_CALL = "invalid_tool_call"


def messages_from_chat_log(
    chat_log: conversation.ChatLog, sent_tool_results: dict[str, str]
) -> list[Message]:
    """Reduce the chat log (after the system prompt) to what the model sees.

    A tool result is serialised once and remembered by its call id: Home Assistant
    fills the intent response inside a result after the turn (the final speech), so
    a second serialisation would no longer match what the model was sent.
    """
    messages: list[Message] = []
    for content in chat_log.content[1:]:
        if isinstance(content, conversation.UserContent):
            messages.append(Message("user", content.content))
        elif isinstance(content, conversation.AssistantContent):
            calls = [
                json.dumps(
                    {"name": call.tool_name, "arguments": call.tool_args},
                    ensure_ascii=False,
                )
                for call in content.tool_calls or ()
            ]
            text = "\n".join([content.content or "", *calls]).strip()
            messages.append(Message("assistant", text))
        elif isinstance(content, conversation.ToolResultContent):
            if not messages or messages[-1].role == "user":
                # A malformed tool call left no assistant content of its own.
                messages.append(Message("assistant", ""))
            result = sent_tool_results.get(content.tool_call_id)
            if result is None:
                result = json.dumps(
                    tool_result_data(content), ensure_ascii=False, default=str
                )
                sent_tool_results[content.tool_call_id] = result
            messages.append(Message("tool", result))
    return messages


def _answered(messages: list[Message]) -> tuple[Message, ...]:
    """Messages up to the last assistant answer (what the KV holds after a run)."""
    for index in range(len(messages) - 1, -1, -1):
        if messages[index].role == "assistant":
            return tuple(messages[: index + 1])
    return ()


def ready_subentries(
    entry: RockchipConfigEntry, subentry_type: str
) -> list[ConfigSubentry]:
    """Subentries of a type whose agent was set up (its model was found)."""
    return [
        subentry
        for subentry in entry.subentries.values()
        if subentry.subentry_type == subentry_type
        and subentry.subentry_id in entry.runtime_data.agents
    ]


def agent_device_info(agent: Agent, subentry: ConfigSubentry) -> dr.DeviceInfo:
    """Return the device of an agent; with the simulator, its labels say so."""
    version = agent.engine.library.info.version
    simulated = agent.engine.simulated
    return dr.DeviceInfo(
        identifiers={(DOMAIN, subentry.subentry_id)},
        name=subentry.title,
        manufacturer="Rockchip",
        model=simulated_label(agent.loaded.name) if simulated else agent.loaded.name,
        sw_version=f"RKLLM simulator (runtime {version} ABI)"
        if simulated
        else f"RKLLM runtime {version}",
        entry_type=dr.DeviceEntryType.SERVICE,
    )


class RockchipLLMBaseEntity(Entity):
    """An agent backed by a model on the NPU."""

    _attr_has_entity_name = True
    _attr_name = None

    def __init__(self, entry: RockchipConfigEntry, subentry: ConfigSubentry) -> None:
        """Set up identity and device info."""
        self.entry = entry
        self.subentry = subentry
        self._attr_unique_id = subentry.subentry_id
        self._attr_device_info = agent_device_info(self.agent, subentry)

    @property
    def agent(self) -> Agent:
        """The agent's runtime state."""
        return self.entry.runtime_data.agents[self.subentry.subentry_id]

    @property
    def history_strategy(self) -> HistoryStrategy:
        """How this agent reuses the KV cache now (a fallback if the runtime refused)."""
        return self.agent.strategy

    async def _async_handle_chat_log(
        self, chat_log: conversation.ChatLog, instructions: str | None = None
    ) -> None:
        """Answer the chat log, running tools until the model is done.

        instructions, when given, are appended to the input of the first run.
        """
        agent = self.agent
        settings = agent.settings
        loaded = agent.loaded
        engine = agent.engine
        prefix, volatile = prefix_from_chat_log(chat_log)
        try:
            async with engine.async_hold(loaded):
                try:
                    await engine.async_set_prefix(
                        loaded, prefix, thinking=settings.enable_thinking
                    )
                    # Read under the lock: a warm-up check may just have changed it.
                    if self.history_strategy is HistoryStrategy.OFF:
                        await engine.async_use_cache(loaded, None)
                    else:
                        cache = await engine.async_find_cache(loaded, prefix)
                        if agent.chat:
                            agent.prefix_seen(
                                prefix, cached=engine.is_exact(cache, prefix)
                            )
                        # Without a cache for this exact prompt, the agent's system
                        # cache still saves its identical leading tokens.
                        await engine.async_try_use_cache(loaded, cache or agent.cache)
                    for _iteration in range(MAX_TOOL_ITERATIONS):
                        # A check of the previous run may have switched the strategy.
                        keep_history = self.history_strategy is HistoryStrategy.AUTO
                        await self._async_run_once(
                            chat_log, prefix, keep_history, instructions, volatile
                        )
                        instructions = None
                        if not chat_log.unresponded_tool_results:
                            break
                except RKLLMError:
                    loaded.kv = None  # unknown after a failed run
                    raise
        except PromptTooLong as err:
            LOGGER.warning(
                "%s: request refused, it does not fit the context: %s",
                loaded.name,
                err,
            )
            raise HomeAssistantError(
                translation_domain=DOMAIN,
                translation_key="prompt_too_long"
                if err.prefix_too_long
                else "input_too_long",
                translation_placeholders={
                    "max_context_len": str(settings.max_context_len),
                    "prefix_tokens": str(err.budget.prefix_tokens),
                    "input_tokens": str(err.input_tokens),
                },
            ) from err
        except RKLLMError as err:
            raise HomeAssistantError(
                translation_domain=DOMAIN,
                translation_key="generation_failed",
                translation_placeholders={"error": str(err)},
            ) from err

    async def _async_run_once(
        self,
        chat_log: conversation.ChatLog,
        prefix: SystemPrefix,
        keep_history: bool,
        instructions: str | None,
        volatile: str,
    ) -> None:
        """Send the chat log's pending input to the model and stream the answer.

        volatile (HA's current-time line, kept out of the cached prefix) goes in
        front of a user turn.
        """
        agent = self.agent
        settings = agent.settings
        loaded = agent.loaded
        cache = loaded.loaded_cache
        # Exact for a cache of this very prefix; otherwise a conservative estimate.
        exact_cache = (
            self.history_strategy is not HistoryStrategy.OFF
            and cache is not None
            and cache.metadata is not None
            and agent.engine.is_exact(cache, prefix)
        )
        prefix_tokens = (
            cache.metadata.tokens
            if exact_cache and cache and cache.metadata
            else estimate_tokens(prefix.prompt + prefix.tools_json)
        )
        plan = plan_run(
            loaded.kv,
            prefix,
            messages_from_chat_log(chat_log, loaded.sent_tool_results),
            keep_history=keep_history,
            max_history=settings.max_history,
            budget=ContextBudget(
                max_context_len=settings.max_context_len,
                prefix_tokens=prefix_tokens,
                kv_tokens=max(loaded.kv_tokens, prefix_tokens),
                reply_tokens=settings.max_new_tokens,
                extra_tokens=estimate_tokens(
                    f"{volatile}\n\n{instructions or ''}\n\n"
                    if volatile or instructions
                    else ""
                ),
            ),
        )
        if plan.max_new_tokens < settings.max_new_tokens:
            LOGGER.debug(
                "%s: answer budget shrunk to %d tokens to fit the context",
                loaded.name,
                plan.max_new_tokens,
            )
        if plan.dropped_messages:
            LOGGER.debug(
                "%s: %d earlier messages left out to fit the context",
                loaded.name,
                plan.dropped_messages,
            )
        if not plan.reuse_history:
            # "off" measures the no-reuse baseline: not even the system prompt stays.
            await agent.engine.async_reset_kv(
                loaded, keep_system=self.history_strategy is not HistoryStrategy.OFF
            )
        prompt = f"{plan.prompt}\n\n{instructions}" if instructions else plan.prompt
        if volatile and plan.role == "user":
            prompt = f"{volatile}\n\n{prompt}"
        generation = Generation(
            loaded,
            RunRequest(
                prompt=prompt,
                role=plan.role,
                enable_thinking=settings.enable_thinking,
                keep_history=keep_history,
                sampling=settings.sampling,
                max_new_tokens=plan.max_new_tokens,
            ),
        )
        loaded.kv = None  # unknown until the run completes
        tool_names = (
            {tool.name for tool in chat_log.llm_api.tools}
            if chat_log.llm_api
            else set()
        )
        async for _content in chat_log.async_add_delta_content_stream(
            self.entity_id, _deltas(generation, tool_names)
        ):
            pass
        if keep_history:
            agent.engine.note_kv(
                loaded,
                KVState(
                    prefix.key,
                    _answered(
                        messages_from_chat_log(chat_log, loaded.sent_tool_results)
                    ),
                ),
                generation.result,
            )
        result = generation.result
        if (
            result is not None
            and result.perf is not None
            and not result.aborted
            and (plan.reuse_history or exact_cache)
        ):
            agent.check_reuse(
                result.perf.prefill_tokens,
                expected_prefill(prompt),
                prefix_tokens,
                "request",
            )
        perf = perf_or_zero(result.perf if result else None)
        agent.engine.record(
            loaded,
            RunStats(
                agent=self.subentry.subentry_id,
                prefill_tokens=perf.prefill_tokens,
                prefill_ms=perf.prefill_time_ms,
                generate_tokens=perf.generate_tokens,
                generate_ms=perf.generate_time_ms,
                ttft_ms=generation.ttft_ms,
                reused_history=plan.reuse_history,
                cache=cache.name if cache else None,
            ),
        )


def resolve_tool_name(name: str, tool_names: Collection[str]) -> str:
    """Return the API's name for a tool the model may have named without its namespace.

    Home Assistant namespaces tool names (intent__HassTurnOn); small models often
    drop the namespace. A name that matches exactly one tool's suffix is mapped.
    """
    if name in tool_names:
        return name
    matches = [tool for tool in tool_names if tool.endswith(f"__{name}")]
    return matches[0] if len(matches) == 1 else name


async def _deltas(
    generation: Generation, tool_names: Collection[str]
) -> AsyncGenerator[
    conversation.AssistantContentDeltaDict | conversation.ToolResultContentDeltaDict
]:
    """Turn generated text into chat-log deltas (text, thinking, tool calls)."""
    parser = StreamParser()
    errors: list[ToolCallError] = []
    yield {"role": "assistant"}
    async for text in generation:
        for piece in parser.feed(text):
            if (delta := _delta(piece, errors, tool_names)) is not None:
                yield delta
    for piece in parser.finish():
        if (delta := _delta(piece, errors, tool_names)) is not None:
            yield delta
    for error in errors:
        yield tool_error_delta(
            ulid.ulid_now(),
            INVALID_TOOL_CALL,
            f"Your tool call was not valid JSON ({error.error}). "
            "Reply with a corrected <tool_call> block.",
        )


def _delta(
    piece: Piece, errors: list[ToolCallError], tool_names: Collection[str]
) -> conversation.AssistantContentDeltaDict | None:
    if isinstance(piece, TextPiece):
        return {"content": piece.text}
    if isinstance(piece, ThinkingPiece):
        return {"thinking_content": piece.text}
    if isinstance(piece, ParsedToolCall):
        return {
            "tool_calls": [
                llm.ToolInput(
                    tool_name=resolve_tool_name(piece.name, tool_names),
                    tool_args=piece.arguments,
                )
            ]
        }
    errors.append(piece)
    return None
