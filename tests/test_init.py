"""Entry setup: libraries, models, and the system cache built once and reused."""

from datetime import timedelta
import hashlib
import json
from pathlib import Path
from unittest.mock import patch

import pytest
from pytest_homeassistant_custom_component.common import async_fire_time_changed

from custom_components.rockchip_llm.const import CONF_PROMPT, DOMAIN
from custom_components.rockchip_llm.host import board
from custom_components.rockchip_llm.host.rkllm.abi import AbiFamily
from homeassistant.components import conversation
from homeassistant.components.homeassistant.exposed_entities import async_expose_entity
from homeassistant.config_entries import ConfigEntryState
from homeassistant.const import EVENT_HOMEASSISTANT_STARTED
from homeassistant.core import Context, CoreState, HomeAssistant
from homeassistant.helpers import intent, issue_registry as ir
from homeassistant.util import dt as dt_util

from .conftest import SIM_LIBRARIES, EntryFactory, ModelWriter, sim_counter


def agent_states(hass: HomeAssistant) -> list[str]:
    """Entity ids of our conversation agents."""
    return [
        s.entity_id
        for s in hass.states.async_all("conversation")
        if s.entity_id != "conversation.home_assistant"
    ]


def system_cache(cache_dir: Path, model: str = "Qwen3 Sim") -> tuple[Path, Path]:
    """The system cache pair of a model."""
    return cache_dir / model / "system.bin", cache_dir / model / "system.json"


async def test_first_setup_builds_system_cache(
    hass: HomeAssistant, make_entry: EntryFactory, cache_dir: Path
) -> None:
    """Setup prefills the system prompt once and stores both files."""
    entry = await make_entry()
    assert entry.state is ConfigEntryState.LOADED
    bin_path, json_path = system_cache(cache_dir)
    assert bin_path.stat().st_size > 0
    metadata = json.loads(json_path.read_text())
    assert metadata["tokens"] > 0
    assert metadata["source"] == "setup"
    assert metadata["size_bytes"] == bin_path.stat().st_size
    assert hass.states.get("conversation.agent_0") is not None


async def test_second_setup_reuses_cache(
    hass: HomeAssistant, make_entry: EntryFactory, cache_dir: Path
) -> None:
    """Reloading loads the stored cache instead of building it again."""
    entry = await make_entry()
    _, json_path = system_cache(cache_dir)
    created = json.loads(json_path.read_text())["created_at"]
    saves = sim_counter(entry, "prompt_cache_save")
    assert await hass.config_entries.async_reload(entry.entry_id)
    await hass.async_block_till_done()
    assert json.loads(json_path.read_text())["created_at"] == created
    assert sim_counter(entry, "prompt_cache_save") == saves
    assert sim_counter(entry, "prompt_cache_load") >= 2


async def test_changed_prompt_rebuilds(
    hass: HomeAssistant, make_entry: EntryFactory, cache_dir: Path
) -> None:
    """A new prompt invalidates the cache."""
    entry = await make_entry()
    _, json_path = system_cache(cache_dir)
    before = json.loads(json_path.read_text())
    subentry = next(iter(entry.subentries.values()))
    hass.config_entries.async_update_subentry(
        entry, subentry, data={**subentry.data, "prompt": "Be brief."}
    )
    await hass.async_block_till_done()
    after = json.loads(json_path.read_text())
    assert after["prompt_sha256"] != before["prompt_sha256"]
    assert entry.state is ConfigEntryState.LOADED


async def test_changed_model_file_rebuilds(
    hass: HomeAssistant,
    make_entry: EntryFactory,
    cache_dir: Path,
    write_model: ModelWriter,
) -> None:
    """A replaced model file (new fingerprint) invalidates the cache."""
    entry = await make_entry()
    _, json_path = system_cache(cache_dir)
    before = json.loads(json_path.read_text())
    write_model(replies=("default => A different model.",))
    assert await hass.config_entries.async_reload(entry.entry_id)
    after = json.loads(json_path.read_text())
    assert after["model_fingerprint"] != before["model_fingerprint"]
    assert after["created_at"] != before["created_at"]


