"""Base entity of our agents: device info and the chat loop."""

from collections.abc import AsyncGenerator, AsyncIterator, Collection
from dataclasses import dataclass, field
import json

from homeassistant.components import conversation
from homeassistant.config_entries import ConfigSubentry
from homeassistant.core import callback
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers import device_registry as dr, llm
from homeassistant.helpers.entity import Entity
from homeassistant.util import ulid

from . import RockchipConfigEntry
from .agent import Agent
from .agent_prefix import prefix_from_chat_log
from .agent_state import AgentFailure
from .const import CONF_MODEL, DOMAIN, LOGGER, MAX_TOOL_ITERATIONS
from .early_turn import EarlyTurn
from .errors import generation_failed
from .ha_compat import tool_error_delta, tool_result_data, via_device
from .host.rkllm.errors import RKLLMError
from .run_planner import Message, PromptTooLong
from .simulation import simulated_label
from .stream_parser import (
    ParsedToolCall,
    Piece,
    StreamParser,
    TextPiece,
    ThinkingPiece,
    ToolCallError,
)
from .turn import MessageSource

INVALID_TOOL_CALL = "invalid_tool_call"


def messages_from_chat_log(
    chat_log: conversation.ChatLog, agent_id: str
) -> list[Message]:
    """Reduce the chat log (after the system prompt) to what the model sees.

    What Home Assistant handled itself ("Prefer handling commands locally", sentence
    triggers: external tool calls, answers of another agent than agent_id) becomes
    one note per request, told as Home Assistant's, never as the model's turns.
    """
    messages: list[Message] = []
    local: LocalExchange | None = None
    for content in chat_log.content[1:]:
        if isinstance(content, conversation.UserContent):
            local = None
            messages.append(Message("user", content.content))
        elif isinstance(content, conversation.AssistantContent) and (
            content.agent_id != agent_id
            or any(call.external for call in content.tool_calls or ())
        ):
            if local is None:
                request = (
                    messages.pop() if messages and messages[-1].role == "user" else None
                )
                local = LocalExchange(request.text if request else "")
                local.add(content)
                messages.append(Message("local", local.text()))
            else:
                local.add(content)
                messages[-1] = Message("local", local.text())
        elif isinstance(content, conversation.AssistantContent):
            calls = tuple(
                json.dumps(
                    {"name": call.tool_name, "arguments": call.tool_args},
                    ensure_ascii=False,
                )
                for call in content.tool_calls or ()
            )
            messages.append(
                Message("assistant", (content.content or "").strip(), tool_calls=calls)
            )
        elif isinstance(content, conversation.ToolResultContent):
            if local is not None:
                continue  # the result of Home Assistant's own call: its answer says it
            if not messages or messages[-1].role == "user":
                # A malformed tool call left no assistant content of its own.
                messages.append(Message("assistant", ""))
            result = json.dumps(
                tool_result_data(content), ensure_ascii=False, default=str
            )
            messages.append(Message("tool", result, content.tool_call_id))
    return messages


@dataclass(slots=True)
class LocalExchange:
    """A request Home Assistant handled without the model: what it did and said."""

    request: str
    actions: list[str] = field(default_factory=list)
    answer: str = ""

    def add(self, content: conversation.AssistantContent) -> None:
        """Take Home Assistant's tool calls and answer from content."""
        self.actions.extend(
            f"{call.tool_name} {json.dumps(call.tool_args, ensure_ascii=False)}"
            for call in content.tool_calls or ()
        )
        if content.content:
            self.answer = content.content

    def text(self) -> str:
        """Say it as Home Assistant's: the model was not asked."""
        did = f" ran {', '.join(self.actions)} and" if self.actions else ""
        return (
            "Home Assistant handled this itself, without you: "
            f"the user said {json.dumps(self.request, ensure_ascii=False)}; "
            f"Home Assistant{did} answered "
            f"{json.dumps(self.answer, ensure_ascii=False)}."
        )


def only_invalid_tool_calls(chat_log: conversation.ChatLog) -> bool:
    """Whether the turn's tool calls were all invalid (so no action was taken)."""
    results = [
        content
        for content in chat_log.content[chat_log.llm_input_provided_index :]
        if isinstance(content, conversation.ToolResultContent)
    ]
    return bool(results) and all(
        result.tool_name == INVALID_TOOL_CALL for result in results
    )


def agent_subentries(
    entry: RockchipConfigEntry, subentry_type: str
) -> list[ConfigSubentry]:
    """Return the agent subentries of a type; one that failed gets its entities too."""
    return [
        subentry
        for subentry in entry.subentries.values()
        if subentry.subentry_type == subentry_type
    ]


def agent_device_info(
    entry: RockchipConfigEntry, subentry: ConfigSubentry
) -> dr.DeviceInfo:
    """Return the device of an agent; with the simulator, its labels say so."""
    engine = entry.runtime_data.engine
    model = subentry.data[CONF_MODEL]
    version = engine.runtime.version
    simulated = engine.host.simulated
    info = dr.DeviceInfo(
        identifiers={(DOMAIN, subentry.subentry_id)},
        name=subentry.title,
        manufacturer="Rockchip",
        model=simulated_label(model) if simulated else model,
        sw_version=f"RKLLM simulator (runtime {version} ABI)"
        if simulated
        else f"RKLLM runtime {version}",
        entry_type=dr.DeviceEntryType.SERVICE,
    )
    info.update(via_device(entry.runtime_data.host_device))
    return info


