#!/usr/bin/env python3
"""Benchmark the Assist agent on a simulated RK3588 (see scripts/bench --help).

A real Home Assistant instance runs in this process (the test harness of
pytest-homeassistant-custom-component, storage kept in memory). The RKLLM simulator
(tests/rkllm_sim) stands in for librkllmrt.so, calibrated to the published RK3588
figures of Qwen3-0.6B w8a8. A 10-turn voice dialogue with one tool call is answered
three ways:

- ours: the integration's default (history_strategy auto: system prompt cache plus
  history reuse in the KV cache);
- full_prompt: the official demos' pattern (history_strategy off: no prompt cache,
  the whole prompt with the folded history is prefilled every turn);
- cache_per_conversation: rkllama's pattern, driven directly on the binding
  (keep_history=0, one prompt cache file per conversation, saved on every run and
  loaded before the next, the whole templated conversation sent every turn).

A last phase measures the integration's own overhead with zero simulator delays,
and the cost the worker process adds against the in-process binding (the same
simulated model in an RKLLMModel and in a WorkerModel, driven directly); two fresh Home Assistant starts measure the time to a ready agent without a
system cache (it is built) and with the one the first start wrote (it is loaded).
Prompt-cache files have a real KV dump's size (Qwen3-0.6B: about 112 KB per token),
so writing and loading them costs what it costs on a disk.
"""

import argparse
import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
import contextlib
import ctypes
from dataclasses import dataclass, field
from datetime import UTC, datetime
import json
import logging
import os
from pathlib import Path
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

# The repository root holds custom_components/ (run as scripts/bench.py).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Home Assistant first, as in its own start-up: from 2026.9 it aliases voluptuous to
# probatio, which must happen before anything else imports voluptuous.
import homeassistant  # noqa: F401

# isort: split

from pytest_homeassistant_custom_component.common import (  # type: ignore[import-untyped]
    MockConfigEntry,
    async_mock_service,
    async_test_home_assistant,
    mock_storage,
)

from custom_components.rockchip_llm.agent_prefix import tools_json
from custom_components.rockchip_llm.const import (
    AGENT_OPTION_DEFAULTS,
    CONF_CACHE_DIR,
    CONF_HISTORY_STRATEGY,
    CONF_LIBRARY_PATH,
    CONF_MAX_CONTEXT_LEN,
    CONF_MAX_NEW_TOKENS,
    CONF_MODEL,
    CONF_MODELS_DIR,
    CONF_PROMPT,
    DEFAULT_PROMPT_FILE,
    DOMAIN,
    HistoryStrategy,
)
from custom_components.rockchip_llm.engine import LoadedModel, RunStats
from custom_components.rockchip_llm.rkllm.library import RuntimeLibrary
from custom_components.rockchip_llm.rkllm.runtime import (
    ModelParams,
    RKLLMModel,
    RunRequest,
    RunResult,
)
from custom_components.rockchip_llm.rkllm.worker import WorkerModel
from custom_components.rockchip_llm.run_planner import SystemPrefix
from homeassistant import loader, runner
from homeassistant.components import conversation
from homeassistant.components.homeassistant.exposed_entities import async_expose_entity
from homeassistant.config_entries import ConfigEntryState, ConfigSubentryData
from homeassistant.const import CONF_LLM_HASS_API, __version__ as HA_VERSION
from homeassistant.core import Context, HomeAssistant
from homeassistant.helpers import (
    area_registry as ar,
    chat_session,
    entity_registry as er,
    frame,
    llm,
)
from homeassistant.setup import async_setup_component

ROOT = Path(__file__).resolve().parent.parent
SIM_DIR = ROOT / "tests" / "rkllm_sim"
SIM_LIBRARIES = {
    "1.2": SIM_DIR / "build" / "librkllm_sim_1_2.so",
    "1.3": SIM_DIR / "build" / "librkllm_sim_1_3.so",
}

# Published RK3588 figures of Qwen3-0.6B w8a8 (rknn-llm benchmark table).
RK3588_PREFILL_MS = 1.56
RK3588_DECODE_MS = 30.4
QWEN3_06B_KV_BYTES_PER_TOKEN = 114688
"""28 layers x 8 KV heads x 128 dims x 2 (K and V) x fp16: 112 KB per token."""

STRATEGIES = ("ours", "full_prompt", "cache_per_conversation")
MODEL_NAME = "Qwen3-0.6B RK3588 (simulated)"
ZERO_MODEL_NAME = "Zero delay (simulated)"
WORKER_MODEL_NAME = "Zero delay, worker phase (simulated)"
HANDLES = ("in_process", "worker")
"""RKLLMModel (the binding on a thread of this process) and WorkerModel."""
WORKER_TARGETS = {"us_per_token": 100.0, "ms_per_request": 1.0}
"""Issue 11: what the worker process may add per streamed token and per request."""

# The simulator's Qwen chat template (tests/rkllm_sim/README.md, "Chat template").
USER_START = "<|im_start|>user\n"
TURN_END = "<|im_end|>\n"
ASSISTANT_START = "<|im_start|>assistant\n"
NO_THINK = "<think>\n\n</think>\n\n"


@dataclass(frozen=True, slots=True)
class Turn:
    """One question of the dialogue and the simulated model's scripted answer."""

    question: str
    answer: str
    tool_call: bool = False


# Short voice questions (about 15 simulator tokens each) with short answers.
QUESTIONS: tuple[Turn, ...] = (
    Turn(
        "What is the temperature in the living room right now, please?",
        "It is twenty one degrees in the living room right now.",
    ),
    Turn(
        "And how warm is it in the bedroom at the moment, do you know?",
        "The bedroom is at nineteen and a half degrees.",
    ),
    Turn(
        "Is the front door locked, or should I go and check it myself?",
        "The front door is locked, so there is no need to check.",
    ),
    Turn(
        "Are any of the windows in the house still open at the moment?",
        "Yes, the bathroom window is open right now.",
    ),
    Turn(
        "What is playing on the living room speaker at the moment, please?",
        "The living room speaker is playing jazz at low volume.",
    ),
    Turn(
        "Is the garage door closed now, or is it still open right now?",
        "The garage door is closed, nothing is open in there.",
    ),
    Turn(
        "How much power is the whole house using at the moment, roughly?",
        "The house is using about eight hundred forty watts.",
    ),
    Turn(
        "Which of the lights are still switched on in the house right now?",
        "The living room ceiling light, the floor lamp and the desk lamp are on.",
    ),
    Turn(
        "Thank you, that is all I needed for tonight, so good night then.",
        "Good night, sleep well, and see you tomorrow morning.",
    ),
)
TOOL_TURN = Turn(
    "Could you please turn on the kitchen light for me right now?",
    '<tool_call>{"name": "HassTurnOn", "arguments": {"name": "Kitchen Light"}}</tool_call>',
    tool_call=True,
)
TOOL_ANSWER = "Done, the kitchen light is on now."
DEFAULT_ANSWER = "Sorry, I did not understand that."
MAX_TURNS = len(QUESTIONS) + 1

CELSIUS = {"unit_of_measurement": "°C", "device_class": "temperature"}
DOOR = {"device_class": "door"}
WINDOW = {"device_class": "window"}