async def test_corrupt_cache_is_rebuilt(
    hass: HomeAssistant, make_entry: EntryFactory, cache_dir: Path
) -> None:
    """A corrupt metadata file is ignored and the cache rebuilt."""
    entry = await make_entry()
    await hass.config_entries.async_unload(entry.entry_id)
    bin_path, json_path = system_cache(cache_dir)
    json_path.write_text("{not json")
    assert await hass.config_entries.async_setup(entry.entry_id)
    assert json.loads(json_path.read_text())["tokens"] > 0
    bin_path.write_bytes(b"garbage of another size")
    assert await hass.config_entries.async_reload(entry.entry_id)
    assert json.loads(json_path.read_text())["size_bytes"] == bin_path.stat().st_size


async def test_failed_write_keeps_old_cache(
    in_process_host: None,
    hass: HomeAssistant,
    make_entry: EntryFactory,
    cache_dir: Path,
) -> None:
    """Disk full while writing a new cache: a repair, the agent answers without it.

    The old pair survives; the repair clears itself when a cache is written.
    """
    entry = await make_entry()
    bin_path, json_path = system_cache(cache_dir)
    old = (bin_path.read_bytes(), json_path.read_bytes())
    subentry = next(iter(entry.subentries.values()))
    with patch(
        "custom_components.rockchip_llm.host.prompt_cache._write_synced",
        side_effect=OSError(28, "No space left on device"),
    ):
        hass.config_entries.async_update_subentry(
            entry, subentry, data={**subentry.data, "prompt": "New."}
        )
        await hass.async_block_till_done()
        assert entry.state is ConfigEntryState.LOADED
    assert (bin_path.read_bytes(), json_path.read_bytes()) == old
    issue = ir.async_get(hass).async_get_issue(DOMAIN, f"cache_dir_{entry.entry_id}")
    assert issue is not None
    assert issue.translation_key == "cache_disk_full"
    assert issue.translation_placeholders is not None
    assert issue.translation_placeholders["path"] == str(cache_dir / "Qwen3 Sim")
    assert issue.translation_placeholders["free"].endswith(" MB")
    assert "No space left" in issue.translation_placeholders["error"]
    agent = next(iter(entry.runtime_data.agents.values()))
    assert agent.system_cache.cache is None
    result = await conversation.async_converse(
        hass, "hello", None, Context(), agent_id="conversation.agent_0"
    )
    assert result.response.speech["plain"]["speech"] == "Hello from the simulator."
    await hass.config_entries.async_reload(entry.entry_id)
    assert entry.state is ConfigEntryState.LOADED
    assert json_path.read_bytes() != old[1]
    assert (
        ir.async_get(hass).async_get_issue(DOMAIN, f"cache_dir_{entry.entry_id}")
        is None
    )


async def test_missing_library_retries(
    hass: HomeAssistant, make_entry: EntryFactory, tmp_path: Path
) -> None:
    """A missing library may appear later (not mounted yet): setup retries."""
    entry = await make_entry(setup=False)
    hass.config_entries.async_update_entry(
        entry, data={**entry.data, "library_path": str(tmp_path / "nope.so")}
    )
    await hass.config_entries.async_setup(entry.entry_id)
    assert entry.state is ConfigEntryState.SETUP_RETRY


async def test_unusable_library_fails(
    hass: HomeAssistant, make_entry: EntryFactory, tmp_path: Path
) -> None:
    """A library that can never work is a setup error."""
    text = tmp_path / "librkllmrt.so"
    text.write_text("hello")
    entry = await make_entry(setup=False)
    hass.config_entries.async_update_entry(
        entry, data={**entry.data, "library_path": str(text)}
    )
    await hass.config_entries.async_setup(entry.entry_id)
    assert entry.state is ConfigEntryState.SETUP_ERROR
    issue = ir.async_get(hass).async_get_issue(DOMAIN, f"library_{entry.entry_id}")
    assert issue is not None
    assert issue.translation_key == "library_unusable"
    assert "not an ELF shared library" in issue.translation_placeholders["error"]


async def test_missing_models_dir_retries(
    hass: HomeAssistant, make_entry: EntryFactory, tmp_path: Path
) -> None:
    """A models folder on a drive that is not mounted yet: setup retries."""
    entry = await make_entry(setup=False)
    hass.config_entries.async_update_entry(
        entry, data={**entry.data, "models_dir": str(tmp_path / "gone")}
    )
    await hass.config_entries.async_setup(entry.entry_id)
    assert entry.state is ConfigEntryState.SETUP_RETRY


