"""Odd files in the cache folder, met by a real Home Assistant setup."""

import asyncio
import json
import logging
import os
from pathlib import Path
import shutil
import stat
import time
from typing import Any

import pytest
from pytest_homeassistant_custom_component.common import MockConfigEntry

from custom_components.rockchip_llm.const import HistoryStrategy
from custom_components.rockchip_llm.host.rkllm import aside
from custom_components.rockchip_llm.session import ModelSession
from homeassistant.components import conversation
from homeassistant.config_entries import ConfigEntryState
from homeassistant.core import Context, HomeAssistant
from homeassistant.helpers import issue_registry as ir

from .conftest import EntryFactory, agent_issues, sim_counter

AGENT = "conversation.agent_0"


async def reload_and_answer(hass: HomeAssistant, entry_id: str) -> None:
    """Reload the entry (never hanging) and check the agent answers."""
    async with asyncio.timeout(30):
        assert await hass.config_entries.async_reload(entry_id)
    entry = hass.config_entries.async_get_entry(entry_id)
    assert entry is not None
    assert entry.state is ConfigEntryState.LOADED
    result = await conversation.async_converse(
        hass, "hello", None, Context(), agent_id=AGENT
    )
    assert result.response.speech["plain"]["speech"] == "Hello from the simulator."


def moved_aside(folder: Path) -> list[Path]:
    """The entries the store moved out of its way."""
    return [path for path in folder.iterdir() if ".moved-" in path.name]


async def test_fifo_metadata_does_not_block_setup(
    hass: HomeAssistant, make_entry: EntryFactory, cache_dir: Path
) -> None:
    """A system.json that is a FIFO is skipped at once, moved aside and rebuilt."""
    entry = await make_entry()
    folder = cache_dir / "Qwen3 Sim"
    (folder / "system.json").unlink()
    os.mkfifo(folder / "system.json")
    await reload_and_answer(hass, entry.entry_id)
    assert stat.S_ISREG((folder / "system.json").lstat().st_mode)
    [fifo] = moved_aside(folder)
    assert stat.S_ISFIFO(fifo.lstat().st_mode)