# area -> (entity_id, name, state, attributes): 30 exposed entities in 7 areas.
type EntitySpec = tuple[str, str, str, dict[str, Any]]
HOME: dict[str, tuple[EntitySpec, ...]] = {
    "Kitchen": (
        ("light.kitchen_light", "Kitchen Light", "off", {}),
        ("light.kitchen_counter", "Kitchen Counter Lights", "off", {}),
        ("switch.coffee_maker", "Coffee Maker", "off", {}),
        ("sensor.kitchen_temperature", "Kitchen Temperature", "21.5", CELSIUS),
        ("binary_sensor.fridge_door", "Fridge Door", "off", DOOR),
    ),
    "Living Room": (
        ("light.living_room_ceiling", "Living Room Ceiling", "on", {}),
        ("light.floor_lamp", "Floor Lamp", "on", {}),
        (
            "media_player.living_room_speaker",
            "Living Room Speaker",
            "playing",
            {"media_title": "Blue in Green", "volume_level": 0.2},
        ),
        ("sensor.living_room_temperature", "Living Room Temperature", "21.0", CELSIUS),
        ("cover.living_room_blinds", "Living Room Blinds", "open", {}),
        (
            "climate.thermostat",
            "Thermostat",
            "heat",
            {"current_temperature": 21.0, "temperature": 21.5},
        ),
    ),
    "Bedroom": (
        ("light.bedroom_light", "Bedroom Light", "off", {}),
        ("light.bedside_lamp", "Bedside Lamp", "off", {}),
        ("sensor.bedroom_temperature", "Bedroom Temperature", "19.5", CELSIUS),
        ("cover.bedroom_shutters", "Bedroom Shutters", "closed", {}),
        ("binary_sensor.bedroom_window", "Bedroom Window", "off", WINDOW),
    ),
    "Bathroom": (
        ("light.bathroom_light", "Bathroom Light", "off", {}),
        ("switch.towel_warmer", "Towel Warmer", "on", {}),
        (
            "sensor.bathroom_humidity",
            "Bathroom Humidity",
            "62",
            {"unit_of_measurement": "%", "device_class": "humidity"},
        ),
        ("binary_sensor.bathroom_window", "Bathroom Window", "on", WINDOW),
    ),
    "Office": (
        ("light.desk_lamp", "Desk Lamp", "on", {}),
        ("switch.monitor_power", "Monitor Power", "on", {}),
        ("sensor.office_temperature", "Office Temperature", "22.0", CELSIUS),
        (
            "sensor.office_co2",
            "Office CO2",
            "650",
            {"unit_of_measurement": "ppm", "device_class": "carbon_dioxide"},
        ),
    ),
    "Hallway": (
        ("light.hallway_light", "Hallway Light", "off", {}),
        ("lock.front_door", "Front Door Lock", "locked", {}),
        ("binary_sensor.front_door", "Front Door", "off", DOOR),
        (
            "sensor.house_power",
            "House Power",
            "840",
            {"unit_of_measurement": "W", "device_class": "power"},
        ),
    ),
    "Garage": (
        ("cover.garage_door", "Garage Door", "closed", {"device_class": "garage"}),
        ("light.garage_light", "Garage Light", "off", {}),
    ),
}

_LOGGER = logging.getLogger("bench")


# Settings and results


@dataclass(frozen=True, slots=True)
class Settings:
    """What to run (from the command line)."""

    turns: int
    tool_turn: int
    prefill_ms: float
    decode_ms: float
    cache_bytes_per_token: int
    overhead_requests: int
    overhead_reply_tokens: int
    worker_repetitions: int
    worker_reply_tokens: int
    abi: str
    json_path: Path | None
    plot_path: Path | None
    verbose: bool
    startup_cache: Path | None = None
    """Only measure one start with this (persistent) cache folder."""

    def dialogue(self) -> list[Turn]:
        """Return the questions asked, in order, with the tool call at tool_turn."""
        turns = list(QUESTIONS)
        if 1 <= self.tool_turn <= self.turns:
            turns.insert(self.tool_turn - 1, TOOL_TURN)
        return turns[: self.turns]


@dataclass(slots=True)
class TurnResult:
    """Measurements of one turn of one strategy."""

    ttft_ms: float | None
    wall_ms: float
    prefill_tokens: int
    prefill_ms: float
    generate_tokens: int
    runs: int
    reply: str
    history_reused: bool = False
    """Every run of the turn continued the KV (RunStats.reused_history)."""
    tool_results: list[str] = field(default_factory=list)
    """Tool results as the chat log received them (before HA edits them)."""


@dataclass(slots=True)
class OverheadSample:
    """One zero-delay request of the overhead phase."""

    wall_ms: float
    ttft_ms: float | None
    prefill_ms: float
    generate_ms: float
    generate_tokens: int


@dataclass(slots=True)
class HandleTimes:
    """Wall times (ms) of calls on one kind of model handle, driven directly."""

    clear_kv_cache: list[float] = field(default_factory=list)
    short_run: list[float] = field(default_factory=list)
    long_run: list[float] = field(default_factory=list)
    short_tokens: int = 0
    long_tokens: int = 0


@dataclass(slots=True)
class Report:
    """Everything measured in one benchmark run."""

    settings: Settings
    dialogue: list[Turn]
    system_prompt_tokens: int = 0
    tools: int = 0
    new_tokens: list[int] = field(default_factory=list)
    user_text_tokens: list[int] = field(default_factory=list)
    tool_result_tokens: int = 0
    turns: dict[str, list[TurnResult]] = field(default_factory=dict)
    overhead: list[OverheadSample] = field(default_factory=list)
    ha_prompt_ms: float = 0.0
    tools_json_ms: float = 0.0
    tool_calls_executed: int = 0
    startup: dict[str, dict[str, Any]] = field(default_factory=dict)
    """HA start to a ready agent: "without_cache" (built), "with_cache" (loaded)."""
    handles: dict[str, HandleTimes] = field(default_factory=dict)
    """The worker phase: "in_process" and "worker"."""


# The simulated model files


def model_file(
    dialogue: Sequence[Turn],
    prefill_ms: float,
    decode_ms: float,
    cache_bytes_per_token: int = 0,
) -> str:
    """Return the simulated model: calibrated delays and the dialogue's answers.

    The replies match substrings of the raw prompt, and strategies that fold or
    re-send the history put earlier questions into it too. The rules are therefore
    listed from the last turn to the first, so the newest question wins; the tool
    answer sits just before the tool question for the same reason (role tool for
    ours, "Tool result:" for the folded history of full_prompt, "<tool_response>"
    for the re-templated conversation of cache_per_conversation).
    """
    lines = [
        "RKLLM-SIM 1",
        f"max_context_limit {AGENT_OPTION_DEFAULTS[CONF_MAX_CONTEXT_LEN]}",
        f"prefill_ms_per_token {prefill_ms}",
        f"decode_ms_per_token {decode_ms}",
        f"cache_bytes_per_token {cache_bytes_per_token}",
        f"reply tool * => {TOOL_ANSWER}",
    ]
    for turn in reversed(dialogue):
        if turn.tool_call:
            lines += [
                f"reply user <tool_response> => {TOOL_ANSWER}",
                f"reply user Tool result: => {TOOL_ANSWER}",
            ]
        lines.append(f"reply user {turn.question.rstrip('?.!')} => {turn.answer}")
    lines.append(f"default => {DEFAULT_ANSWER}")
    return "\n".join(lines) + "\n"


def zero_model_file(reply_tokens: int) -> str:
    """Return the zero-delay model of the overhead phase."""
    long_reply = " ".join(f"word{index}" for index in range(reply_tokens))
    return (
        "\n".join(
            (
                "RKLLM-SIM 1",
                f"max_context_limit {AGENT_OPTION_DEFAULTS[CONF_MAX_CONTEXT_LEN]}",
                "prefill_ms_per_token 0",
                "decode_ms_per_token 0",
                "reply user short request => OK.",
                f"reply user long request => {long_reply}",
                "default => OK.",
            )
        )
        + "\n"
    )


def write_model(models_dir: Path, name: str, text: str) -> Path:
    """Write a model folder holding one simulated .rkllm file."""
    folder = models_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.rkllm"
    path.write_text(text, encoding="utf-8")
    return path


