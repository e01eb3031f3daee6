"""The cache actions, called as an automation would."""

import asyncio
from datetime import timedelta
import json
import os
from pathlib import Path
import signal
from typing import Any
from unittest.mock import patch

import pytest
from pytest_homeassistant_custom_component.common import (
    MockUser,
    async_fire_time_changed,
)

from custom_components.rockchip_llm import session as session_module
from custom_components.rockchip_llm.const import CONF_PROMPT, DOMAIN
from homeassistant.components import conversation
from homeassistant.config_entries import ConfigEntryState
from homeassistant.core import Context, HomeAssistant
from homeassistant.exceptions import (
    HomeAssistantError,
    ServiceValidationError,
    Unauthorized,
)
from homeassistant.helpers import selector
from homeassistant.helpers.service import async_get_all_descriptions
from homeassistant.util import dt as dt_util

from .conftest import EntryFactory, ModelWriter, sim_counter

AGENT = "conversation.agent_0"


async def call(
    hass: HomeAssistant, service: str, data: dict[str, Any], response: bool = True
) -> Any:
    """Call one of our actions and return its response."""
    return await hass.services.async_call(
        DOMAIN, service, data, blocking=True, return_response=response
    )


async def test_rebuild_cache(
    hass: HomeAssistant, make_entry: EntryFactory, cache_dir: Path
) -> None:
    """rebuild_cache prefills the agent's prompt again and reports the new cache."""
    entry = await make_entry()
    saves = sim_counter(entry, "prompt_cache_save")
    result = await call(hass, "rebuild_cache", {"agent": AGENT})
    assert sim_counter(entry, "prompt_cache_save") == saves + 1
    [cache] = result["caches"]
    metadata = json.loads((cache_dir / "Qwen3 Sim" / "system.json").read_text())
    assert cache["tokens"] == metadata["tokens"] > 0
    assert cache["size_bytes"] == metadata["size_bytes"]
    assert cache["prompt_sha256"] == metadata["prompt_sha256"]
    assert metadata["source"] == "rebuild_cache"
    assert cache["agent"] == AGENT
    assert cache["model"] == "Qwen3 Sim"
    assert cache["name"] == "system"


