"""Render the exact system prefix an Assist request carries, through HA's chat log."""

from collections.abc import Callable, Iterable, Iterator, Mapping
import contextlib
import json
import re
from typing import Any

from homeassistant.components import conversation
from homeassistant.const import CONF_LLM_HASS_API
from homeassistant.core import Context, HomeAssistant
from homeassistant.helpers import llm

from .const import CONF_PROMPT, DOMAIN
from .ha_compat import async_get_chat_session, schema_to_openapi
from .run_planner import NO_TOOLS, SystemPrefix

_TOOLS_JSON: dict[tuple[tuple[str, str | None, str], ...], str] = {}
_TOOLS_JSON_SIZE = 8

# HA appends its date-time line (llm.DATE_TIME_PROMPT) to the system prompt when no
# GetDateTime tool is offered. It changes every second, so it is sent with the turn.
_DATE_TIME_LINE = re.compile(
    r"^Current time is \d{1,2}:\d{2}:\d{2}\. Today's date is \d{4}-\d{2}-\d{2}\.\n?",
    re.MULTILINE,
)


def tools_json(llm_api: llm.APIInstance | None) -> str:
    """Serialise the LLM API's tools as the runtime's JSON array.

    Requests carry new tool objects each time, usually with the same content:
    the serialisation is kept per content so a request does not redo it.
    """
    if llm_api is None:
        return NO_TOOLS
    key = tuple(
        (tool.name, tool.description, repr(tool.parameters.schema))
        for tool in llm_api.tools
    )
    if (cached := _TOOLS_JSON.get(key)) is not None:
        return cached
    if len(_TOOLS_JSON) >= _TOOLS_JSON_SIZE:
        _TOOLS_JSON.pop(next(iter(_TOOLS_JSON)))
    _TOOLS_JSON[key] = serialise_tools(llm_api.tools, llm_api.custom_serializer)
    return _TOOLS_JSON[key]


def serialise_tools(
    tools: Iterable[llm.Tool], custom_serializer: Callable[[Any], Any] | None
) -> str:
    """Return the canonical JSON array of tools: the same text in every process."""
    specs: list[dict[str, Any]] = []
    for tool in tools:
        spec: dict[str, Any] = {
            "name": tool.name,
            "parameters": canonical_schema(
                schema_to_openapi(tool.parameters, custom_serializer=custom_serializer)
            ),
        }
        if tool.description:
            spec["description"] = tool.description
        specs.append({"type": "function", "function": spec})
    return json.dumps(specs, ensure_ascii=False, sort_keys=True)


def canonical_schema(value: Any) -> Any:
    """Sort the unordered lists of a JSON schema (enum values, required keys).

    HA builds some of them from sets, whose order follows the per-process hash
    seed; unsorted, one configuration would give a new prefix at every start.
    """
    if isinstance(value, list):
        return [canonical_schema(item) for item in value]
    if not isinstance(value, dict):
        return value
    result = {key: canonical_schema(item) for key, item in value.items()}
    for key in ("enum", "required"):
        if isinstance(items := result.get(key), list):
            result[key] = sorted(
                items, key=lambda item: (type(item).__name__, str(item))
            )
    return result


def split_volatile(prompt: str) -> tuple[str, str]:
    """Split the date-time line HA puts in a system prompt from the rest."""
    match = _DATE_TIME_LINE.search(prompt)
    if match is None:
        return prompt, ""
    stable = prompt[: match.start()] + prompt[match.end() :]
    return stable, match.group().strip()


def prefix_from_chat_log(chat_log: conversation.ChatLog) -> tuple[SystemPrefix, str]:
    """Return the cacheable system prefix a chat log carries, and its volatile part.

    The volatile part (the current time) goes with the user's turn instead.
    """
    system = chat_log.content[0]
    assert isinstance(system, conversation.SystemContent)
    prompt, volatile = split_volatile(system.content)
    return SystemPrefix(
        prompt=prompt, tools_json=tools_json(chat_log.llm_api)
    ), volatile


@contextlib.contextmanager
def request_chat_log(
    hass: HomeAssistant,
) -> Iterator[tuple[llm.LLMContext, conversation.ChatLog]]:
    """Open a fresh chat log with the LLM context of a request without an area."""
    llm_context = llm.LLMContext(
        platform=DOMAIN,
        context=Context(),
        language=hass.config.language,
        assistant=conversation.DOMAIN,
        device_id=None,
    )
    with (
        async_get_chat_session(hass, None) as session,
        conversation.async_get_chat_log(hass, session) as chat_log,
    ):
        yield llm_context, chat_log


async def async_render_prefix(
    hass: HomeAssistant, options: Mapping[str, Any]
) -> SystemPrefix:
    """Render the prefix a request from a device without an area would carry."""
    with request_chat_log(hass) as (llm_context, chat_log):
        await chat_log.async_provide_llm_data(
            llm_context, options.get(CONF_LLM_HASS_API), options.get(CONF_PROMPT), None
        )
        return prefix_from_chat_log(chat_log)[0]