# Home Assistant


@contextlib.asynccontextmanager
async def home_assistant(config_dir: Path) -> AsyncIterator[HomeAssistant]:
    """Run a Home Assistant test instance with custom integrations enabled."""
    async with async_test_home_assistant(config_dir=str(config_dir)) as hass:
        frame.async_setup(hass)
        # The harness hides custom_components/ unless this is cleared (as the
        # enable_custom_integrations fixture does).
        hass.data.pop(loader.DATA_CUSTOM_COMPONENTS, None)
        try:
            yield hass
        finally:
            for entry in hass.config_entries.async_entries():
                if entry.state is ConfigEntryState.LOADED:
                    await hass.config_entries.async_unload(entry.entry_id)
            await hass.async_stop(force=True)


async def async_setup_home(hass: HomeAssistant) -> list[Any]:
    """Create areas and 30 exposed entities, load Assist intents, mock light.turn_on."""
    assert await async_setup_component(hass, "homeassistant", {})
    # conversation needs http, which would serve on 8123 (a dev instance's port).
    assert await async_setup_component(
        hass,
        "http",
        {"http": {"server_host": "127.0.0.1", "server_port": _free_port()}},
    )
    assert await async_setup_component(hass, "conversation", {})
    assert await async_setup_component(hass, "intent", {})
    areas = ar.async_get(hass)
    entities = er.async_get(hass)
    for area_name, specs in HOME.items():
        area_id = areas.async_create(area_name).id
        for entity_id, name, state, attributes in specs:
            domain, object_id = entity_id.split(".", 1)
            entry = entities.async_get_or_create(
                domain,
                "bench",
                object_id,
                suggested_object_id=object_id,
                original_name=name,
            )
            assert entry.entity_id == entity_id, entry.entity_id
            entities.async_update_entity(entity_id, area_id=area_id)
            hass.states.async_set(
                entity_id, state, {"friendly_name": name, **attributes}
            )
            async_expose_entity(hass, conversation.DOMAIN, entity_id, True)
    calls: list[Any] = async_mock_service(hass, "light", "turn_on")
    return calls


async def async_add_entry(
    hass: HomeAssistant,
    *,
    library: Path,
    models_dir: Path,
    cache_dir: Path,
    model: str,
    strategy: HistoryStrategy,
    title: str,
) -> tuple[MockConfigEntry, str]:
    """Set up one runtime entry with one agent; return it and the agent's entity id.

    Each strategy gets an entry (and so an engine and a model handle) of its own,
    so no run of one strategy leaves KV state behind for another.
    """
    prompt = DEFAULT_PROMPT_FILE.read_text(encoding="utf-8")
    entry = MockConfigEntry(
        domain=DOMAIN,
        title=title,
        data={
            CONF_LIBRARY_PATH: str(library),
            CONF_MODELS_DIR: str(models_dir),
            CONF_CACHE_DIR: str(cache_dir),
        },
        subentries_data=[
            ConfigSubentryData(
                data={
                    CONF_MODEL: model,
                    CONF_PROMPT: prompt,
                    CONF_LLM_HASS_API: [llm.LLM_API_ASSIST],
                    CONF_HISTORY_STRATEGY: strategy.value,
                },
                subentry_type="conversation",
                title=title,
                unique_id=None,
            )
        ],
    )
    entry.add_to_hass(hass)
    if not await hass.config_entries.async_setup(entry.entry_id):
        raise RuntimeError(f"setting up the {title} entry failed: {entry.state}")
    await hass.async_block_till_done()
    subentry_id = next(iter(entry.subentries))
    entity_id = er.async_get(hass).async_get_entity_id(
        conversation.DOMAIN, DOMAIN, subentry_id
    )
    assert entity_id is not None
    return entry, entity_id


def loaded_model(entry: MockConfigEntry) -> LoadedModel:
    """Return the model handle of the entry's only agent."""
    agent = next(iter(entry.runtime_data.agents.values()))
    loaded: LoadedModel = agent.loaded
    return loaded


def agent_prefix(entry: MockConfigEntry) -> SystemPrefix:
    """Return the system prompt and tools of the entry's agent (its cached prefix)."""
    agent = next(iter(entry.runtime_data.agents.values()))
    prefix: SystemPrefix | None = agent.prefix
    assert prefix is not None
    return prefix


def runs_since(loaded: LoadedModel, last: RunStats | None) -> list[RunStats]:
    """Return the runs recorded after last (oldest first)."""
    runs: list[RunStats] = []
    for stats in reversed(loaded.recent):
        if stats is last:
            break
        runs.append(stats)
    return runs[::-1]


async def async_converse_timed(
    hass: HomeAssistant,
    entity_id: str,
    loaded: LoadedModel,
    text: str,
    conversation_id: str | None,
) -> tuple[str, TurnResult]:
    """Ask once; time the first content delta that reaches the chat log.

    The listener also keeps each tool result as it arrived: the chat log hands it
    over as a copy, while HA later writes the final speech into the original
    (conversation.async_get_result_from_chat_log).
    """
    first_content: list[float] = []
    tool_results: list[str] = []

    def listener(_chat_log: conversation.ChatLog, delta: dict[str, Any]) -> None:
        if not first_content and delta.get("content"):
            first_content.append(time.perf_counter())
        if delta.get("role") == "tool_result":
            tool_results.append(
                json.dumps(delta.get("tool_result"), ensure_ascii=False, default=str)
            )

    last = loaded.recent[-1] if loaded.recent else None
    with (
        chat_session.async_get_chat_session(hass, conversation_id) as session,
        conversation.async_get_chat_log(
            hass, session, chat_log_delta_listener=listener
        ),
    ):
        started = time.perf_counter()
        result = await conversation.async_converse(
            hass, text, session.conversation_id, Context(), agent_id=entity_id
        )
        ended = time.perf_counter()
    runs = runs_since(loaded, last)
    speech: str = result.response.speech.get("plain", {}).get("speech", "")
    return result.conversation_id or session.conversation_id, TurnResult(
        ttft_ms=(first_content[0] - started) * 1000 if first_content else None,
        wall_ms=(ended - started) * 1000,
        prefill_tokens=sum(run.prefill_tokens for run in runs),
        prefill_ms=sum(run.prefill_ms for run in runs),
        generate_tokens=sum(run.generate_tokens for run in runs),
        runs=len(runs),
        reply=speech,
        history_reused=bool(runs) and all(run.reused_history for run in runs),
        tool_results=tool_results,
    )


async def async_ha_dialogue(
    hass: HomeAssistant, entity_id: str, loaded: LoadedModel, dialogue: list[Turn]
) -> list[TurnResult]:
    """Run the dialogue through conversation.async_converse, in one conversation."""
    results: list[TurnResult] = []
    conversation_id: str | None = None
    for turn in dialogue:
        conversation_id, result = await async_converse_timed(
            hass, entity_id, loaded, turn.question, conversation_id
        )
        results.append(result)
    return results


async def async_prompt_costs(
    hass: HomeAssistant, entry: MockConfigEntry, samples: int
) -> tuple[float, float]:
    """Median ms of HA rendering the agent's prompt and tools, and of our tools JSON.

    Both happen on every request: chat_log.async_provide_llm_data (Home Assistant:
    the Assist API prompt with the exposed entities, the tool objects) and
    agent_prefix.tools_json (the integration: the tools as the runtime's JSON).
    """
    options = next(iter(entry.subentries.values())).data
    provide: list[float] = []
    tools: list[float] = []
    for _sample in range(samples):
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
            started = time.perf_counter()
            await chat_log.async_provide_llm_data(
                llm_context,
                options.get(CONF_LLM_HASS_API),
                options.get(CONF_PROMPT),
                None,
            )
            rendered = time.perf_counter()
            tools_json(chat_log.llm_api)
            provide.append((rendered - started) * 1000)
            tools.append((time.perf_counter() - rendered) * 1000)
    return statistics.median(provide), statistics.median(tools)


