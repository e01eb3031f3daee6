"""What differs between the Home Assistant versions we support (hacs.json to newest)."""

from collections.abc import Callable
from typing import Any

from homeassistant.components import conversation
from homeassistant.helpers import llm
from homeassistant.util.json import JsonObjectType

try:  # HA 2026.9 and newer validate with probatio (and alias voluptuous to it)
    import probatio as vol
    from probatio import to_openapi as _to_openapi
except ImportError:  # older HA ships voluptuous and voluptuous-openapi
    import voluptuous as vol  # type: ignore[no-redef]
    from voluptuous_openapi import convert as _to_openapi  # type: ignore[no-redef]

__all__ = [
    "HAS_TOOL_RESULT_OBJECT",
    "schema_to_openapi",
    "tool_error_delta",
    "tool_result_data",
    "vol",
]

# HA 2026.9 and newer carry tool results as llm.ToolResult (data plus an error flag).
HAS_TOOL_RESULT_OBJECT = hasattr(llm, "ToolResult")


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
