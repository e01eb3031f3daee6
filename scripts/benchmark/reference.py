"""The reference agent: what any streaming LLM agent costs Home Assistant, without a model.

A minimal conversation entity that does what every LLM agent in HA does (the
chat log's async_provide_llm_data with the same API and prompt as ours, a reply
streamed delta by delta through async_add_delta_content_stream, the result from
the chat log) and nothing else: a fixed reply, split into the simulator's tokens.
Ours minus this is the integration's own overhead.
"""

from collections.abc import AsyncGenerator, Mapping
import re
from typing import Any, Literal

from custom_components.rockchip_llm.const import CONF_PROMPT
from homeassistant.components import conversation
from homeassistant.components.conversation.const import DATA_COMPONENT
from homeassistant.const import CONF_LLM_HASS_API, MATCH_ALL
from homeassistant.core import HomeAssistant

# The simulator's tokens: a word of up to 8 letters or digits with its leading
# space, or a run of other characters (tests/rkllm_sim/README.md, "Tokenizer").
_TOKEN = re.compile(r" ?[A-Za-z0-9]{1,8}|[^A-Za-z0-9 ]{1,4}| ")


def sim_tokens(text: str) -> list[str]:
    """Split text into the pieces the simulator would stream for it."""
    return _TOKEN.findall(text)


class ReferenceAgent(conversation.ConversationEntity):
    """Streams a fixed reply per message through the chat log; no model, no tools run."""

    _attr_has_entity_name = True
    _attr_name = "Reference"
    _attr_unique_id = "bench_reference"
    _attr_supports_streaming = True

    def __init__(self, options: Mapping[str, Any], replies: Mapping[str, str]) -> None:
        """Answer each message in replies (its text as the key) with its reply."""
        self._options = options
        self.replies = {text: sim_tokens(reply) for text, reply in replies.items()}

    @property
    def supported_languages(self) -> list[str] | Literal["*"]:
        """Every language, as ours."""
        return MATCH_ALL

    async def _async_handle_message(
        self,
        user_input: conversation.ConversationInput,
        chat_log: conversation.ChatLog,
    ) -> conversation.ConversationResult:
        """Provide the prompt and tools as ours does, then stream the fixed reply."""
        try:
            await chat_log.async_provide_llm_data(
                user_input.as_llm_context("bench_reference"),
                self._options.get(CONF_LLM_HASS_API),
                self._options.get(CONF_PROMPT),
                user_input.extra_system_prompt,
            )
        except conversation.ConverseError as err:
            return err.as_conversation_result()
        async for _content in chat_log.async_add_delta_content_stream(
            self.entity_id, _deltas(self.replies[user_input.text])
        ):
            pass
        return conversation.async_get_result_from_chat_log(user_input, chat_log)


async def _deltas(
    pieces: list[str],
) -> AsyncGenerator[conversation.AssistantContentDeltaDict]:
    yield {"role": "assistant"}
    for piece in pieces:
        yield {"content": piece}


async def async_add_reference(
    hass: HomeAssistant, options: Mapping[str, Any], replies: Mapping[str, str]
) -> ReferenceAgent:
    """Add the reference agent to the conversation component; return it."""
    agent = ReferenceAgent(options, replies)
    await hass.data[DATA_COMPONENT].async_add_entities([agent])
    return agent