# cache_per_conversation, on the binding


def system_block(prefix: SystemPrefix) -> str:
    """Return the system block the simulator builds in rkllm_set_function_tools."""
    return (
        f"<|im_start|>system\n{prefix.prompt}\n\n# Tools\n<tools>\n"
        f"{prefix.tools_json}\n</tools>{TURN_END}"
    )


async def async_stream(
    model: RKLLMModel, request: RunRequest
) -> tuple[str, float | None, RunResult]:
    """Run once; return the text, the arrival time of its first text and the result."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    def push(item: str | None) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, item)

    future = model.run(request, push)
    future.add_done_callback(lambda _: push(None))
    first: float | None = None
    pieces: list[str] = []
    while (text := await queue.get()) is not None:
        if first is None:
            first = time.perf_counter()
        pieces.append(text)
    result = await asyncio.wrap_future(future)
    return "".join(pieces), first, result


async def async_cache_per_conversation(
    library: RuntimeLibrary,
    *,
    model_path: Path,
    prefix: SystemPrefix,
    dialogue: list[Turn],
    tool_result: str,
    work_dir: Path,
) -> list[TurnResult]:
    """Run rkllama's pattern: all of the conversation each turn, a cache file per conversation.

    The conversation is templated in Qwen3's chat format (earlier assistant turns
    without the empty think block, the generation prompt with it) and sent raw:
    rkllm_set_chat_template gets the same system block and tools the agent's
    rkllm_set_function_tools produces, with empty user prefix and postfix.
    keep_history=0; every run saves the prompt cache of the conversation and the
    next run loads it first. TTFT is the time from the start of the turn (cache
    load included) to the first streamed text of the run that answers; in the tool
    turn, the tool result the HA agent got is fed back at once (no tool runs here).
    """
    model = RKLLMModel(library, "cache_per_conversation")
    params = ModelParams(
        model_path=model_path,
        max_context_len=AGENT_OPTION_DEFAULTS[CONF_MAX_CONTEXT_LEN],
        max_new_tokens=AGENT_OPTION_DEFAULTS[CONF_MAX_NEW_TOKENS],
    )
    cache_path = work_dir / "conversation.bin"
    results: list[TurnResult] = []
    try:
        await asyncio.wrap_future(model.init(params))
        await asyncio.wrap_future(model.set_chat_template(system_block(prefix), "", ""))
        history = ""
        have_cache = False
        for turn in dialogue:
            started = time.perf_counter()
            history += f"{USER_START}{turn.question}{TURN_END}"
            runs: list[RunResult] = []
            while True:
                if have_cache:
                    await asyncio.wrap_future(model.load_prompt_cache(cache_path))
                text, first, result = await async_stream(
                    model,
                    RunRequest(
                        prompt=f"{history}{ASSISTANT_START}{NO_THINK}",
                        keep_history=False,
                        save_prompt_cache=cache_path,
                        max_new_tokens=AGENT_OPTION_DEFAULTS[CONF_MAX_NEW_TOKENS],
                    ),
                )
                have_cache = True
                runs.append(result)
                history += f"{ASSISTANT_START}{text}{TURN_END}"
                if "<tool_call>" in text and len(runs) < 2:
                    history += (
                        f"{USER_START}<tool_response>\n{tool_result}\n"
                        f"</tool_response>{TURN_END}"
                    )
                    continue
                break
            ended = time.perf_counter()
            perfs = [run.perf for run in runs if run.perf is not None]
            results.append(
                TurnResult(
                    ttft_ms=(first - started) * 1000 if first is not None else None,
                    wall_ms=(ended - started) * 1000,
                    prefill_tokens=sum(perf.prefill_tokens for perf in perfs),
                    prefill_ms=sum(perf.prefill_time_ms for perf in perfs),
                    generate_tokens=sum(perf.generate_tokens for perf in perfs),
                    runs=len(runs),
                    reply=text,
                )
            )
    finally:
        await asyncio.get_running_loop().run_in_executor(None, model.close)
    return results


# Overhead


async def async_overhead(
    hass: HomeAssistant, entity_id: str, loaded: LoadedModel, requests: int
) -> list[OverheadSample]:
    """Zero-delay requests, alternating a 2-token and a long reply (new conversations)."""
    samples: list[OverheadSample] = []
    for index in range(-4, 2 * requests):
        text = "long request" if index % 2 else "short request"
        _conversation_id, result = await async_converse_timed(
            hass, entity_id, loaded, text, None
        )
        if index < 0:
            continue  # warm-up
        runs = list(loaded.recent)[-result.runs :] if result.runs else []
        samples.append(
            OverheadSample(
                wall_ms=result.wall_ms,
                ttft_ms=result.ttft_ms,
                prefill_ms=sum(run.prefill_ms for run in runs),
                generate_ms=sum(run.generate_ms for run in runs),
                generate_tokens=result.generate_tokens,
            )
        )
    return samples


def fit_overhead(
    samples: list[OverheadSample], value: Callable[[OverheadSample], float]
) -> tuple[float, float]:
    """Least squares of value = a + b * generated tokens: (ms per request, µs per token)."""
    xs = [float(sample.generate_tokens) for sample in samples]
    ys = [value(sample) for sample in samples]
    if len(set(xs)) < 2:
        mean = statistics.fmean(ys)
        return mean, 0.0
    slope, intercept = statistics.linear_regression(xs, ys)
    return intercept, slope * 1000


def outside_sim(sample: OverheadSample) -> float:
    """Wall time minus the time the simulator reports for prefill and decode."""
    return sample.wall_ms - sample.prefill_ms - sample.generate_ms


def outside_prefill(sample: OverheadSample) -> float:
    """Wall time minus the simulator's prefill time (decode loop callbacks kept)."""
    return sample.wall_ms - sample.prefill_ms


# The worker's added cost


def _timed_run(model: RKLLMModel | WorkerModel, prompt: str) -> tuple[float, int]:
    """Run once to the end (blocking); return the wall ms and the tokens generated."""
    pieces: list[str] = []
    started = time.perf_counter()
    result = model.run(RunRequest(prompt=prompt), pieces.append).result()
    wall_ms = (time.perf_counter() - started) * 1000
    return wall_ms, result.perf.generate_tokens if result.perf else len(pieces)


def _timed_clear(model: RKLLMModel | WorkerModel) -> float:
    """Clear the KV cache (blocking); return the wall ms of the round trip."""
    started = time.perf_counter()
    model.clear_kv_cache(keep_system_prompt=False).result()
    return (time.perf_counter() - started) * 1000


def measure_handles(
    library: RuntimeLibrary, model_path: Path, repetitions: int
) -> dict[str, HandleTimes]:
    """Time the same calls on an RKLLMModel and a WorkerModel of one zero-delay model.

    Blocking: run it off the event loop. Both handles are loaded at once and the
    repetitions alternate between them, so load from elsewhere hits both alike;
    the first three repetitions are warm-up. Text is collected by a sink that only
    appends, the cheapest consumer, so the difference is the worker's own cost.
    """
    params = ModelParams(
        model_path=model_path,
        max_context_len=AGENT_OPTION_DEFAULTS[CONF_MAX_CONTEXT_LEN],
        max_new_tokens=AGENT_OPTION_DEFAULTS[CONF_MAX_CONTEXT_LEN] // 2,
    )
    models: dict[str, RKLLMModel | WorkerModel] = {
        "in_process": RKLLMModel(library, "bench_in_process"),
        "worker": WorkerModel(library, "bench_worker"),
    }
    times = {name: HandleTimes() for name in HANDLES}
    try:
        for model in models.values():
            model.init(params).result()
        for index in range(-3, repetitions):
            for name in HANDLES:
                model, into = models[name], times[name]
                clear_ms = _timed_clear(model)
                short_ms, into.short_tokens = _timed_run(model, "short request")
                long_ms, into.long_tokens = _timed_run(model, "long request")
                if index >= 0:
                    into.clear_kv_cache.append(clear_ms)
                    into.short_run.append(short_ms)
                    into.long_run.append(long_ms)
    finally:
        for model in models.values():
            model.close()
    return times


