"""Odd files in the cache folder, met by a real Home Assistant setup."""

import asyncio
import logging
import os
from pathlib import Path
import stat

import pytest

from homeassistant.components import conversation
from homeassistant.config_entries import ConfigEntryState
from homeassistant.core import Context, HomeAssistant

from .conftest import EntryFactory

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
