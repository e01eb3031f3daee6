"""Tests for the streaming output parser."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import pairwise
import json
import random
from typing import Any

import pytest

from custom_components.rockchip_llm.stream_parser import (
    ParsedToolCall,
    Piece,
    StreamParser,
    TextPiece,
    ThinkingPiece,
    ToolCallError,
    parse_tool_call,
)

RANDOM_SPLITS = 25

TURN_ON = ParsedToolCall("HassTurnOn", {"name": "kitchen light"})
TURN_ON_JSON = '{"name": "HassTurnOn", "arguments": {"name": "kitchen light"}}'
GET_STATE = ParsedToolCall("GetLiveContext", {})
GET_STATE_JSON = '{"name": "GetLiveContext", "arguments": {}}'


def _merge(pieces: list[Piece]) -> list[Piece]:
    """Merge adjacent text or thinking pieces, as a consumer would."""
    merged: list[Piece] = []
    for piece in pieces:
        last = merged[-1] if merged else None
        if isinstance(piece, TextPiece) and isinstance(last, TextPiece):
            merged[-1] = TextPiece(last.text + piece.text)
        elif isinstance(piece, ThinkingPiece) and isinstance(last, ThinkingPiece):
            merged[-1] = ThinkingPiece(last.text + piece.text)
        else:
            merged.append(piece)
    return merged


def _run(chunks: list[str], *, thinking_open: bool) -> list[Piece]:
    """Feed the chunks one by one, then finish."""
    parser = StreamParser(thinking_open=thinking_open)
    pieces: list[Piece] = []
    for chunk in chunks:
        pieces.extend(parser.feed(chunk))
    pieces.extend(parser.finish())
    assert all(
        piece.text for piece in pieces if isinstance(piece, TextPiece | ThinkingPiece)
    ), "empty text pieces are never emitted"
    return _merge(pieces)


def _splits(text: str) -> Iterator[list[str]]:
    """Yield text whole, as single characters and split at random points."""
    yield [text]
    yield list(text)
    rng = random.Random(text)
    for _ in range(RANDOM_SPLITS):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, len(text) - 1)))
        bounds = [0, *cuts, len(text)]
        yield [text[start:end] for start, end in pairwise(bounds)]


def parse(text: str, *, thinking_open: bool = False) -> list[Piece]:
    """Parse text fed in many different ways; all of them must agree."""
    whole, *others = (
        _run(chunks, thinking_open=thinking_open) for chunks in _splits(text)
    )
    for result in others:
        assert result == whole
    return whole


@pytest.mark.parametrize(
    "text",
    [
        "Hello world.",
        "3 < 5 and 7 > 2, so x<y",
        "Use <b>bold</b>, <br/>, <thinker>, <toolbox>, <tool_call_x> and </think>.",
        "Ends with a lone <",
        "Ends with <thi",
        "Ends with <tool_",
        "Grüße aus der Küche 🍳 — ça va? 👋",
        '{"name": "HassTurnOn", "arguments": {}} is just text outside tags',
    ],
)
def test_plain_text_passes_through(text: str) -> None:
    """Text without our tags comes out unchanged, held-back prefixes included."""
    assert parse(text) == [TextPiece(text)]


def test_think_then_text() -> None:
    """A think block is thinking; whitespace right after it is dropped."""
    assert parse("<think>\nThe user greets me.\n</think>\n\nHi there!\n") == [
        ThinkingPiece("\nThe user greets me.\n"),
        TextPiece("Hi there!\n"),
    ]


def test_whitespace_kept_later_in_text() -> None:
    """Only the whitespace directly after </think> is dropped."""
    assert parse("<think>ok</think> \n First.\n\n Second.") == [
        ThinkingPiece("ok"),
        TextPiece("First.\n\n Second."),
    ]


def test_thinking_open() -> None:
    """With thinking_open the output starts inside a think block."""
    assert parse("Let me check 3 < 4.</think>\n\nYes.", thinking_open=True) == [
        ThinkingPiece("Let me check 3 < 4."),
        TextPiece("Yes."),
    ]


def test_open_think_tag_needed_without_thinking_open() -> None:
    """Without thinking_open a stray closing tag is ordinary text."""
    assert parse("Let me check.</think>Yes.") == [
        TextPiece("Let me check.</think>Yes.")
    ]


def test_tool_call_inside_think_is_thinking() -> None:
    """Tags mentioned while thinking are not acted upon."""
    text = f"<think>I could use <tool_call>{TURN_ON_JSON}</tool_call>.</think>Ok."
    assert parse(text) == [
        ThinkingPiece(f"I could use <tool_call>{TURN_ON_JSON}</tool_call>."),
        TextPiece("Ok."),
    ]


def test_unclosed_think() -> None:
    """An unclosed think block ends as thinking, without a half-written closing tag."""
    assert parse("Hm <think>Still pondering ü</thin") == [
        TextPiece("Hm "),
        ThinkingPiece("Still pondering ü"),
    ]


def test_tool_call_with_surrounding_text() -> None:
    """Text around a tool call is spoken; the call is returned in order."""
    text = f"Sure.\n<tool_call>\n{TURN_ON_JSON}\n</tool_call>\nDone 👍"
    assert parse(text) == [TextPiece("Sure.\n"), TURN_ON, TextPiece("\nDone 👍")]


def test_two_tool_calls() -> None:
    """Consecutive tool call blocks give consecutive calls."""
    text = (
        f"<tool_call>\n{TURN_ON_JSON}\n</tool_call>"
        f"<tool_call>\n{GET_STATE_JSON}\n</tool_call>"
    )
    assert parse(text) == [TURN_ON, GET_STATE]


def test_tool_calls_after_thinking() -> None:
    """Thinking, text and two calls separated by a newline keep their order."""
    text = (
        "<think>Two calls.</think>\n"
        f"<tool_call>{TURN_ON_JSON}</tool_call>\n"
        f"<tool_call>{GET_STATE_JSON}</tool_call>"
    )
    assert parse(text) == [
        ThinkingPiece("Two calls."),
        TURN_ON,
        TextPiece("\n"),
        GET_STATE,
    ]


def test_tool_call_missing_closing_tag_before_next() -> None:
    """A new <tool_call> ends a block whose closing tag was forgotten."""
    text = f"<tool_call>{TURN_ON_JSON}\n<tool_call>{GET_STATE_JSON}</tool_call>"
    assert parse(text) == [TURN_ON, GET_STATE]


def test_malformed_tool_call_in_stream() -> None:
    """A malformed block gives an error with its raw text, and parsing goes on."""
    text = "A<tool_call>{'name': 'x'}</tool_call>B"
    pieces = parse(text)
    assert pieces[0] == TextPiece("A")
    assert isinstance(pieces[1], ToolCallError)
    assert pieces[1].raw == "{'name': 'x'}"
    assert pieces[1].error.startswith("invalid JSON: ")
    assert pieces[2:] == [TextPiece("B")]


@pytest.mark.parametrize("ending", ["", "\n", "\n</tool", "</tool_call"])
def test_unclosed_tool_call_valid(ending: str) -> None:
    """Models often stop before the closing tag: valid JSON is still a call."""
    assert parse(f"On it. <tool_call>\n{TURN_ON_JSON}{ending}") == [
        TextPiece("On it. "),
        TURN_ON,
    ]


def test_unclosed_tool_call_invalid() -> None:
    """An unclosed block with broken JSON is an error."""
    pieces = parse('<tool_call>\n{"name": "HassTurnOn", "argum')
    assert len(pieces) == 1
    assert isinstance(pieces[0], ToolCallError)
    assert pieces[0].raw == '\n{"name": "HassTurnOn", "argum'
    assert pieces[0].error.startswith("invalid JSON: ")


def test_unicode_in_tool_call() -> None:
    """Non-ASCII arguments survive character-wise streaming."""
    text = '<tool_call>{"name": "Say", "arguments": {"text": "Grüße 🎉"}}</tool_call>'
    assert parse(text) == [ParsedToolCall("Say", {"text": "Grüße 🎉"})]


def test_text_emitted_early() -> None:
    """Text without a possible tag start is released at once."""
    parser = StreamParser()
    assert parser.feed("Hello wor") == [TextPiece("Hello wor")]
    assert parser.feed("ld") == [TextPiece("ld")]
    assert parser.finish() == []


def test_possible_tag_held_back() -> None:
    """Only the possible tag start is held back, and released once it cannot be one."""
    parser = StreamParser()
    assert parser.feed("Hi <too") == [TextPiece("Hi ")]
    assert parser.feed("l") == []
    assert parser.feed("box") == [TextPiece("<toolbox")]
    assert parser.feed(" 3 <") == [TextPiece(" 3 ")]
    assert parser.feed(" 5") == [TextPiece("< 5")]
    assert parser.finish() == []


def test_tool_call_released_when_closed() -> None:
    """A tool call comes out as soon as its closing tag is complete."""
    parser = StreamParser()
    assert parser.feed("Hi <to") == [TextPiece("Hi ")]
    assert parser.feed(f"ol_call>{TURN_ON_JSON}</tool_cal") == []
    assert parser.feed("l>Done") == [TURN_ON, TextPiece("Done")]


def test_thinking_emitted_early() -> None:
    """Thinking streams too, holding back only a possible closing tag."""
    parser = StreamParser(thinking_open=True)
    assert parser.feed("abc </th") == [ThinkingPiece("abc ")]
    assert parser.feed("ink>\n") == []
    assert parser.feed("Answer") == [TextPiece("Answer")]


def test_empty_feed() -> None:
    """Feeding nothing yields nothing, also while whitespace is being dropped."""
    parser = StreamParser()
    assert parser.feed("") == []
    assert parser.feed("<think>x</think>") == [ThinkingPiece("x")]
    assert parser.feed("\n") == []
    assert parser.feed("") == []
    assert parser.feed(" Yes") == [TextPiece("Yes")]


@pytest.mark.parametrize(
    "raw",
    [
        TURN_ON_JSON,
        f"\n\n  {TURN_ON_JSON}  \n",
        f"```json\n{TURN_ON_JSON}\n```",
        f"\n```\n{TURN_ON_JSON}\n```\n",
        f"```JSON {TURN_ON_JSON}```",
        f"```json\n{TURN_ON_JSON}",
        '{"name": "HassTurnOn", "arguments": "{\\"name\\": \\"kitchen light\\"}"}',
        '{"name": "HassTurnOn", "parameters": {"name": "kitchen light"}}',
        '{"name": "HassTurnOn", "args": {"name": "kitchen light"}}',
        '{"function": {"name": "HassTurnOn", "arguments": {"name": "kitchen light"}}}',
        '{"type": "function", "function": {"name": "HassTurnOn", "arguments": "{\\"name\\": \\"kitchen light\\"}"}}',
        '{"name": " HassTurnOn ", "arguments": {"name": "kitchen light", "area": ""}}',
    ],
)
def test_parse_tool_call_tolerated(raw: str) -> None:
    """Small-model variations of a call are understood."""
    assert parse_tool_call(raw) == TURN_ON


@pytest.mark.parametrize(
    "raw",
    [
        '{"name": "GetLiveContext"}',
        '{"name": "GetLiveContext", "arguments": null}',
        '{"name": "GetLiveContext", "arguments": "{}"}',
    ],
)
def test_parse_tool_call_without_arguments(raw: str) -> None:
    """Missing or null arguments mean no arguments."""
    assert parse_tool_call(raw) == GET_STATE


def test_parse_tool_call_drops_empty_values() -> None:
    """Empty strings, null, [] and {} are dropped; falsy scalars are kept."""
    arguments: dict[str, Any] = {
        "name": "",
        "area": None,
        "floor": [],
        "extra": {},
        "brightness": 0,
        "on": False,
        "domain": ["light"],
        "color": " ",
    }
    raw = json.dumps({"name": "HassLightSet", "arguments": arguments})
    assert parse_tool_call(raw) == ParsedToolCall(
        "HassLightSet",
        {"brightness": 0, "on": False, "domain": ["light"], "color": " "},
    )


@pytest.mark.parametrize(
    "raw",
    [
        '{"name": "HassTurnOn", "arguments": {"name": "kitchen light",}}',
        "{'name': 'HassTurnOn', 'arguments': {}}",
        f"{TURN_ON_JSON}\n{GET_STATE_JSON}",
        '{"name": "HassTurnOn", "argu',
    ],
)
def test_parse_tool_call_invalid_json(raw: str) -> None:
    """Broken JSON is not repaired; the JSON error message is passed on."""
    with pytest.raises(json.JSONDecodeError) as exc_info:
        json.loads(raw)
    assert parse_tool_call(raw) == ToolCallError(raw, f"invalid JSON: {exc_info.value}")


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        ("", "empty tool call"),
        ("\n ```json\n```\n", "empty tool call"),
        ('["HassTurnOn", {}]', "tool call must be a JSON object"),
        ('"HassTurnOn"', "tool call must be a JSON object"),
        ('{"arguments": {"name": "kitchen light"}}', "missing tool name"),
        ('{"name": 42, "arguments": {}}', "missing tool name"),
        ('{"name": " ", "arguments": {}}', "missing tool name"),
        ('{"function": "HassTurnOn"}', "missing tool name"),
        (
            '{"name": "HassTurnOn", "arguments": ["kitchen light"]}',
            "arguments must be a JSON object",
        ),
        ('{"name": "HassTurnOn", "arguments": 5}', "arguments must be a JSON object"),
        (
            '{"name": "HassTurnOn", "arguments": "kitchen light"}',
            "arguments must be a JSON object",
        ),
        (
            '{"name": "HassTurnOn", "arguments": "[1, 2]"}',
            "arguments must be a JSON object",
        ),
    ],
)
def test_parse_tool_call_errors(raw: str, error: str) -> None:
    """Malformed calls give a clear reason and keep the raw text."""
    assert parse_tool_call(raw) == ToolCallError(raw, error)