def handle_costs(times: HandleTimes) -> dict[str, float | int | None]:
    """Medians of one handle: per request (round trips) and per streamed token."""
    short = statistics.median(times.short_run)
    long = statistics.median(times.long_run)
    extra_tokens = times.long_tokens - times.short_tokens
    return {
        "clear_kv_cache_ms": _round(statistics.median(times.clear_kv_cache), 4),
        "short_run_ms": _round(short, 4),
        "long_run_ms": _round(long, 4),
        "short_run_tokens": times.short_tokens,
        "long_run_tokens": times.long_tokens,
        "us_per_token": _round(1000 * (long - short) / extra_tokens, 3)
        if extra_tokens > 0
        else None,
    }


def worker_overhead(report: Report) -> dict[str, Any] | None:
    """Return the worker_overhead section of the JSON (in_process, worker, added)."""
    if not report.handles:
        return None
    costs = {name: handle_costs(report.handles[name]) for name in HANDLES}

    def added(key: str, digits: int) -> float | None:
        inner, outer = costs["in_process"][key], costs["worker"][key]
        if inner is None or outer is None:
            return None
        return _round(float(outer) - float(inner), digits)

    settings = report.settings
    return {
        **costs,
        "added": {
            "us_per_token": added("us_per_token", 3),
            "ms_per_request": added("short_run_ms", 4),
            "clear_kv_cache_ms": added("clear_kv_cache_ms", 4),
        },
        "targets": WORKER_TARGETS,
        "method": (
            "the same zero-delay simulated model loaded in an RKLLMModel (binding "
            "on a thread of this process) and in a WorkerModel (a worker process, "
            "as the engine uses), driven directly off the event loop, the text "
            f"collected by list.append; {settings.worker_repetitions} repetitions "
            "(after 3 of warm-up) alternating between the two, each a "
            "clear_kv_cache round trip, a run with a short reply and a run with a "
            f"{settings.worker_reply_tokens}-token reply; medians. us_per_token = "
            "(long run - short run) / (difference in streamed tokens); "
            "ms_per_request = the short run's wall time (a whole request round "
            "trip); added = worker - in_process"
        ),
    }


# The run


class SimCounter:
    """rkllm_sim_count_tokens of the simulator library."""

    def __init__(self, library: RuntimeLibrary) -> None:
        """Bind the export."""
        function: Any = library.cdll.rkllm_sim_count_tokens
        function.argtypes = [ctypes.c_char_p]
        function.restype = ctypes.c_int
        self._count: Callable[[bytes], int] = function

    def __call__(self, text: str) -> int:
        """Return the simulator's token count of text."""
        return int(self._count(text.encode()))


def user_turn_text(question: str) -> str:
    """Return a user turn as the simulator templates it (thinking off)."""
    return f"{USER_START}{question}{TURN_END}{ASSISTANT_START}{NO_THINK}"


def tool_turn_text(result: str) -> str:
    """Return a tool turn as the simulator templates it (thinking off)."""
    return (
        f"{USER_START}<tool_response>\n{result}\n</tool_response>"
        f"{TURN_END}{ASSISTANT_START}{NO_THINK}"
    )


async def async_benchmark(settings: Settings, work_dir: Path) -> Report:
    """Set up Home Assistant and run every strategy, then the overhead phase."""
    library_path = SIM_LIBRARIES[settings.abi]
    dialogue = settings.dialogue()
    report = Report(settings=settings, dialogue=dialogue)
    models_dir = work_dir / "models"
    model_path = write_model(
        models_dir,
        MODEL_NAME,
        model_file(
            dialogue,
            settings.prefill_ms,
            settings.decode_ms,
            settings.cache_bytes_per_token,
        ),
    )
    zero_models_dir = work_dir / "zero_models"
    write_model(
        zero_models_dir,
        ZERO_MODEL_NAME,
        zero_model_file(settings.overhead_reply_tokens),
    )
    worker_model_path = write_model(
        work_dir / "worker_models",
        WORKER_MODEL_NAME,
        zero_model_file(settings.worker_reply_tokens),
    )
    config_dir = work_dir / "config"
    config_dir.mkdir()
    with mock_storage():
        async with home_assistant(config_dir) as hass:
            light_calls = await async_setup_home(hass)
            ours_entry, ours_entity = await async_add_entry(
                hass,
                library=library_path,
                models_dir=models_dir,
                cache_dir=work_dir / "cache_ours",
                model=MODEL_NAME,
                strategy=HistoryStrategy.AUTO,
                title="Bench ours",
            )
            full_entry, full_entity = await async_add_entry(
                hass,
                library=library_path,
                models_dir=models_dir,
                cache_dir=work_dir / "cache_full_prompt",
                model=MODEL_NAME,
                strategy=HistoryStrategy.OFF,
                title="Bench full prompt",
            )
            zero_entry, zero_entity = await async_add_entry(
                hass,
                library=library_path,
                models_dir=zero_models_dir,
                cache_dir=work_dir / "cache_zero",
                model=ZERO_MODEL_NAME,
                strategy=HistoryStrategy.AUTO,
                title="Bench overhead",
            )
            library: RuntimeLibrary = ours_entry.runtime_data.engine.library
            count = SimCounter(library)
            prefix = agent_prefix(ours_entry)
            report.system_prompt_tokens = count(system_block(prefix))
            report.tools = len(json.loads(prefix.tools_json))
            report.new_tokens = [count(user_turn_text(t.question)) for t in dialogue]
            report.user_text_tokens = [count(t.question) for t in dialogue]

            _LOGGER.info("Strategy ours (history_strategy auto)")
            ours_loaded = loaded_model(ours_entry)
            report.turns["ours"] = await async_ha_dialogue(
                hass, ours_entity, ours_loaded, dialogue
            )
            sent = [text for turn in report.turns["ours"] for text in turn.tool_results]
            tool_result = sent[0] if sent else json.dumps({"error": "no tool result"})
            if sent:
                report.tool_result_tokens = count(tool_turn_text(tool_result))

            _LOGGER.info("Strategy full_prompt (history_strategy off)")
            report.turns["full_prompt"] = await async_ha_dialogue(
                hass, full_entity, loaded_model(full_entry), dialogue
            )

            _LOGGER.info("Strategy cache_per_conversation (on the binding)")
            rkllama_dir = work_dir / "cache_per_conversation"
            rkllama_dir.mkdir()
            report.turns["cache_per_conversation"] = await async_cache_per_conversation(
                library,
                model_path=model_path,
                prefix=prefix,
                dialogue=dialogue,
                tool_result=tool_result,
                work_dir=rkllama_dir,
            )

            _LOGGER.info(
                "Overhead: %d requests per reply length", settings.overhead_requests
            )
            report.overhead = await async_overhead(
                hass, zero_entity, loaded_model(zero_entry), settings.overhead_requests
            )
            report.ha_prompt_ms, report.tools_json_ms = await async_prompt_costs(
                hass, zero_entry, settings.overhead_requests
            )
            report.tool_calls_executed = len(light_calls)

            _LOGGER.info(
                "Worker cost: %d repetitions per handle", settings.worker_repetitions
            )
            report.handles = await hass.async_add_executor_job(
                measure_handles,
                library,
                worker_model_path,
                settings.worker_repetitions,
            )
    startup_cache = work_dir / "cache_startup"
    for case in ("without_cache", "with_cache"):
        _LOGGER.info("Home Assistant start to a ready agent, %s", case)
        report.startup[case] = await async_startup(
            library_path, models_dir, startup_cache, work_dir / f"config_{case}"
        )
    built, again = report.startup["without_cache"], report.startup["with_cache"]
    # The second start must load the first one's cache, not build a new one.
    again["cache_loaded"] = again.pop("cache_created_at") == built.pop(
        "cache_created_at"
    )
    built["cache_loaded"] = False
    return report


