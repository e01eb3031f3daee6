"""AI Task agents: generate data, optionally as JSON matching a structure."""

import json
from typing import Any

from homeassistant.components import ai_task, conversation
from homeassistant.core import HomeAssistant
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers import llm
from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback

from . import RockchipConfigEntry
from .const import DOMAIN, SUBENTRY_AI_TASK
from .entity import RockchipLLMBaseEntity, agent_subentries
from .errors import refuse_nul
from .ha_compat import schema_to_openapi, vol

STRUCTURE_ATTEMPTS = 2


# Requests are queued per model by the engine, not by entity updates.
PARALLEL_UPDATES = 0


async def async_setup_entry(
    hass: HomeAssistant,
    entry: RockchipConfigEntry,
    async_add_entities: AddConfigEntryEntitiesCallback,
) -> None:
    """Add one AI Task entity per AI Task agent (one that failed says why)."""
    for subentry in agent_subentries(entry, SUBENTRY_AI_TASK):
        async_add_entities(
            [RockchipAITaskEntity(entry, subentry)],
            config_subentry_id=subentry.subentry_id,
        )


def _json_instructions(structure: vol.Schema) -> str:
    """Tell the model to answer with JSON of the structure."""
    schema = schema_to_openapi(structure, custom_serializer=llm.selector_serializer)
    return (
        "Reply with only one JSON object, no other text, matching this JSON schema: "
        + json.dumps(schema, ensure_ascii=False)
    )


def _parse_structured(text: str, structure: vol.Schema) -> Any:
    """Parse text as JSON and validate it; raise ValueError with the reason."""
    body = text.strip()
    if body.startswith("```"):
        body = body.strip("`").removeprefix("json").strip()
    try:
        return structure(json.loads(body))
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON ({err.msg})") from err
    except vol.Invalid as err:
        raise ValueError(f"JSON does not match the structure ({err})") from err


class RockchipAITaskEntity(ai_task.AITaskEntity, RockchipLLMBaseEntity):
    """Generates data with a model on the NPU."""

    _attr_supported_features = ai_task.AITaskEntityFeature.GENERATE_DATA

    async def _async_generate_data(
        self, task: ai_task.GenDataTask, chat_log: conversation.ChatLog
    ) -> ai_task.GenDataTaskResult:
        """Run the task; structured output gets one retry with the parse error."""
        refuse_nul(task.instructions, "instructions")
        self.check_can_answer()
        instructions = _json_instructions(task.structure) if task.structure else None
        for attempt in range(STRUCTURE_ATTEMPTS):
            await self._async_handle_chat_log(chat_log, instructions)
            last = chat_log.content[-1]
            text = (
                last.content or ""
                if isinstance(last, conversation.AssistantContent)
                else ""
            )
            if task.structure is None:
                return ai_task.GenDataTaskResult(
                    conversation_id=chat_log.conversation_id, data=text
                )
            try:
                data = _parse_structured(text, task.structure)
            except ValueError as err:
                reason = str(err)
                if attempt + 1 < STRUCTURE_ATTEMPTS:
                    chat_log.async_add_user_content(
                        conversation.UserContent(
                            content=f"Your reply was {reason}. Reply again with only the JSON object."
                        )
                    )
                continue
            return ai_task.GenDataTaskResult(
                conversation_id=chat_log.conversation_id, data=data
            )
        raise HomeAssistantError(
            translation_domain=DOMAIN,
            translation_key="structured_output_invalid",
            translation_placeholders={"error": reason},
        )
