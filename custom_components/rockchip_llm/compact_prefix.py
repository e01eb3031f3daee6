"""The compact system prefix: the same tools and values in fewer tokens.

What HA hands a model is written for large cloud models: JSON-schema noise,
enum lists repeated in many tools, a device list in two-line YAML. A model
with a context of a few thousand tokens cannot hold that for a real home. Here:

- a tool schema loses ``additionalProperties`` (one line in the prompt says that
  tools take only the parameters they list), ``type`` next to an ``enum`` of
  strings, and the array around a list of strings (HA's slots take one value as
  well as a list);
- an enum list that several tools carry is written once, in the prompt, as a
  JSON-schema ``$defs`` entry the tools refer to with ``$ref``;
- the static device list becomes one line per device, "- Kitchen Lights (light,
  Kitchen)", or, when the prefix must shrink, a line saying GetLiveContext finds
  the devices.

Only HA's YAML parser is used here: agent_prefix.py feeds HA's prompt and tools in.
"""

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
import json
import re
from typing import Any

from homeassistant.exceptions import HomeAssistantError
from homeassistant.util.yaml import parse_yaml

ONLY_LISTED_PARAMETERS = "Tools take only the parameters they list."
SHARED_VALUES_INTRO = "Values that several tools refer to ($ref): "
DEVICE_LIST_HEADER = re.compile(
    r"^(?:Static Context: )?An overview of the areas and the devices in this smart"
    r" home:\n",
    re.MULTILINE,
)
_YAML_LINES = re.compile(r"(?:(?:- |  ).*(?:\n|$))+")
DEVICE_LIST_LEFT_OUT = (
    "The device list is left out to fit the model's context: "
    "use the GetLiveContext tool to find devices and their state.\n"
)


@dataclass(frozen=True, slots=True)
class PrefixLayout:
    """What a compact prefix is made of, in characters, to split its token count."""

    instructions_chars: int
    device_list_chars: int
    tools_chars: tuple[tuple[str, int], ...]
    """Each tool's JSON, by tool name (shared values count as the tools')."""
    shared_chars: int
    """The shared values line in the prompt, which the tools refer to."""

    @property
    def total_chars(self) -> int:
        """Characters of the whole prefix."""
        return (
            self.instructions_chars
            + self.device_list_chars
            + self.shared_chars
            + sum(chars for _name, chars in self.tools_chars)
        )


@dataclass(frozen=True, slots=True)
class CompactPrefix:
    """The prompt and tools JSON the runtime receives, and their layout."""

    prompt: str
    tools_json: str
    layout: PrefixLayout


def compact_prefix(
    prompt: str,
    tools: Sequence[tuple[str, Mapping[str, Any]]],
    *,
    device_list: bool = True,
) -> CompactPrefix:
    """Compact HA's prompt and tools (name and OpenAPI spec each).

    device_list False: the static device list is replaced by a line saying how
    the model finds devices.
    """
    prompt, device_chars = compact_device_list(prompt, keep=device_list)
    schemas = [(name, compact_schema(spec)) for name, spec in tools]
    shared = shared_enums(spec for _name, spec in schemas)
    specs = [(name, refer_to_shared(spec, shared)) for name, spec in schemas]
    shared_line = ""
    if specs:
        shared_line = f"\n{ONLY_LISTED_PARAMETERS}"
        if shared:
            definitions = {
                name: {"enum": list(values)} for values, name in shared.items()
            }
            shared_line += f"\n{SHARED_VALUES_INTRO}" + json.dumps(
                {"$defs": definitions}, ensure_ascii=False
            )
        prompt = prompt.rstrip() + shared_line
    tool_texts = [
        (name, json.dumps(spec, ensure_ascii=False, sort_keys=True))
        for name, spec in specs
    ]
    return CompactPrefix(
        prompt=prompt,
        tools_json="[" + ", ".join(text for _name, text in tool_texts) + "]",
        layout=PrefixLayout(
            instructions_chars=len(prompt) - device_chars - len(shared_line),
            device_list_chars=device_chars,
            tools_chars=tuple((name, len(text)) for name, text in tool_texts),
            shared_chars=len(shared_line),
        ),
    )


def compact_device_list(prompt: str, *, keep: bool = True) -> tuple[str, int]:
    """Rewrite HA's YAML device list as one line per device (or leave it out).

    Return the prompt and the characters of the device list in it.
    """
    header = DEVICE_LIST_HEADER.search(prompt)
    if header is None:
        return prompt, 0
    block = _YAML_LINES.match(prompt, header.end())
    if block is None:
        return prompt, 0
    try:
        devices = parse_yaml(block.group())
    except HomeAssistantError:
        return prompt, 0
    if not isinstance(devices, list):
        return prompt, 0
    text = (
        prompt[header.start() : header.end()]
        + "".join(device_line(device) for device in devices)
        if keep
        else DEVICE_LIST_LEFT_OUT
    )
    return prompt[: header.start()] + text + prompt[block.end() :], len(text)