async def async_one_startup(settings: Settings, work_dir: Path) -> dict[str, Any]:
    """Measure one start with the persistent cache folder of --startup-only.

    The model file is kept next to it (a rewritten file is another model).
    """
    cache_dir = settings.startup_cache
    assert cache_dir is not None
    models_dir = cache_dir.with_name(f"{cache_dir.name}-models")
    if not models_dir.exists():
        write_model(
            models_dir,
            MODEL_NAME,
            model_file(
                settings.dialogue(),
                settings.prefill_ms,
                settings.decode_ms,
                settings.cache_bytes_per_token,
            ),
        )
    return await async_startup(
        SIM_LIBRARIES[settings.abi], models_dir, cache_dir, work_dir / "config"
    )


async def async_startup(
    library_path: Path, models_dir: Path, cache_dir: Path, config_dir: Path
) -> dict[str, Any]:
    """Start Home Assistant, set up the home and one agent; time it until ready.

    The cache's creation time tells the caller whether it was built or loaded.
    """
    config_dir.mkdir()
    started = time.perf_counter()
    with mock_storage():
        async with home_assistant(config_dir) as hass:
            await async_setup_home(hass)
            entry_started = time.perf_counter()
            entry, _entity = await async_add_entry(
                hass,
                library=library_path,
                models_dir=models_dir,
                cache_dir=cache_dir,
                model=MODEL_NAME,
                strategy=HistoryStrategy.AUTO,
                title="Bench startup",
            )
            ready = time.perf_counter()
            cache = loaded_model(entry).loaded_cache
            metadata = cache.metadata if cache else None
            return {
                "ha_start_to_ready_ms": _round((ready - started) * 1000),
                "entry_setup_ms": _round((ready - entry_started) * 1000),
                "cache_created_at": metadata.created_at if metadata else None,
                "cache_bytes": metadata.size_bytes if metadata else None,
                "cache_tokens": metadata.tokens if metadata else None,
            }


# Output


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def ttft_summary(results: list[TurnResult], dialogue: list[Turn]) -> dict[str, Any]:
    """turn1, followup_mean (plain follow-up questions) and per_turn TTFT in ms."""
    per_turn = [result.ttft_ms for result in results]
    followups = [
        ttft
        for index, ttft in enumerate(per_turn)
        if index > 0 and ttft is not None and not dialogue[index].tool_call
    ]
    return {
        "turn1": _round(per_turn[0]) if per_turn else None,
        "followup_mean": _round(statistics.fmean(followups)) if followups else None,
        "per_turn": [_round(ttft) for ttft in per_turn],
    }


def to_json(report: Report) -> dict[str, Any]:
    """Return the benchmark's JSON document."""
    settings = report.settings
    dialogue = report.dialogue
    ours = report.turns.get("ours", [])
    total_new = sum(report.new_tokens)
    total_prefill = sum(result.prefill_tokens for result in ours)
    with_tools = total_new + report.tool_result_tokens
    prefill_ratio = total_prefill / with_tools if with_tools else None
    samples = report.overhead
    per_request, per_token = (
        fit_overhead(samples, outside_prefill) if samples else (0.0, 0.0)
    )
    perf_request, perf_token = (
        fit_overhead(samples, outside_sim) if samples else (0.0, 0.0)
    )
    long_samples = [s for s in samples if s.generate_tokens > 10]
    tool_turn = next(
        (index + 1 for index, turn in enumerate(dialogue) if turn.tool_call), None
    )
    conditions: dict[str, Any] = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "scenario": (
            "Home Assistant in-process (pytest-homeassistant-custom-component harness), "
            "conversation.async_converse, Assist API, agent prompt prompts/system.txt"
        ),
        "simulator": f"tests/rkllm_sim ABI {settings.abi} ({SIM_LIBRARIES[settings.abi].name})",
        "calibration": "RK3588, Qwen3-0.6B w8a8 (published rknn-llm figures)",
        "prefill_ms_per_token": settings.prefill_ms,
        "decode_ms_per_token": settings.decode_ms,
        "max_context_len": AGENT_OPTION_DEFAULTS[CONF_MAX_CONTEXT_LEN],
        "exposed_entities": sum(len(specs) for specs in HOME.values()),
        "areas": len(HOME),
        "tools": report.tools,
        "system_prompt_tokens": report.system_prompt_tokens,
        "turns": len(dialogue),
        "tool_turn": tool_turn,
        "questions": [turn.question for turn in dialogue],
        "replies": {
            name: [result.reply for result in results]
            for name, results in report.turns.items()
        },
        "runs_per_turn": {
            name: [result.runs for result in results]
            for name, results in report.turns.items()
        },
        "history_reused_per_turn": {
            name: [result.history_reused for result in report.turns[name]]
            for name in ("ours", "full_prompt")
            if name in report.turns
        },
        "tool_calls_executed_by_ha": report.tool_calls_executed,
        "new_tokens_per_turn": report.new_tokens,
        "new_tokens_definition": (
            "rkllm_sim_count_tokens of the templated user turn: "
            "'<|im_start|>user\\n' + question + '<|im_end|>\\n<|im_start|>assistant\\n' "
            "+ the empty think block (thinking off); the tool result sent back to the "
            "model is new input too and is added once (tool_result_turn_tokens)"
        ),
        "user_text_tokens_per_turn": report.user_text_tokens,
        "tool_result_turn_tokens": report.tool_result_tokens,
        "prefill_ratio_user_turns_only": _round(
            total_prefill / total_new if total_new else None, 3
        ),
        "prefill_ratio_definition": (
            "ours: sum of prefilled tokens / sum of new tokens (user turns and the tool result)"
        ),
        "ttft_definition": {
            "ours": "converse call to the first content delta in the chat log",
            "full_prompt": "converse call to the first content delta in the chat log",
            "cache_per_conversation": (
                "start of the turn (prompt cache load included) to the first streamed "
                "text of the answering run, on the binding without Home Assistant; "
                "the tool turn feeds back the HA agent's tool result at once"
            ),
            "followup_mean": "mean of turns 2..N without the tool turn",
            "tool_turn": "includes decoding the tool call, the tool and the second run",
            "first_token": (
                "the simulator sleeps one decode step before the first token, while the "
                "published TTFT (199 ms for 128 tokens = 1.56 ms/token) already covers "
                "it: simulated TTFTs are about decode_ms_per_token above that model"
            ),
        },
        "strategies": {
            "ours": "history_strategy auto: system prompt cache + KV history reuse",
            "full_prompt": (
                "history_strategy off: no prompt cache, keep_history=0, history folded "
                "into the prompt, full prefill every turn (the official demos' pattern)"
            ),
            "cache_per_conversation": (
                "rkllama's pattern on the binding: keep_history=0, the whole templated "
                "conversation every turn, one prompt cache file per conversation saved "
                "by every run and loaded before the next"
            ),
        },
        "prefill_tokens_definition": (
            "RKLLMResult.perf.prefill_tokens summed over the runs of the turn "
            "(two runs in the tool turn)"
        ),
        "overhead_method": (
            f"zero simulator delays, {len(samples)} requests in new conversations "
            f"through async_converse, alternating a 2-token and a "
            f"{settings.overhead_reply_tokens}-token reply; least squares of "
            "(wall time - perf prefill_time_ms) = a + b * generated tokens. "
            "perf generate_time_ms is not subtracted: at zero delay it is the time "
            "spent in our ctypes callback, which is integration overhead"
        ),
        "overhead_breakdown_ms_per_request": {
            "ha_async_provide_llm_data": _round(report.ha_prompt_ms, 3),
            "ours_tools_json": _round(report.tools_json_ms, 3),
            "rest": _round(per_request - report.ha_prompt_ms - report.tools_json_ms, 3),
            "method": "medians of separate timings of the same calls, see bench.py",
        },
        "overhead_excluding_perf_generate_time": {
            "ms_per_request": _round(perf_request, 3),
            "us_per_token": _round(perf_token, 2),
        },
        "overhead_naive_long_replies": {
            "ms_per_request": _round(
                statistics.fmean(outside_prefill(s) for s in long_samples), 3
            )
            if long_samples
            else None,
            "us_per_token": _round(
                1000
                * sum(outside_prefill(s) for s in long_samples)
                / max(1, sum(s.generate_tokens for s in long_samples)),
                2,
            )
            if long_samples
            else None,
        },
        "overhead_ttft_ms_mean": _round(
            statistics.fmean(s.ttft_ms for s in samples if s.ttft_ms is not None), 3
        )
        if any(s.ttft_ms is not None for s in samples)
        else None,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "homeassistant": HA_VERSION,
        },
    }
    return {
        "conditions": conditions,
        "ttft_ms": {
            name: ttft_summary(results, dialogue)
            for name, results in report.turns.items()
        },
        "prefill_tokens": {
            name: [result.prefill_tokens for result in results]
            for name, results in report.turns.items()
        },
        "prefill_ratio": _round(prefill_ratio, 3),
        "overhead_ms_per_request": _round(per_request, 3),
        "overhead_us_per_token": _round(per_token, 2),
        "worker_overhead": worker_overhead(report),
        "startup": report.startup,
    }