async def test_rebuild_all_without_response(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """Without agents every agent is rebuilt; the response is optional."""
    entry = await make_entry({}, {"temperature": 0.2})
    saves = sim_counter(entry, "prompt_cache_save")
    assert await call(hass, "rebuild_cache", {}, response=False) is None
    assert sim_counter(entry, "prompt_cache_save") == saves + 2


async def test_agents_on_one_model_rebuild_and_delete_their_own_caches(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """Without a name each agent rebuilds its own system cache; neither can be deleted."""
    entry = await make_entry(
        {CONF_PROMPT: "You are the kitchen assistant."},
        {CONF_PROMPT: "You are the garage assistant."},
    )
    first, second = entry.runtime_data.agents.values()
    assert first.system_cache is not None and second.system_cache is not None
    second_name = f"system_{second.subentry_id.lower()}"
    result = await call(hass, "rebuild_cache", {})
    assert [(c["agent"], c["name"]) for c in result["caches"]] == [
        (AGENT, "system"),
        ("conversation.agent_1", second_name),
    ]
    listed = await call(hass, "list_caches", {})
    assert {c["name"]: c["valid"] for c in listed["caches"]} == {
        "system": True,
        second_name: True,
    }
    with pytest.raises(ServiceValidationError) as err:
        await call(
            hass, "delete_cache", {"model": "Qwen3 Sim", "name": second_name}, False
        )
    assert err.value.translation_key == "cache_reserved_delete"
    assert str(err.value) == (
        f'"{second_name}" is the system prompt cache of the agent Agent 1 (model '
        "Qwen3 Sim), which the agent needs, so it is not deleted; to build it again, "
        "call rockchip_llm.rebuild_cache"
    )
    assert second.system_cache.cache is not None
    assert first.system_cache.cache is not None
    assert hass.states.get("sensor.agent_1_prompt_cache").state == "ready"


async def test_list_create_delete(
    hass: HomeAssistant,
    make_entry: EntryFactory,
    cache_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Named caches are created, listed with validity, used by prefix, and deleted."""
    entry = await make_entry()
    agent = next(iter(entry.runtime_data.agents.values()))
    assert agent.system_cache.prefix is not None
    head = agent.system_cache.prefix.prompt[:80]
    created = await call(
        hass, "create_cache", {"model": "Qwen3 Sim", "name": "head", "prompt": head}
    )
    assert created["cache"]["name"] == "head"
    assert (cache_dir / "Qwen3 Sim" / "head.bin").exists()

    listed = await call(hass, "list_caches", {})
    by_name = {cache["name"]: cache for cache in listed["caches"]}
    assert set(by_name) == {"system", "head"}
    assert by_name["system"]["valid"] is True
    assert by_name["system"]["problem"] is None
    assert by_name["head"]["valid"] is False  # another prompt than the agent's
    assert by_name["head"]["problem"] == "prompt_changed"

    # The exact system cache is longer than "head", so requests use "system".
    await conversation.async_converse(hass, "hello", None, Context(), agent_id=AGENT)
    assert agent.session.loaded_cache is not None
    assert agent.session.loaded_cache.name == "system"

    with pytest.raises(ServiceValidationError) as err:
        await call(
            hass, "delete_cache", {"model": "Qwen3 Sim", "name": "system"}, False
        )
    assert err.value.translation_key == "cache_reserved_delete"
    # Removed by hand and the worker restarted: the next request uses the longest
    # cache the prompt starts with, "head".
    for suffix in (".bin", ".json"):
        await hass.async_add_executor_job(
            (cache_dir / "Qwen3 Sim" / f"system{suffix}").unlink
        )
    monkeypatch.setattr(session_module, "RESTART_BACKOFF_S", (0.0, 0.0, 0.0, 0.0))
    pid = agent.session.worker.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    while agent.session.worker.death is None:
        await asyncio.sleep(0.01)
    await conversation.async_converse(
        hass, "hello again", None, Context(), agent_id=AGENT
    )
    assert agent.session.loaded_cache is not None
    assert agent.session.loaded_cache.name == "head"
    # The next setup rebuilds the system cache.
    assert await hass.config_entries.async_reload(entry.entry_id)
    assert (cache_dir / "Qwen3 Sim" / "system.json").exists()


@pytest.mark.parametrize("name", ["", "../etc", "Système", "UPPER", "a" * 65, "a/b"])
async def test_bad_cache_names(
    hass: HomeAssistant, make_entry: EntryFactory, name: str
) -> None:
    """Bad names are refused before anything is touched."""
    await make_entry()
    for service, data in (
        ("rebuild_cache", {"name": name}),
        ("create_cache", {"model": "Qwen3 Sim", "name": name, "prompt": "x"}),
        ("delete_cache", {"model": "Qwen3 Sim", "name": name}),
    ):
        with pytest.raises(ServiceValidationError) as err:
            await call(hass, service, data, response=service != "delete_cache")
        assert err.value.translation_key == "invalid_cache_name"


async def test_unknown_targets(hass: HomeAssistant, make_entry: EntryFactory) -> None:
    """Unknown agents, models and caches are validation errors."""
    entry = await make_entry()
    cases = [
        ("rebuild_cache", {"agent": "conversation.nope"}, "unknown_agent"),
        (
            "create_cache",
            {"model": "Nope", "name": "x", "prompt": "x"},
            "model_not_loaded",
        ),
        ("delete_cache", {"model": "Qwen3 Sim", "name": "missing"}, "cache_not_found"),
    ]
    for service, data, key in cases:
        with pytest.raises(ServiceValidationError) as err:
            await call(hass, service, data, response=service != "delete_cache")
        assert err.value.translation_key == key
    await hass.config_entries.async_unload(entry.entry_id)
    with pytest.raises(ServiceValidationError) as err:
        await call(hass, "rebuild_cache", {})
    assert err.value.translation_key == "no_agents"


async def test_benchmark(hass: HomeAssistant, make_entry: EntryFactory) -> None:
    """The benchmark compares cold and cached runs with the runtime's counters."""
    entry = await make_entry(model_kwargs={"prefill_ms_per_token": 0.05})
    result = await call(
        hass, "benchmark", {"agent": AGENT, "runs": 2, "question": "Is it late?"}
    )
    cold, cached = result["cold"], result["cached"]
    assert len(cold["runs"]) == len(cached["runs"]) == 2
    system_tokens = result["system_prompt_tokens"]
    assert cold["prefill_tokens"] > system_tokens > cached["prefill_tokens"] > 0
    assert cold["prefill_ms"] > cached["prefill_ms"]
    assert cached["decode_tokens_per_s"] > 0
    assert cold["memory_mb"] > 0
    assert result["runtime_version"] in {"1.2.3", "1.3.0"}
    # The agent still answers from its cache afterwards.
    loaded = next(iter(entry.runtime_data.agents.values())).session
    assert loaded.loaded_cache is not None
    assert loaded.loaded_cache.name == "system"
    await conversation.async_converse(hass, "hello", None, Context(), agent_id=AGENT)
    assert loaded.recent[-1].prefill_tokens < system_tokens


async def test_benchmark_waits_for_voice_requests(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """A benchmark called during a voice request runs after it, in the model's queue."""
    entry = await make_entry(model_kwargs={"decode_ms_per_token": 3})
    loaded = next(iter(entry.runtime_data.agents.values())).session
    voice = hass.async_create_task(
        conversation.async_converse(hass, "hello", None, Context(), agent_id=AGENT)
    )
    while not loaded.busy:
        await asyncio.sleep(0.005)
    result = await call(hass, "benchmark", {"agent": AGENT, "runs": 1})
    assert voice.done()
    assert (await voice).response.speech["plain"][
        "speech"
    ] == "Hello from the simulator."
    assert result["cached"]["runs"]


async def test_rebuild_failure_is_reported(
    in_process_host: None,
    hass: HomeAssistant,
    make_entry: EntryFactory,
    cache_dir: Path,
) -> None:
    """Disk full during a rebuild fails the action clearly; the old cache keeps serving."""
    entry = await make_entry()
    loaded = next(iter(entry.runtime_data.agents.values())).session
    old = (cache_dir / "Qwen3 Sim" / "system.json").read_bytes()
    with (
        patch(
            "custom_components.rockchip_llm.host.prompt_cache._write_synced",
            side_effect=OSError(28, "No space left on device"),
        ),
        pytest.raises(HomeAssistantError) as err,
    ):
        await call(hass, "rebuild_cache", {"agent": AGENT})
    assert err.value.translation_key == "cache_disk_full"
    assert str(err.value).startswith(
        "The prompt cache of model Qwen3 Sim could not be written: the disk holding "
        f"{cache_dir / 'Qwen3 Sim'} is full ("
    )
    assert "context length" not in str(err.value)
    assert (cache_dir / "Qwen3 Sim" / "system.json").read_bytes() == old
    assert loaded.loaded_cache is not None
    assert loaded.loaded_cache.name == "system"
    await conversation.async_converse(hass, "hello", None, Context(), agent_id=AGENT)
    assert loaded.recent[-1].cache == "system"
    assert loaded.recent[-1].prefill_tokens < 25


async def test_cache_files_removed_behind_our_back(
    hass: HomeAssistant, make_entry: EntryFactory, cache_dir: Path
) -> None:
    """A loaded cache whose files vanish: requests go on without it and a rebuild follows."""
    entry = await make_entry()
    agent = next(iter(entry.runtime_data.agents.values()))
    await hass.services.async_call(
        DOMAIN,
        "create_cache",
        {"model": "Qwen3 Sim", "name": "head", "prompt": "x"},
        blocking=True,
    )  # another cache is loaded now: the next request switches back to "system"
    for path in (cache_dir / "Qwen3 Sim").iterdir():
        path.unlink()
    result = await conversation.async_converse(
        hass, "hello", None, Context(), agent_id=AGENT
    )
    assert result.response.speech["plain"]["speech"] == "Hello from the simulator."
    assert agent.session.recent[-1].cache is None
    async_fire_time_changed(hass, dt_util.utcnow() + timedelta(seconds=31))
    await hass.async_block_till_done(wait_background_tasks=True)
    assert (cache_dir / "Qwen3 Sim" / "system.bin").exists()


async def test_writing_actions_are_admin_only(
    hass: HomeAssistant,
    make_entry: EntryFactory,
    cache_dir: Path,
    hass_read_only_user: MockUser,
    hass_admin_user: MockUser,
) -> None:
    """A non-admin user cannot write caches or hold the NPU; listing stays open."""
    entry = await make_entry()
    folder = cache_dir / "Qwen3 Sim"
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    saves = sim_counter(entry, "prompt_cache_save")
    user = Context(user_id=hass_read_only_user.id)
    for service, data, response in (
        ("rebuild_cache", {"agent": AGENT}, True),
        ("create_cache", {"model": "Qwen3 Sim", "name": "x", "prompt": "x"}, True),
        ("delete_cache", {"model": "Qwen3 Sim", "name": "system"}, False),
        ("benchmark", {"agent": AGENT, "runs": 20}, True),
    ):
        with pytest.raises(Unauthorized):
            await hass.services.async_call(
                DOMAIN,
                service,
                data,
                blocking=True,
                context=user,
                return_response=response,
            )
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before
    assert sim_counter(entry, "prompt_cache_save") == saves
    listed = await hass.services.async_call(
        DOMAIN, "list_caches", {}, blocking=True, context=user, return_response=True
    )
    assert [cache["name"] for cache in listed["caches"]] == ["system"]
    # An administrator may.
    await hass.services.async_call(
        DOMAIN,
        "create_cache",
        {"model": "Qwen3 Sim", "name": "x", "prompt": "x"},
        blocking=True,
        context=Context(user_id=hass_admin_user.id),
    )
    assert (folder / "x.bin").exists()


async def test_list_caches_validates(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """list_caches refuses unknown models and entries that are not running."""
    entry = await make_entry(setup=False, model_kwargs={"prefill_ms_per_token": 3})
    setup = hass.async_create_task(hass.config_entries.async_setup(entry.entry_id))
    while entry.state is not ConfigEntryState.SETUP_IN_PROGRESS:
        await asyncio.sleep(0.001)
    for data in ({}, {"model": "Qwen3 Sim"}):
        with pytest.raises(ServiceValidationError) as err:
            await call(hass, "list_caches", data)
        assert err.value.translation_key == "entry_not_loaded"
        assert "setup_in_progress" in str(err.value)
    assert await setup
    assert entry.state is ConfigEntryState.LOADED
    with pytest.raises(ServiceValidationError) as err:
        await call(hass, "list_caches", {"model": "Other"})
    assert err.value.translation_key == "model_not_loaded"
    assert str(err.value) == 'Model "Other" is not loaded by any Rockchip LLM agent'
    listed = await call(hass, "list_caches", {"model": "Qwen3 Sim"})
    assert [cache["name"] for cache in listed["caches"]] == ["system"]
    await hass.config_entries.async_unload(entry.entry_id)
    with pytest.raises(ServiceValidationError) as err:
        await call(hass, "list_caches", {})
    assert err.value.translation_key == "entry_not_loaded"
    assert "not_loaded" in str(err.value)
    await hass.config_entries.async_remove(entry.entry_id)
    with pytest.raises(ServiceValidationError) as err:
        await call(hass, "list_caches", {})
    assert err.value.translation_key == "no_agents"


async def test_nul_bytes_are_refused(
    hass: HomeAssistant, make_entry: EntryFactory, cache_dir: Path
) -> None:
    """Cache prompts and benchmark questions with a NUL are refused, not cut."""
    entry = await make_entry()
    saves = sim_counter(entry, "prompt_cache_save")
    with pytest.raises(ServiceValidationError) as err:
        await call(
            hass,
            "create_cache",
            {"model": "Qwen3 Sim", "name": "cut", "prompt": "before\0after"},
        )
    assert err.value.translation_key == "text_has_nul"
    assert str(err.value).startswith("There is a NUL character in the prompt,")
    assert not (cache_dir / "Qwen3 Sim" / "cut.json").exists()
    assert sim_counter(entry, "prompt_cache_save") == saves
    loaded = next(iter(entry.runtime_data.agents.values())).session
    with pytest.raises(ServiceValidationError) as err:
        await call(hass, "benchmark", {"agent": AGENT, "question": "on?\0x"})
    assert str(err.value).startswith("There is a NUL character in the question,")
    assert not loaded.recent


async def test_model_and_agent_fields_offer_a_list(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """The UI offers the loaded models and our agents to pick; nothing is typed."""
    entry = await make_entry()
    descriptions = (await async_get_all_descriptions(hass))[DOMAIN]
    for service in ("list_caches", "create_cache", "delete_cache"):
        model_selector = descriptions[service]["fields"]["model"]["selector"]
        assert model_selector == {
            "select": {"options": ["Qwen3 Sim"], "mode": "dropdown"}
        }
        selector.validate_selector(model_selector)
    for service in ("rebuild_cache", "benchmark"):
        agent_selector = descriptions[service]["fields"]["agent"]["selector"]
        assert agent_selector["entity"]["filter"] == [
            {"integration": DOMAIN, "domain": ["conversation"]}
        ]
        selector.validate_selector(agent_selector)
    assert descriptions["create_cache"]["response"] == {"optional": True}
    await hass.config_entries.async_unload(entry.entry_id)
    descriptions = (await async_get_all_descriptions(hass))[DOMAIN]
    assert descriptions["create_cache"]["fields"]["model"]["selector"] == {
        "select": {"options": [], "mode": "dropdown"}
    }


async def test_list_caches_after_model_folder_rename(
    hass: HomeAssistant,
    make_entry: EntryFactory,
    models_dir: Path,
    write_model: ModelWriter,
) -> None:
    """A cache whose model folder was renamed is invalid and says why."""
    write_model()
    write_model("Other")
    entry = await make_entry({}, {"model": "Other"})
    await hass.async_add_executor_job(
        (models_dir / "Qwen3 Sim").rename, models_dir / "Renamed"
    )
    assert await hass.config_entries.async_reload(entry.entry_id)
    listed = await call(hass, "list_caches", {})
    by_model = {cache["model"]: cache for cache in listed["caches"]}
    assert by_model["Qwen3 Sim"]["valid"] is False
    assert by_model["Qwen3 Sim"]["problem"] == "model_missing"
    assert by_model["Other"]["valid"] is True
    assert all(cache["problem"] for cache in listed["caches"] if not cache["valid"])


async def test_create_cache_says_whether_the_assist_tools_are_in_it(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """By default the agent's Assist tools come with the prompt; the caller may leave them out."""
    entry = await make_entry()
    agent = next(iter(entry.runtime_data.agents.values()))
    assert agent.system_cache.prefix is not None
    assert agent.system_cache.prefix.has_tools
    prompt = "You summarise the news of the day in three sentences."
    with_tools = await call(
        hass, "create_cache", {"model": "Qwen3 Sim", "name": "news", "prompt": prompt}
    )
    without = await call(
        hass,
        "create_cache",
        {
            "model": "Qwen3 Sim",
            "name": "news_alone",
            "prompt": prompt,
            "assist_tools": False,
        },
    )
    assert with_tools["cache"]["assist_tools"] is True
    assert without["cache"]["assist_tools"] is False
    # The Assist tools of a home with a few lights are hundreds of tokens.
    assert with_tools["cache"]["tokens"] - without["cache"]["tokens"] > 200
    assert without["cache"]["tokens"] < 64  # the 55-character prompt, templated


async def test_delete_cache_answers_what_it_removed(
    hass: HomeAssistant, make_entry: EntryFactory, cache_dir: Path
) -> None:
    """delete_cache responds with the removed cache; its name field lists the stored ones."""
    await make_entry()

    async def offered() -> list[str]:
        await hass.async_block_till_done()
        descriptions = (await async_get_all_descriptions(hass))[DOMAIN]
        name_selector = descriptions["delete_cache"]["fields"]["name"]["selector"]
        selector.validate_selector(name_selector)
        assert name_selector["select"]["custom_value"] is True
        return list(name_selector["select"]["options"])

    assert await offered() == ["system"]
    created = await call(
        hass, "create_cache", {"model": "Qwen3 Sim", "name": "head", "prompt": "Hi."}
    )
    assert await offered() == ["head", "system"]
    removed = await call(hass, "delete_cache", {"model": "Qwen3 Sim", "name": "head"})
    assert removed["deleted"]["model"] == "Qwen3 Sim"
    assert removed["deleted"]["name"] == "head"
    assert removed["deleted"]["tokens"] == created["cache"]["tokens"]
    assert removed["deleted"]["size_bytes"] == created["cache"]["size_bytes"]
    assert not (cache_dir / "Qwen3 Sim" / "head.bin").exists()
    assert await offered() == ["system"]


async def test_agents_cache_names_are_reserved(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """create_cache cannot overwrite an agent's system cache, nor rebuild_cache another's.

    The message says whose cache it is and which action rebuilds it; the agent
    keeps its cache and answers from it.
    """
    entry = await make_entry(
        {CONF_PROMPT: "You are the kitchen assistant."},
        {CONF_PROMPT: "You are the garage assistant."},
    )
    first, second = entry.runtime_data.agents.values()
    second_name = f"system_{second.subentry_id.lower()}"
    saves = sim_counter(entry, "prompt_cache_save")
    for name, agent in (("system", "Agent 0"), (second_name, "Agent 1")):
        with pytest.raises(ServiceValidationError) as err:
            await call(
                hass,
                "create_cache",
                {"model": "Qwen3 Sim", "name": name, "prompt": "Be a pirate."},
            )
        assert err.value.translation_key == "cache_reserved_create"
        assert str(err.value) == (
            f'"{name}" is the system prompt cache of the agent {agent} (model Qwen3 '
            "Sim), which the agent keeps itself; rockchip_llm.rebuild_cache rebuilds "
            "it. Choose another name for this cache"
        )
    with pytest.raises(ServiceValidationError) as err:
        await call(hass, "rebuild_cache", {"agent": AGENT, "name": second_name})
    assert err.value.translation_key == "cache_reserved_rebuild"
    assert err.value.translation_placeholders == {
        "model": "Qwen3 Sim",
        "name": second_name,
        "agent": "Agent 1",
    }
    assert sim_counter(entry, "prompt_cache_save") == saves  # nothing was built
    assert first.system_cache is not None and first.system_cache.cache is not None
    assert second.system_cache is not None and second.system_cache.cache is not None
    assert hass.states.get("sensor.agent_0_prompt_cache").state == "ready"
    await conversation.async_converse(hass, "hello", None, Context(), agent_id=AGENT)
    assert first.session.recent[-1].cache == "system"
    # Its own name is the agent's to rebuild, and other names are free.
    await call(hass, "rebuild_cache", {"agent": AGENT, "name": "system"})
    await call(
        hass, "create_cache", {"model": "Qwen3 Sim", "name": "pirate", "prompt": "Arr."}
    )
