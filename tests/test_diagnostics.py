"""Diagnostics through Home Assistant's diagnostics API."""

import json
from pathlib import Path
from typing import Any
from unittest.mock import patch

import pytest
from pytest_homeassistant_custom_component.common import MockConfigEntry
from pytest_homeassistant_custom_component.components.diagnostics import (
    get_diagnostics_for_config_entry,
)
from pytest_homeassistant_custom_component.typing import ClientSessionGenerator

from custom_components.rockchip_llm.const import (
    CONF_LIBRARY_PATH,
    CONF_MODELS_DIR,
    DOMAIN,
)
from custom_components.rockchip_llm.host import board
from custom_components.rockchip_llm.host.rkllm.abi import AbiFamily
from homeassistant.components import conversation
from homeassistant.config_entries import ConfigEntryState
from homeassistant.core import Context, HomeAssistant

from .conftest import EntryFactory, ModelWriter

AGENT = "conversation.agent_0"
SECRET_PROMPT = "You are the voice assistant of Jane Doe at 12 Example Street."
VERSIONS = {AbiFamily.V1_2: "1.2.3", AbiFamily.V1_3: "1.3.0"}


async def get_diagnostics(
    hass: HomeAssistant, hass_client: ClientSessionGenerator, entry: MockConfigEntry
) -> dict[str, Any]:
    """Download the entry's diagnostics and check they survive a JSON round trip."""
    data = await get_diagnostics_for_config_entry(hass, hass_client, entry)
    assert json.loads(json.dumps(data)) == data
    return dict(data)


def only_subentry_id(entry: MockConfigEntry, subentry_type: str) -> str:
    """The id of the entry's single subentry of a type."""
    [subentry_id] = [
        subentry_id
        for subentry_id, subentry in entry.subentries.items()
        if subentry.subentry_type == subentry_type
    ]
    return subentry_id


async def test_loaded_entry(
    hass: HomeAssistant,
    hass_client: ClientSessionGenerator,
    make_entry: EntryFactory,
    write_model: ModelWriter,
    models_dir: Path,
    sim_library: Path,
    abi_family: AbiFamily,
) -> None:
    """Runtime, models, loaded handles, agents with their runs, and the caches."""
    write_model()
    (models_dir / "Qwen3 Sim" / "zz-other.rkllm").write_text("RKLLM-SIM 1\n")
    (models_dir / "loose.rkllm").write_text("RKLLM-SIM 1\n")
    entry = await make_entry({"prompt": SECRET_PROMPT}, ai_tasks=({},))
    chat_id = only_subentry_id(entry, "conversation")
    task_id = only_subentry_id(entry, "ai_task_data")
    result = await conversation.async_converse(
        hass, "hello", None, Context(), agent_id=AGENT
    )
    assert result.response.speech["plain"]["speech"] == "Hello from the simulator."

    data = await get_diagnostics(hass, hass_client, entry)

    assert SECRET_PROMPT not in json.dumps(data)
    assert data["entry"]["state"] == "loaded"
    assert data["entry"]["data"][CONF_LIBRARY_PATH] == str(sim_library)
    assert data["subentries"][chat_id]["data"]["prompt"] == "**REDACTED**"
    assert data["subentries"][chat_id]["data"]["model"] == "Qwen3 Sim"
    assert data["subentries"][task_id]["subentry_type"] == "ai_task_data"

    runtime = data["runtime"]
    assert runtime["path"] == str(sim_library)
    assert runtime["family"] == str(abi_family)
    assert runtime["version"] == VERSIONS[abi_family]
    assert runtime["version_source"] == "version string"
    assert runtime["size"] == sim_library.stat().st_size
    assert len(runtime["blob_sha1"]) == 40

    model = data["models"]["models"]["Qwen3 Sim"]
    assert model["path"] == str(models_dir / "Qwen3 Sim" / "model.rkllm")
    assert model["size_bytes"] > 0
    assert model["ignored_files"] == ["zz-other.rkllm"]
    assert data["models"]["loose_files"] == ["loose.rkllm"]
    assert data["models"]["unreadable"] == []

    loaded = data["loaded_models"]["Qwen3 Sim"]
    assert set(loaded["fingerprint"]) == {"size", "mtime_ns", "sha256_head_tail"}
    assert loaded["params"]["max_context_len"] == 4096
    assert loaded["params"]["max_new_tokens"] == 256
    assert loaded["params"]["base_domain_id"] == 0
    assert loaded["params"]["model_path"] == model["path"]
    assert loaded["users"] == 2
    assert loaded["loaded_cache"] == "system"
    assert loaded["kv_tokens"] > 0
    assert loaded["kv_messages"] == 2
    assert loaded["busy"] is False
    worker = loaded["worker"]
    assert isinstance(worker["pid"], int)
    assert worker["died"] is None
    assert worker["given_up"] is None
    assert any("max_context_limit" in line for line in worker["runtime_output"])
    [run] = loaded["recent_runs"]
    assert run["prefill_tokens"] > 0
    assert run["prefill_ms"] >= 0
    assert run["ttft_ms"] is not None
    assert run["generate_tokens"] > 0
    assert run["reused_history"] is False
    assert run["cache"] == "system"

    agent = data["agents"][chat_id]
    assert agent["title"] == "Agent 0"
    assert agent["chat"] is True
    assert agent["model"] == "Qwen3 Sim"
    assert agent["cache"] == "system"
    assert agent["settings"]["history_strategy"] == "auto"
    assert agent["settings"]["sampling"]["temperature"] == 0.7
    assert agent["prefix"]["prompt_length"] > len(SECRET_PROMPT)
    assert agent["prefix"]["tools"] > 0
    assert agent["shares_model_with"] == [task_id]
    assert agent["recent_runs"] == [run]
    assert run["agent"] == chat_id
    assert data["agents"][task_id]["recent_runs"] == []
    assert data["agents"][task_id]["chat"] is False
    assert data["agents"][task_id]["cache"] is None
    assert data["agents"][task_id]["prefix"] is None

    [system] = data["caches"]
    assert system["model"] == "Qwen3 Sim"
    assert system["name"] == "system"
    assert system["problem"] is None
    assert system["valid"] is True
    assert system["agents"] == {chat_id: "valid"}
    assert system["metadata"]["tokens"] > 0
    assert system["metadata"]["prompt_sha256"] == agent["prefix"]["prompt_sha256"]