def _cell(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _verdict(value: float | None, limit: float) -> str:
    if value is None:
        return "n/a"
    if value <= limit:
        return f"met ({value:.3g} ≤ {limit:g})"
    return f"MISSED by {value - limit:.3g} ({value:.3g} > {limit:g})"


def print_report(data: dict[str, Any]) -> None:
    """Print the tables and the targets."""
    conditions = data["conditions"]
    ttft = data["ttft_ms"]
    prefill = data["prefill_tokens"]
    reused = conditions["history_reused_per_turn"].get("ours", [])
    tool_turn = conditions["tool_turn"]
    names = [name for name in STRATEGIES if name in ttft]
    print(
        f"Simulated {conditions['calibration']}: prefill "
        f"{conditions['prefill_ms_per_token']} ms/token, decode "
        f"{conditions['decode_ms_per_token']} ms/token ({conditions['simulator']})"
    )
    print(
        f"System prompt {conditions['system_prompt_tokens']} tokens "
        f"(prompts/system.txt + Assist API, {conditions['exposed_entities']} exposed "
        f"entities in {conditions['areas']} areas, {conditions['tools']} tools); "
        f"{conditions['turns']} turns, tool call in turn {tool_turn}"
    )
    width = max(len(name) for name in names) + 2
    header = f"{'turn':>5} {'new':>4}" + "".join(f"{name:>{width}}" for name in names)

    def rows(cell: Callable[[str, int], str]) -> None:
        print(header)
        for index, new in enumerate(conditions["new_tokens_per_turn"]):
            mark = "*" if index + 1 == tool_turn else " "
            cells = "".join(f"{cell(name, index):>{width}}" for name in names)
            print(f"{index + 1:>4}{mark} {new:>4}{cells}")

    print("\nTTFT ms (to the first spoken text)")
    rows(lambda name, index: _cell(ttft[name]["per_turn"][index]))
    for key in ("turn1", "followup_mean"):
        cells = "".join(f"{_cell(ttft[name][key]):>{width}}" for name in names)
        print(f"{key:>14}{cells}")
    print("* tool turn (two runs), left out of followup_mean")

    print(
        "\nPrefilled tokens (perf.prefill_tokens; new = tokens of the templated turn)"
    )
    rows(
        lambda name, index: (
            f"{prefill[name][index]}"
            + ("!" if name == "ours" and index > 0 and not reused[index] else "")
        )
    )
    totals = "".join(f"{sum(prefill[name]):>{width}}" for name in names)
    print(f"{'total':>5} {sum(conditions['new_tokens_per_turn']):>4}{totals}")
    if any(not flag for flag in reused[1:]):
        print(
            "! ours did not continue the KV: reset to the system cache, history folded"
        )

    breakdown = conditions["overhead_breakdown_ms_per_request"]
    print(
        f"\nprefill_ratio (ours) {data['prefill_ratio']} (new = user turns + the "
        f"{conditions['tool_result_turn_tokens']}-token tool result; "
        f"{conditions['prefill_ratio_user_turns_only']} over user turns alone)"
    )
    print(
        f"overhead {data['overhead_ms_per_request']} ms/request "
        f"(HA async_provide_llm_data {breakdown['ha_async_provide_llm_data']} ms, "
        f"our tools_json {breakdown['ours_tools_json']} ms, rest {breakdown['rest']} ms), "
        f"{data['overhead_us_per_token']} µs/token"
    )

    for case, label in (("without_cache", "without"), ("with_cache", "with")):
        if (start := data["startup"].get(case)) is not None:
            how = "loaded" if start["cache_loaded"] else "built"
            print(
                f"HA start to agent ready {label} a system cache: "
                f"{start['ha_start_to_ready_ms']} ms (entry setup "
                f"{start['entry_setup_ms']} ms, cache {how}, "
                f"{start['cache_bytes']} bytes)"
            )

    worker = data["worker_overhead"]
    if worker is not None:
        print("\nWorker process against the in-process binding (zero delays, medians)")
        print(f"{'':>22}{'in_process':>12}{'worker':>12}{'added':>12}")
        for label, key, added_key in (
            ("µs per streamed token", "us_per_token", "us_per_token"),
            ("ms per request (run)", "short_run_ms", "ms_per_request"),
            ("ms clear_kv_cache", "clear_kv_cache_ms", "clear_kv_cache_ms"),
        ):
            cells = (
                "".join(f"{_cell(worker[name][key], 3):>12}" for name in HANDLES)
                + f"{_cell(worker['added'][added_key], 3):>12}"
            )
            print(f"{label:>22}{cells}")

    followup = ttft.get("ours", {}).get("followup_mean")
    print("\nTargets (reported, not asserted)")
    print(f"  cached TTFT ≤ 60 ms (ours, follow-up mean): {_verdict(followup, 60)}")
    print(f"  prefill_ratio ≤ 1.05: {_verdict(data['prefill_ratio'], 1.05)}")
    print(f"  overhead ≤ 2 ms/request: {_verdict(data['overhead_ms_per_request'], 2)}")
    print(f"  overhead ≤ 100 µs/token: {_verdict(data['overhead_us_per_token'], 100)}")
    if worker is not None:
        for key, unit in (
            ("us_per_token", "µs/token"),
            ("ms_per_request", "ms/request"),
        ):
            limit = worker["targets"][key]
            print(
                f"  worker adds ≤ {limit:g} {unit}: "
                f"{_verdict(worker['added'][key], limit)}"
            )


def write_plot(data: dict[str, Any], path: Path) -> None:
    """Write a PNG: TTFT and prefilled tokens per turn, per strategy."""
    # Imported here: only --plot needs matplotlib.
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    conditions = data["conditions"]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(9, 8), sharex=True)
    turns = list(range(1, conditions["turns"] + 1))
    for name in STRATEGIES:
        if name not in data["ttft_ms"]:
            continue
        values = [
            float("nan") if v is None else v for v in data["ttft_ms"][name]["per_turn"]
        ]
        top.plot(turns, values, marker="o", label=name)
        bottom.plot(turns, data["prefill_tokens"][name], marker="o", label=name)
    if conditions["tool_turn"]:
        for axis in (top, bottom):
            axis.axvline(
                conditions["tool_turn"], color="grey", linestyle=":", linewidth=1
            )
    top.axhline(60, color="red", linestyle="--", linewidth=1, label="target 60 ms")
    top.set_yscale("log")
    top.set_ylabel("TTFT (ms, log scale)")
    top.set_title(
        f"TTFT per turn, simulated RK3588 Qwen3-0.6B "
        f"({conditions['prefill_ms_per_token']} / {conditions['decode_ms_per_token']} "
        f"ms per token); dotted: tool turn"
    )
    top.legend()
    top.grid(visible=True, which="both", alpha=0.3)
    bottom.set_yscale("log")
    bottom.set_ylabel("prefilled tokens (log scale)")
    bottom.set_xlabel("turn")
    bottom.set_xticks(turns)
    bottom.grid(visible=True, alpha=0.3)
    bottom.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# Command line


