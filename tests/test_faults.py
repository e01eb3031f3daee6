"""The fault matrix: what users meet, the message they see, and the state afterwards."""

import asyncio
from pathlib import Path
import shutil

from pytest_homeassistant_custom_component.common import MockConfigEntry

from homeassistant.components import conversation
from homeassistant.config_entries import ConfigEntryState
from homeassistant.core import Context, HomeAssistant
from homeassistant.helpers import intent

from .conftest import (
    EntryFactory,
    ModelWriter,
    agent_issue_error,
    agent_issues,
    last_run_record,
    model_text,
    sim_counter,
)

AGENT = "conversation.agent_0"


async def converse(hass: HomeAssistant, text: str) -> conversation.ConversationResult:
    """Ask the first agent."""
    return await conversation.async_converse(
        hass, text, None, Context(), agent_id=AGENT
    )


def speech(result: conversation.ConversationResult) -> str:
    """The plain speech of a result."""
    text: str = result.response.speech["plain"]["speech"]
    return text


def live_handles(entry: MockConfigEntry) -> int:
    """Model handles the runtime holds now, in every worker process of the test."""
    return sim_counter(entry, "live_handles")


async def test_library_replaced_while_loaded(
    hass: HomeAssistant, make_entry: EntryFactory, sim_library: Path, tmp_path: Path
) -> None:
    """Overwriting or deleting the library keeps HA answering; the next setup retries."""
    library = tmp_path / "librkllmrt.so"
    shutil.copy(sim_library, library)
    entry = await make_entry(setup=False)
    hass.config_entries.async_update_entry(
        entry, data={**entry.data, "library_path": str(library)}
    )
    assert await hass.config_entries.async_setup(entry.entry_id)
    with library.open("r+b") as file:  # overwritten in place, as cp does
        file.write(b"\0" * library.stat().st_size)
    assert speech(await converse(hass, "hello")) == "Hello from the simulator."
    library.unlink()
    assert speech(await converse(hass, "hello")) == "Hello from the simulator."
    await hass.config_entries.async_reload(entry.entry_id)
    assert entry.state is ConfigEntryState.SETUP_RETRY
    assert "does not exist" in (entry.reason or "")
    library.write_text("now a text file")
    await hass.config_entries.async_reload(entry.entry_id)
    assert entry.state is ConfigEntryState.SETUP_ERROR
    assert live_handles(entry) == 0


async def test_model_file_corrupted(
    hass: HomeAssistant, make_entry: EntryFactory, models_dir: Path
) -> None:
    """A truncated model: its agent is reported with the runtime's init error, the
    entry stays up; restoring the model and reloading recovers."""
    entry = await make_entry()
    model = models_dir / "Qwen3 Sim" / "model.rkllm"
    good = model.read_text()
    model.write_text("RKLL")
    await hass.config_entries.async_reload(entry.entry_id)
    assert entry.state is ConfigEntryState.LOADED
    assert "rkllm_init failed" in agent_issue_error(hass)
    assert (
        hass.states.get(AGENT) is None or hass.states.get(AGENT).state == "unavailable"
    )
    assert live_handles(entry) == 0
    model.write_text(good)
    await hass.config_entries.async_reload(entry.entry_id)
    assert entry.state is ConfigEntryState.LOADED
    assert not agent_issues(hass)
    assert speech(await converse(hass, "hello")) == "Hello from the simulator."


async def test_invalid_utf8_from_runtime(
    hass: HomeAssistant, make_entry: EntryFactory, write_model: ModelWriter
) -> None:
    """Bytes that are not UTF-8 become replacement characters, never a crash."""
    path = write_model()
    path.write_bytes(
        model_text(replies=()).encode() + b"default => Bad \xff\xfe bytes.\n"
    )
    await make_entry()
    assert speech(await converse(hass, "hello")) == "Bad \ufffd\ufffd bytes."


async def test_abort_during_prefill(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """Cancelling while the model is still prefilling aborts it; the model is free at once."""
    entry = await make_entry(model_kwargs={"prefill_ms_per_token": 1})
    loaded = next(iter(entry.runtime_data.agents.values())).session
    task = hass.async_create_task(converse(hass, "please " * 400))
    while not loaded.busy:
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert not loaded.busy
    assert len(loaded.recent) == 0  # the aborted run produced no answer
    record = last_run_record(entry)
    assert record["status"] == "aborted"
    assert record["generated_tokens"] == 0  # stopped while still prefilling
    assert speech(await converse(hass, "hello")) == "Hello from the simulator."


async def test_unload_during_generation(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """Unloading aborts a running generation: an error, not a cut-off answer."""
    long_reply = " ".join(f"w{i}" for i in range(2000))
    entry = await make_entry(
        model_kwargs={
            "replies": (f"default => {long_reply}",),
            "decode_ms_per_token": 5,
        }
    )
    loaded = next(iter(entry.runtime_data.agents.values())).session
    task = hass.async_create_task(converse(hass, "talk"))
    while not loaded.busy:
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.05)
    assert await hass.config_entries.async_unload(entry.entry_id)
    result = await task
    assert result.response.response_type is intent.IntentResponseType.ERROR
    assert "unloaded while it was answering" in speech(result)
    assert live_handles(entry) == 0


async def test_stop_during_cache_build(
    hass: HomeAssistant, make_entry: EntryFactory, cache_dir: Path
) -> None:
    """Setup cancelled mid-build (HA stopping): the run is aborted, nothing half-written stays."""
    entry = await make_entry(setup=False, model_kwargs={"prefill_ms_per_token": 5})
    setup = hass.async_create_task(hass.config_entries.async_setup(entry.entry_id))
    while live_handles(entry) == 0:
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.2)  # inside the prefill of the system prompt
    setup.cancel()
    await asyncio.gather(setup, return_exceptions=True)
    assert live_handles(entry) == 0
    model_cache = cache_dir / "Qwen3 Sim"
    leftovers = list(model_cache.glob("*")) if model_cache.exists() else []
    assert leftovers == []  # no staging file, no half pair
