"""The harness: a test Home Assistant with the simulated home, entries, timed conversations.

The last section is the only code of the bench that reads the integration's
internals; everything else goes through Home Assistant or the rkllm binding.
"""

import asyncio
from collections.abc import AsyncIterator, Callable
import contextlib
import ctypes
from dataclasses import dataclass
import json
import os
from pathlib import Path
import socket
import time
from typing import Any

from pytest_homeassistant_custom_component.common import (  # type: ignore[import-untyped]
    MockConfigEntry,
    async_mock_service,
    async_test_home_assistant,
)

from custom_components.rockchip_llm.agent import Agent
from custom_components.rockchip_llm.const import (
    CONF_HISTORY_STRATEGY,
    CONF_PROMPT,
    DEFAULT_PROMPT_FILE,
    DOMAIN,
    HistoryStrategy,
)
from custom_components.rockchip_llm.generation import Generation
from custom_components.rockchip_llm.host.prompt_cache import CacheMetadata
from custom_components.rockchip_llm.host.rkllm.library import RuntimeLibrary
from custom_components.rockchip_llm.host.rkllm.runtime import (
    RKLLMModel,
    RunRequest,
    RunResult,
)
from custom_components.rockchip_llm.run_planner import SystemPrefix
from custom_components.rockchip_llm.turn import RunStats
from homeassistant import loader, runner
from homeassistant.components import conversation
from homeassistant.components.homeassistant.exposed_entities import async_expose_entity
from homeassistant.config_entries import ConfigEntryState
from homeassistant.core import Context, HomeAssistant
from homeassistant.helpers import (
    area_registry as ar,
    chat_session,
    entity_registry as er,
    frame,
)
from homeassistant.setup import async_setup_component
from tests.entry_factory import runtime_entry

from .results import TurnResult
from .scenario import HOME


@dataclass(frozen=True, slots=True)
class BenchAgent:
    """A runtime entry with one conversation agent, and that agent's entity id."""

    entry: MockConfigEntry
    entity_id: str


def new_hass_event_loop() -> asyncio.AbstractEventLoop:
    """Create an event loop configured as Home Assistant's own."""
    if hasattr(runner, "create_event_loop"):  # HA 2026.9 and newer
        return runner.create_event_loop()
    return runner.HassEventLoopPolicy(debug=False).new_event_loop()  # type: ignore[attr-defined,no-any-return]


def _free_port() -> int:
    """Return a TCP port on the loopback interface that is free now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


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


async def async_setup_assist(hass: HomeAssistant) -> None:
    """Set up what Assist needs: conversation (on a free loopback port), intents."""
    assert await async_setup_component(hass, "homeassistant", {})
    # conversation needs http, which would serve on 8123 (a dev instance's port).
    assert await async_setup_component(
        hass,
        "http",
        {"http": {"server_host": "127.0.0.1", "server_port": _free_port()}},
    )
    assert await async_setup_component(hass, "conversation", {})
    assert await async_setup_component(hass, "intent", {})


async def async_setup_home(hass: HomeAssistant) -> list[Any]:
    """Create areas and 30 exposed entities, load Assist intents, mock light.turn_on."""
    await async_setup_assist(hass)
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
) -> BenchAgent:
    """Set up one runtime entry with one agent on the default prompt.

    Each strategy gets an entry (and so an engine and a model handle) of its own,
    so no run of one strategy leaves KV state behind for another.
    """
    prompt = DEFAULT_PROMPT_FILE.read_text(encoding="utf-8")
    entry = runtime_entry(
        library=library,
        models_dir=models_dir,
        cache_dir=cache_dir,
        model=model,
        agents=({CONF_PROMPT: prompt, CONF_HISTORY_STRATEGY: strategy.value},),
        title=title,
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
    return BenchAgent(entry, entity_id)


async def async_converse_timed(
    hass: HomeAssistant, agent: BenchAgent, text: str, conversation_id: str | None
) -> tuple[str, TurnResult]:
    """Ask once; time the first content delta that reaches the chat log.

    The wall time ends with the answer; the call returns once the loop also ran
    what the answer left scheduled.

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

    runs_so_far = runs_from_now(agent.entry)
    with (
        chat_session.async_get_chat_session(hass, conversation_id) as session,
        conversation.async_get_chat_log(
            hass, session, chat_log_delta_listener=listener
        ),
    ):
        started = time.perf_counter()
        result = await conversation.async_converse(
            hass, text, session.conversation_id, Context(), agent_id=agent.entity_id
        )
        ended = time.perf_counter()
    # What the loop runs right after the answer (the device page's state writes)
    # is the request's work too: it runs here, inside the caller's CPU time,
    # never inside the next agent's request.
    await asyncio.sleep(0)
    runs = runs_so_far()
    speech: str = result.response.speech.get("plain", {}).get("speech", "")
    return result.conversation_id or session.conversation_id, TurnResult(
        ttft_ms=(first_content[0] - started) * 1000 if first_content else None,
        wall_ms=(ended - started) * 1000,
        prefill_tokens=runs.prefill_tokens,
        prefill_ms=runs.prefill_ms,
        generate_tokens=runs.generate_tokens,
        generate_ms=runs.generate_ms,
        runs=runs.runs,
        reply=speech,
        history_reused=runs.reused_history,
        tool_results=tool_results,
    )


