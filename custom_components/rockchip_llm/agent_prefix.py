"""Render the exact system prefix an Assist request carries, through HA's chat log."""

from collections.abc import Mapping
import json
from typing import Any

from homeassistant.components import conversation
from homeassistant.const import CONF_LLM_HASS_API
from homeassistant.core import Context, HomeAssistant
from homeassistant.helpers import chat_session, llm

from .chat import SystemPrefix
from .const import CONF_PROMPT, DOMAIN
from .ha_compat import schema_to_openapi

_TOOLS_JSON: dict[tuple[tuple[str, str | None, str], ...], str] = {}
_TOOLS_JSON_SIZE = 8


def tools_json(llm_api: llm.APIInstance | None) -> str:
    """Serialise the LLM API's tools as the runtime's JSON array.

    Requests carry new tool objects each time, usually with the same content:
    the serialisation is kept per content so a request does not redo it.
    """
    if llm_api is None:
        return "[]"
    key = tuple(
        (tool.name, tool.description, repr(tool.parameters.schema))
        for tool in llm_api.tools
    )
    if (cached := _TOOLS_JSON.get(key)) is not None:
        return cached
    tools: list[dict[str, Any]] = []
    for tool in llm_api.tools:
        spec: dict[str, Any] = {
            "name": tool.name,
            "parameters": schema_to_openapi(
                tool.parameters, custom_serializer=llm_api.custom_serializer
            ),
        }
        if tool.description:
            spec["description"] = tool.description
        tools.append({"type": "function", "function": spec})
    if len(_TOOLS_JSON) >= _TOOLS_JSON_SIZE:
        _TOOLS_JSON.pop(next(iter(_TOOLS_JSON)))
    _TOOLS_JSON[key] = json.dumps(tools, ensure_ascii=False, sort_keys=True)
    return _TOOLS_JSON[key]


def prefix_from_chat_log(chat_log: conversation.ChatLog) -> SystemPrefix:
    """Return the system prompt and tools a chat log carries now."""
    system = chat_log.content[0]
    assert isinstance(system, conversation.SystemContent)
    return SystemPrefix(prompt=system.content, tools_json=tools_json(chat_log.llm_api))


async def async_render_prefix(
    hass: HomeAssistant, options: Mapping[str, Any]
) -> SystemPrefix:
    """Render the prefix a request from a device without an area would carry."""
    llm_context = llm.LLMContext(
        platform=DOMAIN,
        context=Context(),
        language=hass.config.language,
        assistant=conversation.DOMAIN,
        device_id=None,
    )
    with (
        chat_session.async_get_chat_session(hass) as session,
        conversation.async_get_chat_log(hass, session) as chat_log,
    ):
        await chat_log.async_provide_llm_data(
            llm_context, options.get(CONF_LLM_HASS_API), options.get(CONF_PROMPT), None
        )
        return prefix_from_chat_log(chat_log)
