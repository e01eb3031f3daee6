"""Render the exact system prefix an Assist request carries, through HA's chat log.

The cache is built from what async_render_prefix returns and requests carry what
prefix_from_chat_log returns: both are the compact form (compact_prefix.py) of the
chat log's prompt and the tools the agent offers (offer_tools).
"""

from collections.abc import Callable, Iterable, Iterator, Mapping
import contextlib
import dataclasses
from datetime import datetime
import re
from typing import Any

from homeassistant.components import conversation
from homeassistant.const import CONF_LLM_HASS_API
from homeassistant.core import Context, HomeAssistant
from homeassistant.helpers import llm

from .compact_prefix import CompactPrefix, PrefixLayout, compact_prefix
from .const import CONF_PROMPT, CONF_TOOL_GROUPS, DOMAIN
from .ha_compat import async_get_chat_session, schema_to_openapi
from .run_planner import SystemPrefix
from .tool_groups import ToolGroup, offered, trim_device_list, trimmed_groups

_COMPACT: dict[tuple[object, ...], tuple[CompactPrefix, SystemPrefix]] = {}
"""Compact prefixes by the text of the prompt and the tools."""
_BY_IDENTITY: dict[tuple[object, ...], tuple[CompactPrefix, SystemPrefix]] = {}
"""The same, by the prompt and the objects the tools' schemas are made of."""
_COMPACT_SIZE = 8

# HA appends its date-time line (llm.DATE_TIME_PROMPT) to the system prompt when no
# GetDateTime tool is offered. It changes every second, so it is sent with the turn.
_DATE_TIME_LINE = re.compile(
    r"^Current time is \d{1,2}:\d{2}:\d{2}\. Today's date is \d{4}-\d{2}-\d{2}\.\n?",
    re.MULTILINE,
)
_DATE_TIME_START = "Current time is "


def date_time_line(now: datetime) -> str:
    """Return the date-time line HA renders at now, as split_volatile returns it."""
    return f"Current time is {now:%H:%M:%S}. Today's date is {now:%Y-%m-%d}."


def tool_specs(
    tools: Iterable[llm.Tool], custom_serializer: Callable[[Any], Any] | None
) -> list[tuple[str, dict[str, Any]]]:
    """Return each tool's canonical spec (the same in every process), by name."""
    specs: list[tuple[str, dict[str, Any]]] = []
    for tool in tools:
        spec: dict[str, Any] = {
            "name": tool.name,
            "parameters": canonical_schema(
                schema_to_openapi(tool.parameters, custom_serializer=custom_serializer)
            ),
        }
        if tool.description:
            spec["description"] = tool.description
        specs.append((tool.name, {"type": "function", "function": spec}))
    return specs