class SimCounter:
    """rkllm_sim_count_tokens of the simulator library, loaded by the bench itself."""

    def __init__(self, library: RuntimeLibrary) -> None:
        """Bind the export."""
        function: Any = library.cdll.rkllm_sim_count_tokens
        function.argtypes = [ctypes.c_char_p]
        function.restype = ctypes.c_int
        self._count: Callable[[bytes], int] = function

    def __call__(self, text: str) -> int:
        """Return the simulator's token count of text."""
        return int(self._count(text.encode()))


# What the bench reads of the integration: the entry's runtime_data, the agent's
# system prompt cache, its model's session (recent runs, loaded cache), and the
# integration's own streaming loop (generation.Generation) on a bare handle.


@dataclass(frozen=True, slots=True)
class RunTotals:
    """The runtime's figures for the runs of one request, added up."""

    runs: int
    prefill_tokens: int
    prefill_ms: float
    generate_tokens: int
    generate_ms: float
    reused_history: bool
    """Every run continued the KV (RunStats.reused_history)."""


def _only_agent(entry: MockConfigEntry) -> Agent:
    agent: Agent = next(iter(entry.runtime_data.agents.values()))
    return agent


def agent_prefix(entry: MockConfigEntry) -> SystemPrefix:
    """Return the system prompt and tools of the entry's agent (its cached prefix)."""
    system_cache = _only_agent(entry).system_cache
    assert system_cache is not None
    assert system_cache.prefix is not None
    return system_cache.prefix


def system_cache(entry: MockConfigEntry) -> CacheMetadata | None:
    """Return the metadata of the system cache the entry's model has loaded."""
    cache = _only_agent(entry).session.loaded_cache
    return cache.metadata if cache else None


@dataclass(frozen=True, slots=True)
class ProcessUse:
    """What a process used so far, its live threads added up."""

    cpu_ms: float
    """Time on a CPU (the scheduler's count, in nanoseconds, not 10 ms ticks)."""
    wakeups: int
    """Voluntary context switches: each time a thread waited and was woken again."""


def process_use(pid: int) -> ProcessUse:
    """Return the CPU time and wake-ups of a process of this machine so far."""
    cpu_ns = wakeups = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            cpu_ns += int((task / "schedstat").read_text().split()[0])
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    wakeups += int(line.split()[1])
    return ProcessUse(cpu_ns / 1e6, wakeups)


def agent_processes(entry: MockConfigEntry) -> dict[str, int]:
    """Return the pids of a request's processes: HA, the entry's host, its worker."""
    worker = _only_agent(entry).session.worker.pid
    host = entry.runtime_data.engine.host.link.pid
    assert worker is not None and host is not None
    return {"ha": os.getpid(), "host": host, "worker": worker}


def runs_from_now(entry: MockConfigEntry) -> Callable[[], RunTotals]:
    """Return a function that adds up the runs of the entry's model after this call."""
    session = _only_agent(entry).session
    last = session.recent[-1] if session.recent else None

    def since() -> RunTotals:
        runs: list[RunStats] = []
        for stats in reversed(session.recent):
            if stats is last:
                break
            runs.append(stats)
        return RunTotals(
            runs=len(runs),
            prefill_tokens=sum(run.prefill_tokens for run in runs),
            prefill_ms=sum(run.prefill_ms for run in runs),
            generate_tokens=sum(run.generate_tokens for run in runs),
            generate_ms=sum(run.generate_ms for run in runs),
            reused_history=bool(runs) and all(run.reused_history for run in runs),
        )

    return since


async def async_stream(
    model: RKLLMModel, request: RunRequest
) -> tuple[str, float | None, RunResult]:
    """Run once; return the text, the arrival time of its first text and the result."""
    generation = Generation(model, request)
    first: float | None = None
    pieces: list[str] = []
    async for text in generation:
        if first is None:
            first = time.perf_counter()
        pieces.append(text)
    assert generation.result is not None
    return "".join(pieces), first, generation.result