def device_line(device: Any) -> str:
    """Write one device of HA's list as "- names (domain, areas, key: value)"."""
    if not isinstance(device, dict):
        return f"- {device}\n"
    details = dict(device)
    names = details.pop("names", "")
    parts = [str(details.pop(key)) for key in ("domain", "areas") if key in details]
    parts += [
        f"{key}: {value if isinstance(value, str) else json.dumps(value)}"
        for key, value in details.items()
    ]
    return f"- {names} ({', '.join(parts)})\n" if parts else f"- {names}\n"


def compact_schema(value: Any) -> Any:
    """Drop schema noise that does not change which calls are valid (see module doc)."""
    if isinstance(value, list):
        return [compact_schema(item) for item in value]
    if not isinstance(value, dict):
        return value
    result = {
        key: compact_schema(item)
        for key, item in value.items()
        if key != "additionalProperties"
    }
    enum = result.get("enum")
    if (
        result.get("type") == "string"
        and isinstance(enum, list)
        and all(isinstance(item, str) for item in enum)
    ):
        del result["type"]
    items = result.get("items")
    if (
        result.get("type") == "array"
        and set(result) == {"type", "items"}
        and isinstance(items, dict)
        and (items.get("type") == "string" or "enum" in items)
    ):
        # HA's slots (cv.ensure_list) take a single value as well as a list.
        return items
    return result


def _enum_lists(value: Any, key: str = "") -> Iterable[tuple[str, tuple[Any, ...]]]:
    """Yield each enum list of a schema with the name of its property."""
    if isinstance(value, list):
        for item in value:
            yield from _enum_lists(item, key)
    elif isinstance(value, dict):
        if isinstance(enum := value.get("enum"), list):
            yield key, tuple(enum)
        for child_key, child in value.items():
            yield from _enum_lists(
                child, key if child_key in ("items", "anyOf") else child_key
            )


def shared_enums(specs: Iterable[Any]) -> dict[tuple[Any, ...], str]:
    """Name the enum lists worth writing once: in several tools, longer than a $ref."""
    seen: dict[tuple[Any, ...], list[str]] = {}
    for spec in specs:
        for key, values in _enum_lists(spec):
            seen.setdefault(values, []).append(key or "values")
    shared: dict[tuple[Any, ...], str] = {}
    used: set[str] = set()
    for values, keys in sorted(
        seen.items(), key=lambda item: (-len(item[0]), str(item[0]))
    ):
        name, number = keys[0], 2
        while name in used:
            name, number = f"{keys[0]}_{number}", number + 1
        inline = len(json.dumps(list(values), ensure_ascii=False))
        ref = len(_ref(name)) + len('"$ref": ')
        # Written once in the prompt, referred to by every tool that carries it.
        if len(keys) < 2 or (len(keys) - 1) * inline <= len(keys) * ref:
            continue
        shared[values] = name
        used.add(name)
    return shared


def _ref(name: str) -> str:
    return f"#/$defs/{name}"


def refer_to_shared(value: Any, shared: Mapping[tuple[Any, ...], str]) -> Any:
    """Replace the shared enum lists of a schema with references to them."""
    if isinstance(value, list):
        return [refer_to_shared(item, shared) for item in value]
    if not isinstance(value, dict):
        return value
    enum = value.get("enum")
    if isinstance(enum, list) and (name := shared.get(tuple(enum))) is not None:
        rest = {key: item for key, item in value.items() if key != "enum"}
        return {**rest, "$ref": _ref(name)}
    return {key: refer_to_shared(item, shared) for key, item in value.items()}


def resolve_shared(spec: Any, prompt: str) -> Any:
    """Expand the $ref of a compact tool schema with the prompt's shared values.

    What the model reads as one: the test of the compact form uses it.
    """
    line = next(
        (
            line[len(SHARED_VALUES_INTRO) :]
            for line in prompt.splitlines()
            if line.startswith(SHARED_VALUES_INTRO)
        ),
        "{}",
    )
    definitions: dict[str, Any] = json.loads(line).get("$defs", {})

    def expand(value: Any) -> Any:
        if isinstance(value, list):
            return [expand(item) for item in value]
        if not isinstance(value, dict):
            return value
        if isinstance(ref := value.get("$ref"), str):
            rest = {key: item for key, item in value.items() if key != "$ref"}
            return {**rest, **definitions[ref.rsplit("/", 1)[-1]]}
        return {key: expand(item) for key, item in value.items()}

    return expand(spec)


def split_tokens(layout: PrefixLayout, tokens: int) -> dict[str, Any]:
    """Share a prefix's token count out by characters: instructions, devices, tools.

    The runtime counts only the whole prefix; the parts are estimated from their
    length (the chat template's own words about tools count as the tools').
    """
    total = max(layout.total_chars, 1)

    def share(chars: int) -> int:
        return round(tokens * chars / total)

    instructions = share(layout.instructions_chars)
    devices = share(layout.device_list_chars)
    tools = tokens - instructions - devices
    shared_each = share(layout.shared_chars) // max(len(layout.tools_chars), 1)
    return {
        "instructions_tokens": instructions,
        "device_list_tokens": devices,
        "tools_tokens": tools,
        "tool_tokens": {
            name: share(chars) + shared_each for name, chars in layout.tools_chars
        },
    }
