"""The measured phases: the three history strategies, the overhead, the worker, start-up."""

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
import statistics
import time
from typing import Any

from pytest_homeassistant_custom_component.common import mock_storage  # type: ignore[import-untyped]

from custom_components.rockchip_llm.agent_prefix import (
    prefix_from_chat_log,
    request_chat_log,
)
from custom_components.rockchip_llm.const import (
    AGENT_OPTION_DEFAULTS,
    CONF_MAX_NEW_TOKENS,
    CONF_PROMPT,
    HistoryStrategy,
)
from custom_components.rockchip_llm.host.rkllm.library import (
    RuntimeLibrary,
    VerifiedLibrary,
)
from custom_components.rockchip_llm.host.rkllm.runtime import (
    ModelParams,
    RKLLMModel,
    RunRequest,
    RunResult,
)
from custom_components.rockchip_llm.host.rkllm.worker import WorkerModel
from custom_components.rockchip_llm.run_planner import SystemPrefix
from homeassistant.const import CONF_LLM_HASS_API
from homeassistant.core import HomeAssistant

from .harness import (
    BenchAgent,
    agent_processes,
    async_add_entry,
    async_converse_timed,
    async_setup_home,
    async_stream,
    home_assistant,
    process_use,
    system_cache,
)
from .reference import ReferenceAgent
from .results import HandleTimes, OverheadSample, TurnResult
from .scenario import (
    ASSISTANT_START,
    HANDLES,
    MODEL_CONTEXT_LIMIT,
    MODEL_NAME,
    NO_THINK,
    TURN_END,
    USER_START,
    Turn,
    system_block,
)

# ours and full_prompt, through Home Assistant


async def async_ha_dialogue(
    hass: HomeAssistant, agent: BenchAgent, dialogue: list[Turn]
) -> list[TurnResult]:
    """Run the dialogue through conversation.async_converse, in one conversation."""
    results: list[TurnResult] = []
    conversation_id: str | None = None
    for turn in dialogue:
        conversation_id, result = await async_converse_timed(
            hass, agent, turn.question, conversation_id
        )
        results.append(result)
    return results


async def async_interleaved(
    hass: HomeAssistant, agent: BenchAgent, dialogue: list[Turn]
) -> dict[str, TurnResult]:
    """Two conversations on one model: a follow-up that switched back, one that kept the KV.

    Conversation A asks the dialogue's first three questions, then B asks one, so
    A's next follow-up finds B in the KV ("switched_back": its turns are sent
    again); A's follow-up after that continues the KV ("kept").
    """

    def question(index: int) -> str:
        return dialogue[index % len(dialogue)].question

    first: str | None = None
    for index in range(3):
        first, _result = await async_converse_timed(hass, agent, question(index), first)
    await async_converse_timed(hass, agent, question(0), None)
    _id, switched_back = await async_converse_timed(hass, agent, question(3), first)
    _id, kept = await async_converse_timed(hass, agent, question(4), first)
    return {"switched_back": switched_back, "kept": kept}


# cache_per_conversation, on the binding


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
        max_context_len=MODEL_CONTEXT_LIMIT,
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


@dataclass(slots=True)
class PromptCosts:
    """Timings (ms) of what every request renders, one per round of the overhead phase."""

    ha_wall: list[float] = field(default_factory=list)
    """chat_log.async_provide_llm_data (Home Assistant: the prompt and the tools)."""
    ha_cpu: list[float] = field(default_factory=list)
    ours: list[float] = field(default_factory=list)
    """agent_prefix.prefix_from_chat_log (the integration: the compact prefix)."""
    rounds: list[int] = field(default_factory=list)
    """The round of the overhead phase of each timing."""

    def ha_wall_by_round(self) -> list[float]:
        """Return the median of HA's wall time in each round, in order."""
        return [
            statistics.median(
                wall
                for wall, number in zip(self.ha_wall, self.rounds, strict=True)
                if number == round_number
            )
            for round_number in sorted(set(self.rounds))
        ]

    def medians(self) -> tuple[float, float, float]:
        """Return the medians: HA's wall and CPU time, ours."""
        return (
            statistics.median(self.ha_wall),
            statistics.median(self.ha_cpu),
            statistics.median(self.ours),
        )