class _Same:
    """A key part equal only to the very same object (kept alive by the key)."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def __hash__(self) -> int:
        return id(self.value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Same) and other.value is self.value


def _identity_key(
    prompt: str, device_list: bool, tools: Iterable[llm.Tool]
) -> tuple[object, ...]:
    """Key the tools by the objects their schemas are made of, not their text.

    HA builds new tool objects for every request, but the validators in their
    schemas are usually the intent handlers' own: comparing those is cheaper
    than the repr of every schema.
    """
    parts: list[object] = [prompt, device_list]
    for tool in tools:
        schema = tool.parameters.schema
        parts += (tool.name, tool.description)
        if isinstance(schema, dict):
            parts.append(tuple((_Same(k), _Same(v)) for k, v in schema.items()))
        else:
            parts.append(_Same(schema))
    return tuple(parts)


def remember[K, V](cache: dict[K, V], key: K, value: V, size: int = _COMPACT_SIZE) -> V:
    """Store value under key, forgetting the oldest entry of a full cache."""
    cache.pop(key, None)
    if len(cache) >= size:
        cache.pop(next(iter(cache)))
    cache[key] = value
    return value


def compact(
    prompt: str, llm_api: llm.APIInstance | None, *, device_list: bool = True
) -> tuple[CompactPrefix, SystemPrefix]:
    """Return the compact prefix of a prompt and the API's tools, and its SystemPrefix.

    Requests carry new tool objects each time, usually with the same content:
    the result is kept per content so a request does not redo it (nor hash it),
    and per schema objects, so a request made of the same validators does not
    even render the schemas' text to find it.
    """
    tools = llm_api.tools if llm_api is not None else []
    identity = _identity_key(prompt, device_list, tools)
    if (cached := _BY_IDENTITY.get(identity)) is not None:
        return cached
    key = (
        prompt,
        device_list,
        *(
            (tool.name, tool.description, repr(tool.parameters.schema))
            for tool in tools
        ),
    )
    if (cached := _COMPACT.get(key)) is None:
        specs = (
            tool_specs(tools, llm_api.custom_serializer) if llm_api is not None else []
        )
        result = compact_prefix(prompt, specs, device_list=device_list)
        cached = remember(
            _COMPACT,
            key,
            (result, SystemPrefix(prompt=result.prompt, tools_json=result.tools_json)),
        )
    return remember(_BY_IDENTITY, identity, cached)


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
    if _DATE_TIME_START not in prompt:  # the usual case, found faster than the line
        return prompt, ""
    match = _DATE_TIME_LINE.search(prompt)
    if match is None:
        return prompt, ""
    stable = prompt[: match.start()] + prompt[match.end() :]
    return stable, match.group().strip()


def prefix_from_chat_log(
    chat_log: conversation.ChatLog, trim: int = 0
) -> tuple[SystemPrefix, str, PrefixLayout]:
    """Return the cacheable system prefix a chat log carries, its volatile part, layout.

    The prefix is the compact form of the chat log's prompt and tools, trimmed
    trim steps (tool_groups.py); the volatile part (the current time) goes with the
    user's turn instead.
    """
    system = chat_log.content[0]
    assert isinstance(system, conversation.SystemContent)
    prompt, volatile = split_volatile(system.content)
    result, prefix = compact(
        prompt, chat_log.llm_api, device_list=trim_device_list(trim)
    )
    return prefix, volatile, result.layout


def offer_tools(
    chat_log: conversation.ChatLog, options: Mapping[str, Any], trim: int = 0
) -> None:
    """Keep only the tools of the agent's groups, less those trim leaves out.

    A tool left out cannot be called either: HA looks calls up in the same list.
    """
    api = chat_log.llm_api
    if api is None:
        return
    groups = options.get(CONF_TOOL_GROUPS)
    chosen = (
        {ToolGroup(group) for group in groups} if groups is not None else set(ToolGroup)
    )
    chosen -= set(trimmed_groups(trim))
    kept = set(offered((tool.name for tool in api.tools), chosen))
    if len(kept) < len(api.tools):
        chat_log.llm_api = dataclasses.replace(
            api, tools=[tool for tool in api.tools if tool.name in kept]
        )


async def async_provide_llm_data(
    chat_log: conversation.ChatLog,
    llm_context: llm.LLMContext,
    options: Mapping[str, Any],
    extra_system_prompt: str | None = None,
    trim: int = 0,
) -> None:
    """Give the chat log the agent's prompt and the tools it offers."""
    await chat_log.async_provide_llm_data(
        llm_context,
        options.get(CONF_LLM_HASS_API),
        options.get(CONF_PROMPT),
        extra_system_prompt,
    )
    offer_tools(chat_log, options, trim)


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
    hass: HomeAssistant, options: Mapping[str, Any], trim: int = 0
) -> tuple[SystemPrefix, PrefixLayout]:
    """Render the prefix a request from a device without an area would carry."""
    with request_chat_log(hass) as (llm_context, chat_log):
        await async_provide_llm_data(chat_log, llm_context, options, trim=trim)
        prefix, _volatile, layout = prefix_from_chat_log(chat_log, trim)
        return prefix, layout
