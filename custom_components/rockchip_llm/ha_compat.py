"""What differs between the Home Assistant versions we support (hacs.json to newest)."""

from collections.abc import Callable
from contextlib import AbstractContextManager
import inspect
from typing import Any, cast

from homeassistant.components import conversation
from homeassistant.core import Context, HomeAssistant
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers import chat_session, device_registry as dr, llm
from homeassistant.util.json import JsonObjectType

try:  # HA 2026.9 and newer validate with probatio (and alias voluptuous to it)
    import probatio as vol
    from probatio import to_openapi as _to_openapi
except ImportError:  # older HA ships voluptuous and voluptuous-openapi
    import voluptuous as vol  # type: ignore[no-redef]
    from voluptuous_openapi import convert as _to_openapi  # type: ignore[no-redef]

__all__ = [
    "HAS_TOOL_RESULT_OBJECT",
    "ConversationBusyError",
    "async_get_chat_session",
    "schema_to_openapi",
    "tool_error_delta",
    "tool_result_data",
    "via_device",
    "vol",
]

# HA 2026.9 and newer carry tool results as llm.ToolResult (data plus an error flag).
HAS_TOOL_RESULT_OBJECT = hasattr(llm, "ToolResult")

# HA 2026.11 refuses a second turn on a conversation whose turn still runs; the
# class never matches an exception on older versions.
ConversationBusyError: type[HomeAssistantError] = getattr(
    conversation,
    "ConversationBusyError",
    type("NoConversationBusyError", (HomeAssistantError,), {}),
)

# HA 2026.11 gives a chat session the context of its caller (the session's owner)
# and reports a call without one; older versions take no context.
_SESSION_TAKES_CONTEXT = (
    "context" in inspect.signature(chat_session.async_get_chat_session).parameters
)


def async_get_chat_session(
    hass: HomeAssistant, context: Context | None
) -> AbstractContextManager[chat_session.ChatSession]:
    """Open a new chat session for the caller of context (None: no user)."""
    if _SESSION_TAKES_CONTEXT:
        return chat_session.async_get_chat_session(hass, context=context)  # type: ignore[call-arg,unused-ignore]
    return chat_session.async_get_chat_session(hass)


def schema_to_openapi(
    schema: Any, custom_serializer: Callable[[Any], Any] | None
) -> dict[str, Any]:
    """Convert a tool or structure schema to an OpenAPI 3.0 schema object."""
    result: dict[str, Any] = _to_openapi(schema, custom_serializer=custom_serializer)
    return result


def tool_result_data(content: conversation.ToolResultContent) -> JsonObjectType:
    """Return the data of a tool result in the chat log."""
    if HAS_TOOL_RESULT_OBJECT:
        return content.result.data
    data: JsonObjectType = getattr(content, "tool_result")  # noqa: B009
    return data


def tool_error_delta(
    tool_call_id: str, tool_name: str, error: str
) -> conversation.ToolResultContentDeltaDict:
    """Build a tool result delta that reports an error back to the model."""
    data: JsonObjectType = {"error": error}
    if HAS_TOOL_RESULT_OBJECT:
        return {
            "role": "tool_result",
            "tool_call_id": tool_call_id,
            "tool_name": tool_name,
            "result": llm.ToolResult(data=data, error=True),
        }
    return {
        "role": "tool_result",
        "tool_call_id": tool_call_id,
        "tool_name": tool_name,
        "tool_result": data,
    }


# HA 2026.8 links a device to the one it runs through by that device's id and reports
# the older link by an identifier (via_device) as deprecated; older versions know
# only the identifier.
_VIA_DEVICE_ID = "via_device_id" in dr.DeviceInfo.__optional_keys__


def via_device(device: dr.DeviceEntry) -> dr.DeviceInfo:
    """Return the DeviceInfo key of a device that runs through device."""
    if _VIA_DEVICE_ID:
        return dr.DeviceInfo(via_device_id=device.id)
    return cast("dr.DeviceInfo", {"via_device": next(iter(device.identifiers))})
