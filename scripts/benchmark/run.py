"""The run: the home, one entry per strategy, and every phase in order."""

import json
import logging
import os
from pathlib import Path
from typing import Any

from pytest_homeassistant_custom_component.common import mock_storage  # type: ignore[import-untyped]

from custom_components.rockchip_llm.const import HistoryStrategy
from custom_components.rockchip_llm.host.rkllm.library import load_library
from custom_components.rockchip_llm.host.rkllm.probe import verify_and_copy_library

from .harness import (
    SimCounter,
    agent_prefix,
    async_add_entry,
    async_setup_home,
    home_assistant,
)
from .host_hop import async_measure_host_links
from .reference import async_add_reference
from .results import Report
from .scenario import (
    MODEL_NAME,
    SIM_LIBRARIES,
    WORKER_MODEL_NAME,
    ZERO_MODEL_NAME,
    Settings,
    system_block,
    tool_turn_text,
    user_turn_text,
    write_model,
    zero_model_file,
    zero_model_replies,
)
from .strategies import (
    async_cache_per_conversation,
    async_ha_dialogue,
    async_interleaved,
    async_overhead,
    async_startup,
    handle_params,
    measure_handles,
)

_LOGGER = logging.getLogger(__name__)


async def async_benchmark(settings: Settings, work_dir: Path) -> Report:
    """Set up Home Assistant and run every strategy, then the overhead phase."""
    library_path = SIM_LIBRARIES[settings.abi]
    dialogue = settings.dialogue()
    report = Report(settings=settings, dialogue=dialogue)
    models_dir = work_dir / "models"
    model_path = write_model(models_dir, MODEL_NAME, settings.model_file())
    report.load_average["start"] = os.getloadavg()
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
            ours = await async_add_entry(
                hass,
                library=library_path,
                models_dir=models_dir,
                cache_dir=work_dir / "cache_ours",
                model=MODEL_NAME,
                strategy=HistoryStrategy.AUTO,
                title="Bench ours",
            )
            full = await async_add_entry(
                hass,
                library=library_path,
                models_dir=models_dir,
                cache_dir=work_dir / "cache_full_prompt",
                model=MODEL_NAME,
                strategy=HistoryStrategy.OFF,
                title="Bench full prompt",
            )
            zero = await async_add_entry(
                hass,
                library=library_path,
                models_dir=zero_models_dir,
                cache_dir=work_dir / "cache_zero",
                model=ZERO_MODEL_NAME,
                strategy=HistoryStrategy.AUTO,
                title="Bench overhead",
            )
            # Home Assistant never loads the runtime; the bench loads the simulator
            # itself, to count tokens and for the in-process handles.
            library = await hass.async_add_executor_job(load_library, library_path)
            count = SimCounter(library)
            prefix = agent_prefix(ours.entry)
            report.system_prompt_tokens = count(system_block(prefix))
            report.tools = len(json.loads(prefix.tools_json))
            report.new_tokens = [count(user_turn_text(t.question)) for t in dialogue]
            report.user_text_tokens = [count(t.question) for t in dialogue]

            _LOGGER.info("Strategy ours (history_strategy auto)")
            report.turns["ours"] = await async_ha_dialogue(hass, ours, dialogue)
            sent = [text for turn in report.turns["ours"] for text in turn.tool_results]
            tool_result = sent[0] if sent else json.dumps({"error": "no tool result"})
            if sent:
                report.tool_result_tokens = count(tool_turn_text(tool_result))

            _LOGGER.info("Interleaved conversations (ours)")
            report.interleaved = await async_interleaved(hass, ours, dialogue)

            _LOGGER.info("Strategy full_prompt (history_strategy off)")
            report.turns["full_prompt"] = await async_ha_dialogue(hass, full, dialogue)

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
                "Overhead: %d rounds of %d requests per reply length",
                settings.overhead_rounds,
                settings.overhead_requests,
            )
            reference = await async_add_reference(
                hass,
                next(iter(zero.entry.subentries.values())).data,
                zero_model_replies(settings.overhead_reply_tokens),
            )
            report.overhead, report.reference, prompts = await async_overhead(
                hass,
                zero,
                reference,
                settings.overhead_requests,
                settings.overhead_rounds,
            )
            report.ha_prompt_ms, report.ha_prompt_cpu_ms, report.prefix_ms = (
                prompts.medians()
            )
            report.ha_prompt_ms_by_round = prompts.ha_wall_by_round()
            report.tool_calls_executed = len(light_calls)

            _LOGGER.info(
                "Worker cost: %d repetitions per handle", settings.worker_repetitions
            )
            report.handles = await hass.async_add_executor_job(
                measure_handles,
                library,
                await hass.async_add_executor_job(
                    verify_and_copy_library, library_path, work_dir / "private"
                ),
                worker_model_path,
                settings.worker_repetitions,
            )
            _LOGGER.info("Host links: %d repetitions each", settings.worker_repetitions)
            (
                report.host_links,
                report.host_hello_ms,
                report.host_handshake_ms,
            ) = await async_measure_host_links(
                library_path,
                worker_model_path.parent.parent,
                WORKER_MODEL_NAME,
                handle_params(worker_model_path),
                work_dir=work_dir,
                repetitions=settings.worker_repetitions,
            )
    startup_cache = work_dir / "cache_startup"
    for case in ("without_cache", "with_cache"):
        _LOGGER.info("Home Assistant start to a ready agent, %s", case)
        report.startup[case] = await async_startup(
            library_path, models_dir, startup_cache, work_dir / f"config_{case}"
        )
    report.load_average["end"] = os.getloadavg()
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
        write_model(models_dir, MODEL_NAME, settings.model_file())
    return await async_startup(
        SIM_LIBRARIES[settings.abi], models_dir, cache_dir, work_dir / "config"
    )