async def test_folder_in_place_of_a_cache(
    hass: HomeAssistant,
    make_entry: EntryFactory,
    cache_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A folder named system.bin is reported and moved aside once, with its content."""
    entry = await make_entry()
    folder = cache_dir / "Qwen3 Sim"
    (folder / "system.bin").unlink()
    (folder / "system.bin").mkdir()
    (folder / "system.bin" / "notes.txt").write_text("mine")
    with caplog.at_level(logging.WARNING):
        await reload_and_answer(hass, entry.entry_id)
    assert "was not a file; moved it aside" in caplog.text
    [aside] = moved_aside(folder)
    assert (aside / "notes.txt").read_text() == "mine"
    assert stat.S_ISREG((folder / "system.bin").lstat().st_mode)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        await reload_and_answer(hass, entry.entry_id)
    assert "rockchip_llm" not in caplog.text  # nothing left to complain about
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []


async def test_symlink_to_another_models_cache_is_not_used(
    hass: HomeAssistant, make_entry: EntryFactory, cache_dir: Path
) -> None:
    """A system.bin linked to another model's cache is rebuilt, the target untouched."""
    entry = await make_entry()
    folder = cache_dir / "Qwen3 Sim"
    other = cache_dir / "Other"
    other.mkdir()
    (folder / "system.bin").rename(other / "system.bin")
    target = (other / "system.bin").read_bytes()
    (folder / "system.bin").symlink_to(other / "system.bin")
    listed = await hass.services.async_call(
        "rockchip_llm",
        "list_caches",
        {"model": "Qwen3 Sim"},
        blocking=True,
        return_response=True,
    )
    [cache] = listed["caches"]
    assert (cache["problem"], cache["valid"]) == ("not_a_file", False)
    await reload_and_answer(hass, entry.entry_id)
    assert not (folder / "system.bin").is_symlink()
    assert (other / "system.bin").read_bytes() == target
    loaded = next(iter(entry.runtime_data.agents.values())).session
    assert loaded.loaded_cache is not None
    assert loaded.loaded_cache.bin_path == folder / "system.bin"


async def test_runtime_folder_symlink_is_replaced(
    hass: HomeAssistant, make_entry: EntryFactory, cache_dir: Path, tmp_path: Path
) -> None:
    """A .runtime symlink cannot make the library copy land outside the cache folder."""
    outside = tmp_path / "outside"
    outside.mkdir()
    cache_dir.mkdir()
    (cache_dir / ".runtime").symlink_to(outside)
    entry = await make_entry()
    assert entry.state is ConfigEntryState.LOADED
    runtime = cache_dir / ".runtime"
    assert not runtime.is_symlink()
    assert runtime.is_dir()
    assert [p.name for p in runtime.iterdir() if p.suffix == ".so"]
    assert list(outside.iterdir()) == []


def agent_session(entry: MockConfigEntry) -> ModelSession:
    """The loaded model of the entry's only agent."""
    session: ModelSession = next(iter(entry.runtime_data.agents.values())).session
    return session


def read_json(path: Path) -> dict[str, Any]:
    """The JSON data of a metadata file."""
    data: dict[str, Any] = json.loads(path.read_text())
    return data


@pytest.mark.parametrize("which", [".bin", ".json"])
async def test_link_out_of_the_cache_folder_at_start(
    hass: HomeAssistant,
    make_entry: EntryFactory,
    cache_dir: Path,
    tmp_path: Path,
    which: str,
) -> None:
    """A system cache file linked out of the cache folder never costs the agent.

    list_caches shows it as not_a_file; the next start rebuilds the cache in its
    place and the agent answers, the link's target untouched, no repair raised.
    """
    entry = await make_entry()
    folder = cache_dir / "Qwen3 Sim"
    outside = tmp_path / f"outside{which}"

    def link() -> bytes:
        (folder / f"system{which}").rename(outside)
        (folder / f"system{which}").symlink_to(outside)
        return outside.read_bytes()

    target = await hass.async_add_executor_job(link)
    listed = await hass.services.async_call(
        "rockchip_llm",
        "list_caches",
        {"model": "Qwen3 Sim"},
        blocking=True,
        return_response=True,
    )
    [cache] = listed["caches"]
    assert (cache["name"], cache["problem"], cache["valid"]) == (
        "system",
        "not_a_file",
        False,
    )
    await reload_and_answer(hass, entry.entry_id)
    assert agent_issues(hass) == []
    assert await hass.async_add_executor_job(outside.read_bytes) == target
    assert not (folder / f"system{which}").is_symlink()
    assert agent_session(entry).loaded_cache is not None
    assert hass.states.get("sensor.agent_0_prompt_cache").state == "ready"


async def test_links_met_by_the_actions(
    hass: HomeAssistant,
    make_entry: EntryFactory,
    cache_dir: Path,
    tmp_path: Path,
) -> None:
    """rebuild_cache and create_cache replace a link, delete_cache removes only the link."""
    await make_entry()
    folder = cache_dir / "Qwen3 Sim"
    outside = tmp_path / "outside.bin"

    def plant(*names: str) -> None:
        outside.write_bytes(b"not the host's")
        for name in names:
            (folder / name).unlink(missing_ok=True)
            (folder / name).symlink_to(outside)

    await hass.async_add_executor_job(plant, "system.bin")
    await hass.services.async_call(
        "rockchip_llm", "rebuild_cache", {"agent": AGENT}, blocking=True
    )
    await hass.async_add_executor_job(plant, "notes.bin", "notes.json")
    listed = await hass.services.async_call(
        "rockchip_llm", "list_caches", {}, blocking=True, return_response=True
    )
    problems = {c["name"]: c["problem"] for c in listed["caches"]}
    assert problems == {"notes": "not_a_file", "system": None}
    await hass.services.async_call(
        "rockchip_llm",
        "create_cache",
        {"model": "Qwen3 Sim", "name": "notes", "prompt": "Take notes."},
        blocking=True,
    )
    await hass.async_add_executor_job(plant, "other.json")
    await hass.services.async_call(
        "rockchip_llm",
        "delete_cache",
        {"model": "Qwen3 Sim", "name": "other"},
        blocking=True,
    )

    def check() -> None:
        assert outside.read_bytes() == b"not the host's"
        assert sorted(p.name for p in folder.iterdir()) == [
            "notes.bin",
            "notes.json",
            "system.bin",
            "system.json",
        ]
        assert not any(p.is_symlink() for p in folder.iterdir())

    await hass.async_add_executor_job(check)
    result = await conversation.async_converse(
        hass, "hello", None, Context(), agent_id=AGENT
    )
    assert result.response.speech["plain"]["speech"] == "Hello from the simulator."


async def other_prompts_cache(hass: HomeAssistant, folder: Path) -> tuple[Path, Path]:
    """Build a cache of another prompt; return its .bin and .json."""
    await hass.services.async_call(
        "rockchip_llm",
        "create_cache",
        {
            "model": "Qwen3 Sim",
            "name": "other",
            "prompt": "You are a pirate. " * 40,
        },
        blocking=True,
    )
    return folder / "other.bin", folder / "other.json"


@pytest.mark.parametrize("metadata", ["system", "other"])
async def test_substituted_cache_is_rebuilt_not_blamed_on_the_runtime(
    hass: HomeAssistant,
    make_entry: EntryFactory,
    cache_dir: Path,
    caplog: pytest.LogCaptureFixture,
    metadata: str,
) -> None:
    """Another prompt's .bin under the system cache's name, with a .json that agrees.

    metadata "system": the agent's own .json, its size set to the other file's
    (the content hash tells). "other": the other cache's own .json renamed to
    this cache and prompt (it all agrees; the warm-up after the load tells).
    Either way the next start rebuilds the file, the history strategy stays,
    no repair is raised, and the agent answers at cached speed.
    """
    entry = await make_entry()
    folder = cache_dir / "Qwen3 Sim"
    other_bin, other_json = await other_prompts_cache(hass, folder)
    own = await hass.async_add_executor_job(read_json, folder / "system.json")
    system_tokens = own["tokens"]

    def substitute() -> None:
        lie = read_json(other_json if metadata == "other" else folder / "system.json")
        lie |= {
            "name": "system",
            "prompt_sha256": own["prompt_sha256"],
            "prompt_length": own["prompt_length"],
            "context": own["context"],
            "size_bytes": other_bin.stat().st_size,
        }
        (folder / "system.json").write_text(json.dumps(lie))
        shutil.copyfile(other_bin, folder / "system.bin")

    await hass.async_add_executor_job(substitute)
    saves = sim_counter(entry, "prompt_cache_save")
    with caplog.at_level(logging.WARNING):
        await reload_and_answer(hass, entry.entry_id)
    assert sim_counter(entry, "prompt_cache_save") == saves + 1
    expected_log = (
        "does not hold what system.json describes"
        if metadata == "system"
        else "rebuilding the file before doubting the runtime"
    )
    assert expected_log in caplog.text
    agent = next(iter(entry.runtime_data.agents.values()))
    assert agent.history.strategy is HistoryStrategy.AUTO
    assert not agent.history.failures
    assert not [
        issue_id
        for (domain, issue_id) in ir.async_get(hass).issues
        if domain == "rockchip_llm"
    ]
    rebuilt = await hass.async_add_executor_job(read_json, folder / "system.json")
    assert rebuilt["tokens"] == system_tokens
    assert (
        rebuilt["content_sha256"]
        != (await hass.async_add_executor_job(read_json, other_json))["content_sha256"]
    )
    result = await conversation.async_converse(
        hass, "hello", None, Context(), agent_id=AGENT
    )
    assert result.response.speech["plain"]["speech"] == "Hello from the simulator."
    assert 0 < agent.session.recent[-1].prefill_tokens < 30  # its own words only
    assert agent.session.recent[-1].cache == "system"


async def test_cache_of_an_earlier_version_is_rebuilt_once(
    hass: HomeAssistant,
    make_entry: EntryFactory,
    cache_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Metadata without a content hash: rebuilt at the next start, saying why; once."""
    entry = await make_entry()
    path = cache_dir / "Qwen3 Sim" / "system.json"

    def downgrade() -> None:
        data = read_json(path) | {"version": 1}
        del data["content_sha256"]
        path.write_text(json.dumps(data))

    await hass.async_add_executor_job(downgrade)
    saves = sim_counter(entry, "prompt_cache_save")
    with caplog.at_level(logging.INFO):
        await reload_and_answer(hass, entry.entry_id)
    assert "built by an earlier version, its metadata has no content hash" in (
        caplog.text
    )
    assert sim_counter(entry, "prompt_cache_save") == saves + 1
    assert (await hass.async_add_executor_job(read_json, path))["version"] == 2
    await reload_and_answer(hass, entry.entry_id)
    assert sim_counter(entry, "prompt_cache_save") == saves + 1


async def test_what_was_moved_aside_is_cleaned_up(
    hass: HomeAssistant, make_entry: EntryFactory, cache_dir: Path
) -> None:
    """Folders found in place of a cache file are moved aside; only the newest few stay."""
    entry = await make_entry()
    folder = cache_dir / "Qwen3 Sim"
    for index in range(aside.KEEP + 2):

        def plant(index: int = index) -> None:
            (folder / "system.bin").unlink()
            (folder / "system.bin").mkdir()
            (folder / "system.bin" / "note").write_text(str(index))
            time.sleep(0.02)  # a later status change time than the previous move's

        await hass.async_add_executor_job(plant)
        await reload_and_answer(hass, entry.entry_id)

    def notes() -> list[str]:
        return sorted((path / "note").read_text() for path in moved_aside(folder))

    assert await hass.async_add_executor_job(notes) == [
        str(index) for index in range(2, aside.KEEP + 2)
    ]