class AgentEntity(Entity):
    """An entity on an agent's device; the agent may be unable to answer.

    Such an agent's entities are unavailable, except those whose reading explains
    why (agent_state.EXPLAINED_BY). They follow the model's changes (pushed).
    """

    _attr_has_entity_name = True
    _attr_should_poll = False
    follows: frozenset[str] | None = None
    """The kinds of change of the model (session.QUEUE, RUNS) that can alter the
    reading, besides the others; None: every one."""

    def __init__(self, entry: RockchipConfigEntry, subentry: ConfigSubentry) -> None:
        """Bind the entity to its agent and its device."""
        self.entry = entry
        self.subentry = subentry
        self._runtime = entry.runtime_data
        self._attr_device_info = agent_device_info(entry, subentry)

    @property
    def agent(self) -> Agent:
        """The agent's runtime state (only while available)."""
        return self._runtime.agents[self.subentry.subentry_id]

    @property
    def set_up_agent(self) -> Agent | None:
        """The agent's runtime state; None when it was not set up."""
        return self._runtime.agents.get(self.subentry.subentry_id)

    @property
    def failure(self) -> AgentFailure | None:
        """Why the agent cannot answer (None: it can)."""
        return self._runtime.failure(self.subentry.subentry_id)

    def explains(self, failure: AgentFailure) -> bool:
        """Whether this entity's reading explains failure (it then stays available)."""
        return False

    @property
    def available(self) -> bool:
        """Available while the agent's model is loaded and the agent can answer."""
        agent = self.set_up_agent
        if agent is None or not agent.session.available:
            return False
        failure = self.failure
        return failure is None or self.explains(failure)

    def reading(self) -> object:
        """Return what the entity shows; its state is written when this changes."""
        return None

    def _shown(self) -> tuple[bool, object]:
        available = self.available
        return available, self.reading() if available else None

    async def async_added_to_hass(self) -> None:
        """Follow the model's changes (an agent that was not set up has none)."""
        await super().async_added_to_hass()
        if (agent := self.set_up_agent) is None:
            return
        shown = self._shown()

        @callback
        def changed() -> None:
            # The model notifies several times per request (queued, taken,
            # released, measured): only a reading that changed is written.
            nonlocal shown
            now = self._shown()
            if now != shown:
                shown = now
                self.async_write_ha_state()

        self.async_on_remove(agent.session.add_listener(changed, self.follows))


class RockchipLLMBaseEntity(AgentEntity):
    """An agent backed by a model on the NPU."""

    _attr_name = None

    def __init__(self, entry: RockchipConfigEntry, subentry: ConfigSubentry) -> None:
        """Set up identity and device info."""
        super().__init__(entry, subentry)
        self._attr_unique_id = subentry.subentry_id

    def check_can_answer(self) -> None:
        """Raise the one-sentence answer of an agent that cannot answer."""
        if (failure := self.failure) is not None:
            raise failure.answer(self.subentry.title, self.subentry.data[CONF_MODEL])

    def chat_messages(self, chat_log: conversation.ChatLog) -> MessageSource:
        """Return the source of the chat log's messages as this agent's model sees them."""
        return lambda: messages_from_chat_log(chat_log, self.entity_id)

    async def _async_handle_chat_log(
        self,
        chat_log: conversation.ChatLog,
        instructions: str | None = None,
        *,
        device_id: str | None = None,
        early: EarlyTurn | None = None,
    ) -> None:
        """Answer the chat log, running tools until the model is done.

        instructions, when given, are appended to the input of the first run;
        early is the turn started before the prompt was rendered, for device_id.
        """
        agent = self.agent
        trim = agent.system_cache.trim if agent.system_cache else 0
        prefix, volatile, _layout = prefix_from_chat_log(chat_log, trim)
        tool_names = (
            {tool.name for tool in chat_log.llm_api.tools}
            if chat_log.llm_api
            else set()
        )
        try:
            async with agent.async_turn(
                prefix, volatile=volatile, device_id=device_id, early=early
            ) as (conversation, started):
                for _iteration in range(MAX_TOOL_ITERATIONS):
                    reply = started or conversation.reply(
                        self.chat_messages(chat_log),
                        instructions=instructions,
                        volatile=volatile,
                    )
                    started = None
                    async for _content in chat_log.async_add_delta_content_stream(
                        self.entity_id, _deltas(reply, tool_names)
                    ):
                        pass
                    instructions = None
                    if not chat_log.unresponded_tool_results:
                        break
        except PromptTooLong as err:
            LOGGER.warning(
                "%s: request refused, it does not fit the context: %s",
                agent.session.name,
                err,
            )
            raise HomeAssistantError(
                translation_domain=DOMAIN,
                translation_key="prompt_too_long"
                if err.prefix_too_long
                else "input_too_long",
                translation_placeholders={
                    "max_context_len": str(agent.settings.max_context_len),
                    "prefix_tokens": str(err.budget.prefix_tokens),
                    "input_tokens": str(err.input_tokens),
                },
            ) from err
        except RKLLMError as err:
            LOGGER.warning("%s could not answer: %s", agent.title, err)
            raise generation_failed(err) from err


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
    reply: AsyncIterator[str], tool_names: Collection[str]
) -> AsyncGenerator[
    conversation.AssistantContentDeltaDict | conversation.ToolResultContentDeltaDict
]:
    """Turn generated text into chat-log deltas (text, thinking, tool calls)."""
    parser = StreamParser()
    errors: list[ToolCallError] = []
    yield {"role": "assistant"}
    async for text in reply:
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
