"""The Assist conversation agent."""

from typing import Literal

from homeassistant.components import conversation
from homeassistant.config_entries import ConfigSubentry
from homeassistant.const import CONF_LLM_HASS_API, MATCH_ALL
from homeassistant.core import HomeAssistant
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers import intent
from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback

from . import RockchipConfigEntry
from .agent_prefix import async_provide_llm_data
from .const import DOMAIN, SUBENTRY_CONVERSATION
from .entity import RockchipLLMBaseEntity, agent_subentries, only_invalid_tool_calls
from .errors import refuse_nul
from .ha_compat import ConversationBusyError

# Requests are queued per model by the engine, not by entity updates.
PARALLEL_UPDATES = 0


async def async_setup_entry(
    hass: HomeAssistant,
    entry: RockchipConfigEntry,
    async_add_entities: AddConfigEntryEntitiesCallback,
) -> None:
    """Add one conversation entity per agent (one that failed answers why)."""
    for subentry in agent_subentries(entry, SUBENTRY_CONVERSATION):
        async_add_entities(
            [RockchipConversationEntity(entry, subentry)],
            config_subentry_id=subentry.subentry_id,
        )


class RockchipConversationEntity(
    conversation.ConversationEntity,
    RockchipLLMBaseEntity,
):
    """An Assist agent answered by a model on the NPU."""

    _attr_supports_streaming = True

    def __init__(self, entry: RockchipConfigEntry, subentry: ConfigSubentry) -> None:
        """Set up the agent."""
        super().__init__(entry, subentry)
        if subentry.data.get(CONF_LLM_HASS_API):
            self._attr_supported_features = (
                conversation.ConversationEntityFeature.CONTROL
            )

    @property
    def supported_languages(self) -> list[str] | Literal["*"]:
        """Every language the model speaks."""
        return MATCH_ALL

    async def async_prepare(self, language: str | None = None) -> None:
        """Warm up when a pipeline starts: make sure the system cache is current."""
        agent = self.set_up_agent
        if agent is not None and agent.system_cache is not None:
            await agent.system_cache.async_refresh_now()

    async def async_process(
        self, user_input: conversation.ConversationInput
    ) -> conversation.ConversationResult:
        """Answer a message; a conversation still busy with a turn says so.

        Home Assistant 2026.11 refuses a message on a conversation whose turn
        still runs before it reaches the model, which stays with that turn.
        """
        try:
            return await super().async_process(user_input)
        except ConversationBusyError as err:
            raise HomeAssistantError(
                translation_domain=DOMAIN, translation_key="conversation_busy"
            ) from err

    async def _async_handle_message(
        self,
        user_input: conversation.ConversationInput,
        chat_log: conversation.ChatLog,
    ) -> conversation.ConversationResult:
        """Answer one user message (an agent that cannot answer says why)."""
        refuse_nul(user_input.text, "message")
        self.check_can_answer()
        agent = self.agent
        system_cache = agent.system_cache
        # The model starts on the message while Home Assistant renders the prompt.
        early = agent.start_turn_early(
            user_input.device_id, self.chat_messages(chat_log)
        )
        try:
            try:
                await async_provide_llm_data(
                    chat_log,
                    user_input.as_llm_context(DOMAIN),
                    self.subentry.data,
                    user_input.extra_system_prompt,
                    system_cache.trim if system_cache else 0,
                )
            except conversation.ConverseError as err:
                return err.as_conversation_result()
            await self._async_handle_chat_log(
                chat_log, device_id=user_input.device_id, early=early
            )
        finally:
            if early is not None:
                # Ends a run the turn did not take over (nothing once it did).
                await early.async_end()
        result = conversation.async_get_result_from_chat_log(user_input, chat_log)
        if only_invalid_tool_calls(chat_log):
            # No action was taken: the answer must not claim one (action_done).
            speech = result.response.speech.get("plain", {}).get("speech", "")
            result.response.async_set_error(
                intent.IntentResponseErrorCode.FAILED_TO_HANDLE, speech
            )
        return result