def parse_args(argv: Sequence[str] | None) -> Settings:
    """Read the command line."""
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description=(
            "TTFT and prefilled tokens of a voice dialogue through Home Assistant, on "
            "the RKLLM simulator calibrated to RK3588 Qwen3-0.6B, for three history "
            "strategies; plus the integration's overhead per request and per token, "
            "and what the worker process adds to the in-process binding."
        ),
    )
    parser.add_argument(
        "--turns",
        type=int,
        default=10,
        help=f"dialogue turns (1-{MAX_TURNS}, default 10)",
    )
    parser.add_argument(
        "--tool-turn",
        type=int,
        default=3,
        help="turn with the tool call (0: none, default 3)",
    )
    parser.add_argument(
        "--prefill-ms",
        type=float,
        default=RK3588_PREFILL_MS,
        help="simulated ms per prefilled token (default 1.56)",
    )
    parser.add_argument(
        "--decode-ms",
        type=float,
        default=RK3588_DECODE_MS,
        help="simulated ms per decoded token (default 30.4)",
    )
    parser.add_argument(
        "--cache-bytes-per-token",
        type=int,
        default=QWEN3_06B_KV_BYTES_PER_TOKEN,
        help="bytes of prompt-cache file per token (default 114688, Qwen3-0.6B)",
    )
    parser.add_argument(
        "--overhead-requests",
        type=int,
        default=50,
        help="zero-delay requests per reply length (default 50)",
    )
    parser.add_argument(
        "--overhead-reply-tokens",
        type=int,
        default=200,
        help="tokens of the long reply (default 200)",
    )
    parser.add_argument(
        "--worker-repetitions",
        type=int,
        default=30,
        help="repetitions of the worker against in-process comparison (default 30)",
    )
    parser.add_argument(
        "--worker-reply-tokens",
        type=int,
        default=400,
        help="tokens of the long reply of that comparison (default 400)",
    )
    parser.add_argument(
        "--abi",
        choices=sorted(SIM_LIBRARIES),
        default="1.3",
        help="simulated runtime ABI family",
    )
    parser.add_argument(
        "--json", type=Path, dest="json_path", help="write the results as JSON"
    )
    parser.add_argument(
        "--plot", type=Path, dest="plot_path", help="write a PNG chart (matplotlib)"
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log progress and HA warnings"
    )
    parser.add_argument(
        "--startup-only",
        type=Path,
        dest="startup_cache",
        metavar="CACHE_DIR",
        help=(
            "only start Home Assistant once with this cache folder (kept) and print "
            "the start-up measurement as JSON: run it twice to see a restart"
        ),
    )
    args = parser.parse_args(argv)
    if not 1 <= args.turns <= MAX_TURNS:
        parser.error(f"--turns must be between 1 and {MAX_TURNS}")
    if not 0 <= args.tool_turn <= MAX_TURNS:
        parser.error(f"--tool-turn must be between 0 and {MAX_TURNS}")
    if args.prefill_ms < 0 or args.decode_ms < 0:
        parser.error("delays must be >= 0")
    for path in (args.json_path, args.plot_path):
        if path is not None and not path.resolve().parent.is_dir():
            parser.error(f"no such directory: {path.resolve().parent}")
    if args.overhead_requests < 1 or args.overhead_reply_tokens < 10:
        parser.error("--overhead-requests must be >= 1, --overhead-reply-tokens >= 10")
    if args.worker_repetitions < 1 or args.worker_reply_tokens < 10:
        parser.error("--worker-repetitions must be >= 1, --worker-reply-tokens >= 10")
    return Settings(
        turns=args.turns,
        tool_turn=args.tool_turn,
        prefill_ms=args.prefill_ms,
        decode_ms=args.decode_ms,
        cache_bytes_per_token=args.cache_bytes_per_token,
        overhead_requests=args.overhead_requests,
        overhead_reply_tokens=args.overhead_reply_tokens,
        worker_repetitions=args.worker_repetitions,
        worker_reply_tokens=args.worker_reply_tokens,
        abi=args.abi,
        json_path=args.json_path,
        plot_path=args.plot_path,
        verbose=args.verbose,
        startup_cache=args.startup_cache,
    )


@contextlib.contextmanager
def _work_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="rockchip-llm-bench-") as path:
        yield Path(path)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark."""
    settings = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if settings.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not settings.verbose:
        # "We found a custom integration ... not tested by Home Assistant".
        logging.getLogger("homeassistant.loader").setLevel(logging.ERROR)
        # ai_task imports camera, which complains that libturbojpeg is missing.
        logging.getLogger("homeassistant.components.camera").setLevel(logging.CRITICAL)
        logging.getLogger("aiohttp_fast_zlib").setLevel(logging.ERROR)
    subprocess.run(["make", "-s", "-C", str(SIM_DIR)], check=True)
    with (
        _work_dir() as work_dir,
        asyncio.Runner(loop_factory=_new_hass_event_loop) as loop_runner,
    ):
        if settings.startup_cache is not None:
            start = loop_runner.run(async_one_startup(settings, work_dir))
            print(json.dumps(start))
            return 0
        report = loop_runner.run(async_benchmark(settings, work_dir))
    data = to_json(report)
    print_report(data)
    if settings.json_path is not None:
        settings.json_path.write_text(
            json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        print(f"\nJSON written to {settings.json_path}")
    if settings.plot_path is not None:
        write_plot(data, settings.plot_path)
        print(f"Chart written to {settings.plot_path}")
    return 0


def _free_port() -> int:
    """Return a TCP port on the loopback interface that is free now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _new_hass_event_loop() -> asyncio.AbstractEventLoop:
    """Create an event loop configured as Home Assistant's own."""
    if hasattr(runner, "create_event_loop"):  # HA 2026.9 and newer
        return runner.create_event_loop()
    return runner.HassEventLoopPolicy(debug=False).new_event_loop()  # type: ignore[attr-defined,no-any-return]


if __name__ == "__main__":
    sys.exit(main())