async def async_overhead(
    hass: HomeAssistant,
    agent: BenchAgent,
    reference: ReferenceAgent,
    requests: int,
    rounds: int,
) -> tuple[list[OverheadSample], list[OverheadSample], PromptCosts]:
    """Zero-delay requests to ours and to the reference agent, and HA's rendering, taking turns.

    Each alternates a 2-token and a long reply, in new conversations; ours, the
    reference and a rendering of the prompt take turns request by request, so load
    from elsewhere and a machine that speeds up or slows down hit all three alike.
    The samples of each of the rounds are marked with its number.
    """
    ours: list[OverheadSample] = []
    theirs: list[OverheadSample] = []
    prompts = PromptCosts()
    options = next(iter(agent.entry.subentries.values())).data
    # The reference runs no model: the runtime's figures of its requests are none.
    bare = BenchAgent(agent.entry, reference.entity_id)
    processes = agent_processes(agent.entry)
    for number in range(rounds):
        # A warm-up before the first round only.
        for index in range(-4 if number == 0 else 0, 2 * requests):
            text = "long request" if index % 2 else "short request"
            for into, asked in ((ours, agent), (theirs, bare)):
                before = {name: process_use(pid) for name, pid in processes.items()}
                cpu = time.process_time()
                _conversation_id, result = await async_converse_timed(
                    hass, asked, text, None
                )
                cpu = time.process_time() - cpu
                after = {name: process_use(pid) for name, pid in processes.items()}
                if index < 0:
                    continue
                into.append(
                    OverheadSample(
                        wall_ms=result.wall_ms,
                        ttft_ms=result.ttft_ms,
                        prefill_ms=result.prefill_ms,
                        generate_ms=result.generate_ms,
                        generate_tokens=result.generate_tokens
                        if asked is agent
                        else len(reference.replies[text]),
                        cpu_ms=cpu * 1000,
                        host_cpu_ms=after["host"].cpu_ms - before["host"].cpu_ms,
                        worker_cpu_ms=after["worker"].cpu_ms - before["worker"].cpu_ms,
                        wakeups={
                            name: after[name].wakeups - before[name].wakeups
                            for name in processes
                        },
                        round=number,
                    )
                )
            if index >= 0:
                await _async_time_prompt(hass, options, prompts)
                prompts.rounds.append(number)
    return ours, theirs, prompts


async def _async_time_prompt(
    hass: HomeAssistant, options: Mapping[str, Any], into: PromptCosts
) -> None:
    """Time HA rendering the agent's prompt and tools once, and our compact prefix.

    Both happen on every request: chat_log.async_provide_llm_data (Home Assistant:
    the Assist API prompt with the exposed entities, the tool objects) and
    agent_prefix.prefix_from_chat_log (the integration: the compact prefix).
    """
    with request_chat_log(hass) as (llm_context, chat_log):
        started, cpu = time.perf_counter(), time.process_time()
        await chat_log.async_provide_llm_data(
            llm_context,
            options.get(CONF_LLM_HASS_API),
            options.get(CONF_PROMPT),
            None,
        )
        rendered, rendered_cpu = time.perf_counter(), time.process_time()
        prefix_from_chat_log(chat_log)
        into.ha_wall.append((rendered - started) * 1000)
        into.ha_cpu.append((rendered_cpu - cpu) * 1000)
        into.ours.append((time.perf_counter() - rendered) * 1000)


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


def handle_params(model_path: Path) -> ModelParams:
    """Return the init parameters of the handles whose calls are timed."""
    return ModelParams(
        model_path=model_path,
        max_context_len=MODEL_CONTEXT_LIMIT,
        max_new_tokens=MODEL_CONTEXT_LIMIT // 2,
    )


def measure_handles(
    library: RuntimeLibrary,
    verified: VerifiedLibrary,
    model_path: Path,
    repetitions: int,
) -> dict[str, HandleTimes]:
    """Time the same calls on an RKLLMModel and a WorkerModel of one zero-delay model.

    library is the simulator loaded in this process, verified what the workers load.

    Blocking: run it off the event loop. Both handles are loaded at once and the
    repetitions alternate between them, so load from elsewhere hits both alike;
    the first three repetitions are warm-up. Text is collected by a sink that only
    appends, the cheapest consumer, so the difference is the worker's own cost.
    """
    params = handle_params(model_path)
    models: dict[str, RKLLMModel | WorkerModel] = {
        "in_process": RKLLMModel(library, "bench_in_process"),
        "worker": WorkerModel(verified, "bench_worker"),
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


# Start-up


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
            agent = await async_add_entry(
                hass,
                library=library_path,
                models_dir=models_dir,
                cache_dir=cache_dir,
                model=MODEL_NAME,
                strategy=HistoryStrategy.AUTO,
                title="Bench startup",
            )
            ready = time.perf_counter()
            metadata = system_cache(agent.entry)
            return {
                "ha_start_to_ready_ms": round((ready - started) * 1000, 1),
                "entry_setup_ms": round((ready - entry_started) * 1000, 1),
                "cache_created_at": metadata.created_at if metadata else None,
                "cache_bytes": metadata.size_bytes if metadata else None,
                "cache_tokens": metadata.tokens if metadata else None,
            }