async def test_removed_model_folder_raises_repair(
    hass: HomeAssistant,
    make_entry: EntryFactory,
    models_dir: Path,
    write_model: ModelWriter,
) -> None:
    """An agent whose model folder is gone gets a repair issue; others keep working."""
    write_model()
    write_model("Other")
    entry = await make_entry({}, {"model": "Other"})
    assert len(agent_states(hass)) == 2
    (models_dir / "Qwen3 Sim").rename(models_dir / "Renamed")
    assert await hass.config_entries.async_reload(entry.entry_id)
    assert entry.state is ConfigEntryState.LOADED
    subentry_id = next(
        s.subentry_id
        for s in entry.subentries.values()
        if s.data["model"] == "Qwen3 Sim"
    )
    issue = ir.async_get(hass).async_get_issue(DOMAIN, f"model_missing_{subentry_id}")
    assert issue is not None
    assert issue.translation_placeholders == {"model": "Qwen3 Sim", "agent": "Agent 0"}
    assert hass.states.get("conversation.agent_0").state == "unavailable"
    assert hass.states.get("conversation.agent_1").state != "unavailable"


async def test_agents_share_a_model_handle(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """Two agents on one model load it once; with the same prompt, one cache serves both."""
    entry = await make_entry({}, {"temperature": 0.1})
    agents = list(entry.runtime_data.agents.values())
    assert agents[0].session is agents[1].session
    assert sim_counter(entry, "init") == 1
    assert sim_counter(entry, "prompt_cache_save") == 1
    caches = [agent.system_cache.cache for agent in agents if agent.system_cache]
    assert len(caches) == 2
    assert caches[0] is not None
    assert caches[0] is caches[1]


async def test_unload_destroys_handles(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """Unload destroys every handle and joins the worker threads."""
    entry = await make_entry()
    model = next(iter(entry.runtime_data.agents.values())).session.worker
    assert await hass.config_entries.async_unload(entry.entry_id)
    assert model.closed
    assert entry.state is ConfigEntryState.NOT_LOADED


async def test_entity_exposed_after_setup_rebuilds_debounced(
    hass: HomeAssistant, make_entry: EntryFactory, cache_dir: Path
) -> None:
    """Exposing an entity changes the prompt: the cache is rebuilt after the debounce."""
    entry = await make_entry()
    _, json_path = system_cache(cache_dir)
    before = json.loads(json_path.read_text())["prompt_sha256"]
    saves = sim_counter(entry, "prompt_cache_save")
    expose_light(hass)
    await hass.async_block_till_done()
    assert sim_counter(entry, "prompt_cache_save") == saves  # not yet: debounced
    async_fire_time_changed(hass, dt_util.utcnow() + timedelta(seconds=31))
    await hass.async_block_till_done(wait_background_tasks=True)
    after = json.loads(json_path.read_text())
    assert after["prompt_sha256"] != before
    assert after["source"] == "auto"
    assert sim_counter(entry, "prompt_cache_save") == saves + 1


async def test_prefix_recomputed_once_started(
    hass: HomeAssistant, make_entry: EntryFactory, cache_dir: Path
) -> None:
    """Entities that appear during start-up are in the cache once HA has started."""
    hass.set_state(CoreState.not_running)
    entry = await make_entry()
    _, json_path = system_cache(cache_dir)
    before = json.loads(json_path.read_text())["prompt_sha256"]
    expose_light(hass)
    hass.bus.async_fire(EVENT_HOMEASSISTANT_STARTED)
    await hass.async_block_till_done()
    assert json.loads(json_path.read_text())["prompt_sha256"] != before
    assert entry.state is ConfigEntryState.LOADED


async def test_changed_runtime_rebuilds(
    hass: HomeAssistant,
    make_entry: EntryFactory,
    cache_dir: Path,
    abi_family: AbiFamily,
) -> None:
    """Another runtime version invalidates the cache."""
    entry = await make_entry()
    _, json_path = system_cache(cache_dir)
    before = json.loads(json_path.read_text())
    other = next(
        path for family, path in SIM_LIBRARIES.items() if family is not abi_family
    )
    hass.config_entries.async_update_entry(
        entry, data={**entry.data, "library_path": str(other)}
    )
    assert await hass.config_entries.async_reload(entry.entry_id)
    after = json.loads(json_path.read_text())
    assert after["runtime_version"] != before["runtime_version"]
    assert after["created_at"] != before["created_at"]


def expose_light(hass: HomeAssistant) -> None:
    """Add and expose a light to Assist."""
    hass.states.async_set("light.porch", "off", {"friendly_name": "Porch"})
    async_expose_entity(hass, "conversation", "light.porch", True)


@pytest.mark.parametrize(
    ("version", "raised"),
    [("RKNPU driver: v0.9.6", True), ("RKNPU driver: v0.9.8", False)],
)
async def test_old_npu_driver_repair(
    hass: HomeAssistant,
    make_entry: EntryFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    version: str,
    raised: bool,
) -> None:
    """An NPU driver below 0.9.8 raises a warning repair; setup still goes on."""
    (tmp_path / "version").write_text(version + "\n")
    monkeypatch.setenv(board.NPU_DEBUGFS_ENV, str(tmp_path))
    entry = await make_entry()
    assert entry.state is ConfigEntryState.LOADED
    issue = ir.async_get(hass).async_get_issue(DOMAIN, "npu_driver_old")
    assert (issue is not None) is raised
    if issue is not None:
        assert issue.severity is ir.IssueSeverity.WARNING
        assert issue.translation_placeholders == {"version": version}


@pytest.mark.parametrize("hashed", [False, True], ids=["as_built", "rehashed"])
async def test_foreign_cache_of_the_right_size_is_rebuilt(
    hass: HomeAssistant,
    make_entry: EntryFactory,
    cache_dir: Path,
    caplog: pytest.LogCaptureFixture,
    hashed: bool,
) -> None:
    """A .bin of the right size but foreign content is rebuilt, never used.

    Its content check refuses it before the runtime sees it; with metadata that
    hashes it (rehashed), the runtime's own refusal does.
    """
    entry = await make_entry()
    bin_path, json_path = system_cache(cache_dir)
    foreign = b"\0" * bin_path.stat().st_size
    bin_path.write_bytes(foreign)
    if hashed:
        data = json.loads(json_path.read_text())
        data["content_sha256"] = hashlib.sha256(foreign).hexdigest()
        json_path.write_text(json.dumps(data))
    saves = sim_counter(entry, "prompt_cache_save")
    loads = sim_counter(entry, "prompt_cache_load")
    assert await hass.config_entries.async_reload(entry.entry_id)
    assert entry.state is ConfigEntryState.LOADED
    if hashed:
        assert "The runtime refused prompt cache" in caplog.text
    else:
        assert "does not hold what system.json describes" in caplog.text
        assert "refused prompt cache" not in caplog.text
    assert sim_counter(entry, "prompt_cache_save") == saves + 1
    assert bin_path.read_bytes().startswith(b"RKLLM-SIM-CACHE")
    assert sim_counter(entry, "prompt_cache_load") == loads + 1  # the rebuilt one


async def test_agents_with_different_prompts_on_one_model_keep_their_caches(
    hass: HomeAssistant, make_entry: EntryFactory, cache_dir: Path
) -> None:
    """Two agents with different prompts on one model each keep a system cache.

    Neither overwrites the other's: requests to both, and the rebuild checks
    after them, build nothing more.
    """
    entry = await make_entry(
        {CONF_PROMPT: "You are the kitchen assistant."},
        {CONF_PROMPT: "You are the garage assistant."},
    )
    first, second = entry.runtime_data.agents.values()
    assert first.system_cache is not None and second.system_cache is not None
    assert first.system_cache.cache is not None
    assert second.system_cache.cache is not None
    assert first.system_cache.cache.bin_path != second.system_cache.cache.bin_path
    saves = sim_counter(entry, "prompt_cache_save")
    for agent_id in ("conversation.agent_0", "conversation.agent_1"):
        result = await conversation.async_converse(
            hass, "hello", None, Context(), agent_id=agent_id
        )
        assert result.response.response_type is intent.IntentResponseType.ACTION_DONE
    async_fire_time_changed(hass, dt_util.utcnow() + timedelta(seconds=31))
    await hass.async_block_till_done(wait_background_tasks=True)
    assert sim_counter(entry, "prompt_cache_save") == saves
    assert [run.cache for run in first.session.recent][-2:] == [
        first.system_cache.cache.name,
        second.system_cache.cache.name,
    ]
