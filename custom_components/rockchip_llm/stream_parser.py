"""Split streamed model output into spoken text, thinking and tool calls.

Pure Python, no Home Assistant imports. Understands Qwen-style ``<think>…</think>``
blocks and Hermes-style ``<tool_call>{json}</tool_call>`` blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, auto
import json
import re
from typing import Any

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"

_ARGUMENT_KEYS = ("arguments", "parameters", "args")
_CODE_FENCE = re.compile(r"```[\w-]*\s*(.*?)\s*(?:```)?", re.DOTALL)


@dataclass(frozen=True, slots=True)
class TextPiece:
    """Text meant to be spoken."""

    text: str


@dataclass(frozen=True, slots=True)
class ThinkingPiece:
    """Text from inside a think block."""

    text: str


@dataclass(frozen=True, slots=True)
class ParsedToolCall:
    """A well-formed tool call."""

    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ToolCallError:
    """A malformed tool call block and the reason, to be fed back to the model."""

    raw: str
    error: str


type Piece = TextPiece | ThinkingPiece | ParsedToolCall | ToolCallError


class _State(Enum):
    """Where the parser is in the output."""

    TEXT = auto()
    THINK = auto()
    TOOL_CALL = auto()


# The tags that end each state, and the state each one leads to. A tool call
# opening inside another one ends it: small models sometimes omit the closing tag.
_TRANSITIONS: dict[_State, dict[str, _State]] = {
    _State.TEXT: {THINK_OPEN: _State.THINK, TOOL_CALL_OPEN: _State.TOOL_CALL},
    _State.THINK: {THINK_CLOSE: _State.TEXT},
    _State.TOOL_CALL: {TOOL_CALL_CLOSE: _State.TEXT, TOOL_CALL_OPEN: _State.TOOL_CALL},
}


class StreamParser:
    """Incremental parser for streamed model output.

    Text is released as soon as it can no longer be the start of a tag; tool
    calls are released when their block closes.
    """

    def __init__(self, *, thinking_open: bool = False) -> None:
        """Initialize the parser; thinking_open means the output starts inside a think block."""
        self._state = _State.THINK if thinking_open else _State.TEXT
        self._buffer = ""
        self._strip_leading = False

    def feed(self, text: str) -> list[Piece]:
        """Consume a piece of output and return the pieces it completes."""
        self._buffer += text
        pieces: list[Piece] = []
        while (found := _find_first_tag(self._buffer, self._tags)) is not None:
            self._leave_block(pieces, *found)
        if self._state is not _State.TOOL_CALL:
            split = _holdback_start(self._buffer, self._tags)
            self._emit(pieces, self._buffer[:split])
            self._buffer = self._buffer[split:]
        return pieces

    def finish(self) -> list[Piece]:
        """Flush everything held back at the end of the stream."""
        pieces: list[Piece] = []
        if self._state is _State.TEXT:
            self._emit(pieces, self._buffer)
        else:
            # An unclosed block ends here, minus any half-written closing tag.
            end = _holdback_start(self._buffer, self._tags)
            self._end_block(pieces, self._buffer[:end])
        self._buffer = ""
        return pieces

    @property
    def _tags(self) -> dict[str, _State]:
        """Return the tags that end the current state."""
        return _TRANSITIONS[self._state]

    def _leave_block(self, pieces: list[Piece], index: int, tag: str) -> None:
        """Emit the buffer up to the tag at index, then switch state."""
        content = self._buffer[:index]
        self._buffer = self._buffer[index + len(tag) :]
        self._end_block(pieces, content)
        self._state = self._tags[tag]
        self._strip_leading = tag == THINK_CLOSE

    def _end_block(self, pieces: list[Piece], content: str) -> None:
        """Emit the content of the block that ends, as a tool call or as text."""
        if self._state is _State.TOOL_CALL:
            pieces.append(parse_tool_call(content))
        else:
            self._emit(pieces, content)

    def _emit(self, pieces: list[Piece], text: str) -> None:
        """Append text as a piece of the current kind, unless it is empty."""
        if self._strip_leading:
            text = text.lstrip()
            self._strip_leading = not text
        if text:
            kind = ThinkingPiece if self._state is _State.THINK else TextPiece
            pieces.append(kind(text))


def _find_first_tag(buffer: str, tags: dict[str, _State]) -> tuple[int, str] | None:
    """Return the position and text of the earliest complete tag in buffer."""
    found = [(index, tag) for tag in tags if (index := buffer.find(tag)) >= 0]
    return min(found) if found else None


def _holdback_start(buffer: str, tags: dict[str, _State]) -> int:
    """Return where the suffix that could still become a tag begins."""
    index = buffer.rfind("<")
    if index >= 0 and any(tag.startswith(buffer[index:]) for tag in tags):
        return index
    return len(buffer)


def parse_tool_call(raw: str) -> ParsedToolCall | ToolCallError:
    """Parse the JSON inside one ``<tool_call>`` block."""
    body = _strip_code_fence(raw.strip())
    if not body:
        return ToolCallError(raw, "empty tool call")
    try:
        call = json.loads(body)
    except json.JSONDecodeError as err:
        return ToolCallError(raw, f"invalid JSON: {err}")
    if not isinstance(call, dict):
        return ToolCallError(raw, "tool call must be a JSON object")
    if "name" not in call and isinstance(call.get("function"), dict):
        call = call["function"]
    name = call.get("name")
    if not isinstance(name, str) or not name.strip():
        return ToolCallError(raw, "missing tool name")
    arguments = _decode_arguments(call)
    if arguments is None:
        return ToolCallError(raw, "arguments must be a JSON object")
    return ParsedToolCall(name.strip(), _drop_empty(arguments))


def _strip_code_fence(body: str) -> str:
    """Remove a markdown code fence (with optional language tag) around body."""
    if match := _CODE_FENCE.fullmatch(body):
        return match.group(1)
    return body


def _decode_arguments(call: dict[str, Any]) -> dict[str, Any] | None:
    """Return the call's arguments as a dict, or None when they are not an object."""
    arguments = next((call[key] for key in _ARGUMENT_KEYS if key in call), None)
    if arguments is None:
        return {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    return arguments if isinstance(arguments, dict) else None


def _drop_empty(arguments: dict[str, Any]) -> dict[str, Any]:
    """Drop arguments whose value is empty; small models fill in every optional one."""
    return {key: value for key, value in arguments.items() if not _is_empty(value)}


def _is_empty(value: Any) -> bool:
    """Return whether value is null or an empty string, list or object."""
    return value is None or (isinstance(value, str | list | dict) and not value)