async def test_cache_validity(
    hass: HomeAssistant, hass_client: ClientSessionGenerator, make_entry: EntryFactory
) -> None:
    """A cache of another prompt is listed as not valid for the agent, with why."""
    entry = await make_entry()
    chat_id = only_subentry_id(entry, "conversation")
    await hass.services.async_call(
        DOMAIN,
        "create_cache",
        {"model": "Qwen3 Sim", "name": "other", "prompt": "Another prompt."},
        blocking=True,
    )

    data = await get_diagnostics(hass, hass_client, entry)

    caches = {cache["name"]: cache for cache in data["caches"]}
    assert set(caches) == {"system", "other"}
    assert caches["system"]["valid"] is True
    assert caches["other"]["valid"] is False
    assert caches["other"]["agents"] == {chat_id: "prompt_changed"}
    assert data["loaded_models"]["Qwen3 Sim"]["loaded_cache"] == "other"


async def test_host_info(
    hass: HomeAssistant,
    hass_client: ClientSessionGenerator,
    make_entry: EntryFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The NPU driver version (debugfs) and the SoC (device tree) are reported."""
    (tmp_path / "rknpu").mkdir()
    (tmp_path / "rknpu" / "version").write_text("RKNPU driver: v0.9.8\n")
    (tmp_path / "dt").mkdir()
    (tmp_path / "dt" / "compatible").write_bytes(
        b"friendlyarm,nanopi-r6s\0rockchip,rk3588s\0"
    )
    monkeypatch.setenv(board.NPU_DEBUGFS_ENV, str(tmp_path / "rknpu"))
    monkeypatch.setenv(board.DEVICE_TREE_ENV, str(tmp_path / "dt"))
    entry = await make_entry()
    data = await get_diagnostics(hass, hass_client, entry)
    assert data["host"]["board"] == {
        "npu_driver_version": "RKNPU driver: v0.9.8",
        "device_tree_compatible": ["friendlyarm,nanopi-r6s", "rockchip,rk3588s"],
        "soc": "rk3588s",
    }


async def test_host_info_absent(
    hass: HomeAssistant,
    hass_client: ClientSessionGenerator,
    make_entry: EntryFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without debugfs or a device tree (containers, x86) the values are null."""
    monkeypatch.setenv(board.NPU_DEBUGFS_ENV, str(tmp_path / "missing"))
    monkeypatch.setenv(board.DEVICE_TREE_ENV, str(tmp_path / "missing"))
    entry = await make_entry()
    data = await get_diagnostics(hass, hass_client, entry)
    assert data["host"]["board"] == {
        "npu_driver_version": None,
        "device_tree_compatible": None,
        "soc": None,
    }


async def test_entry_not_loaded(
    hass: HomeAssistant,
    hass_client: ClientSessionGenerator,
    make_entry: EntryFactory,
    tmp_path: Path,
) -> None:
    """An entry that failed to set up still reports why, and what is on disk."""
    entry = await make_entry({"prompt": SECRET_PROMPT}, setup=False)
    missing = tmp_path / "nowhere" / "librkllmrt.so"
    hass.config_entries.async_update_entry(
        entry, data={**entry.data, CONF_LIBRARY_PATH: str(missing)}
    )
    await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.SETUP_RETRY

    data = await get_diagnostics(hass, hass_client, entry)

    assert SECRET_PROMPT not in json.dumps(data)
    assert data["entry"]["state"] == "setup_retry"
    assert data["runtime"]["path"] == str(missing)
    assert "does not exist" in data["runtime"]["error"]
    assert list(data["models"]["models"]) == ["Qwen3 Sim"]
    assert "agents" not in data

    hass.config_entries.async_update_entry(
        entry, data={**entry.data, CONF_MODELS_DIR: str(tmp_path / "no-models")}
    )
    data = await get_diagnostics(hass, hass_client, entry)
    assert data["models"] == {"error": "models_dir_missing"}


async def test_cache_listing_fails(
    in_process_host: None,
    hass: HomeAssistant,
    hass_client: ClientSessionGenerator,
    make_entry: EntryFactory,
) -> None:
    """A cache folder that cannot be listed does not break the diagnostics."""
    entry = await make_entry()
    with patch(
        "custom_components.rockchip_llm.host.prompt_cache.PromptCacheStore.list",
        side_effect=PermissionError(13, "Permission denied"),
    ):
        data = await get_diagnostics(hass, hass_client, entry)
    assert data["caches"] == {"error": "PermissionError: [Errno 13] Permission denied"}
    assert data["agents"]
