"""With the simulator, everything the user sees says it is simulated."""

import json
from pathlib import Path
import shutil
from unittest.mock import patch

import pytest
from pytest_homeassistant_custom_component.components.diagnostics import (
    get_diagnostics_for_config_entry,
)
from pytest_homeassistant_custom_component.typing import ClientSessionGenerator

from custom_components.rockchip_llm import config_flow
from custom_components.rockchip_llm.const import (
    CONF_CACHE_DIR,
    CONF_LIBRARY_PATH,
    CONF_MODEL,
    CONF_MODELS_DIR,
    DOMAIN,
)
from custom_components.rockchip_llm.simulation import SIMULATOR_ENV
from homeassistant import config_entries
from homeassistant.config_entries import ConfigEntryState
from homeassistant.core import HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
from homeassistant.helpers import device_registry as dr, entity_registry as er

from .conftest import PACKAGE, EntryFactory, ModelWriter

AGENT = "conversation.agent_0"


def agent_device(hass: HomeAssistant) -> dr.DeviceEntry:
    """The device of the first agent."""
    agent = er.async_get(hass).async_get(AGENT)
    assert agent is not None and agent.device_id is not None
    device = dr.async_get(hass).async_get(agent.device_id)
    assert device is not None
    return device


async def test_device_says_simulated(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """The agent's device names the simulator as its software and model."""
    entry = await make_entry()
    version = entry.runtime_data.engine.runtime.version
    device = agent_device(hass)
    assert device.model == "Qwen3 Sim (simulated)"
    assert device.sw_version == f"RKLLM simulator (runtime {version} ABI)"


async def test_real_runtime_device_labels(
    in_process_host: None, hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """With Rockchip's runtime the device shows the model and the runtime version."""
    with patch(
        "custom_components.rockchip_llm.host.rkllm.probe.file_is_simulator",
        return_value=False,
    ):
        entry = await make_entry()
    version = entry.runtime_data.engine.runtime.version
    device = agent_device(hass)
    assert device.model == "Qwen3 Sim"
    assert device.sw_version == f"RKLLM runtime {version}"


async def test_diagnostics_say_simulated(
    hass: HomeAssistant,
    hass_client: ClientSessionGenerator,
    make_entry: EntryFactory,
    models_dir: Path,
) -> None:
    """Diagnostics flag the runtime as simulated, loaded or not."""
    entry = await make_entry()
    data = await get_diagnostics_for_config_entry(hass, hass_client, entry)
    assert data["runtime"]["simulated"] is True
    # Also while the entry is not loaded (here: its models folder is gone).
    await hass.config_entries.async_unload(entry.entry_id)
    await hass.async_add_executor_job(shutil.rmtree, models_dir)
    await hass.config_entries.async_setup(entry.entry_id)
    assert entry.state is ConfigEntryState.SETUP_RETRY
    data = await get_diagnostics_for_config_entry(hass, hass_client, entry)
    assert data["runtime"]["simulated"] is True


async def test_benchmark_says_simulated(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """The benchmark response says its figures come from the simulator."""
    await make_entry()
    result = await hass.services.async_call(
        DOMAIN,
        "benchmark",
        {"agent": AGENT, "runs": 1},
        blocking=True,
        return_response=True,
    )
    assert result is not None
    assert result["simulated"] is True


@pytest.mark.usefixtures("ha_base")
async def test_flow_with_the_simulator(
    hass: HomeAssistant,
    sim_library: Path,
    models_dir: Path,
    cache_dir: Path,
    write_model: ModelWriter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without a runtime the flow offers the simulator in a step that says so."""
    write_model()
    monkeypatch.setenv(SIMULATOR_ENV, str(sim_library))
    with (
        patch.object(config_flow, "LIBRARY_CANDIDATES", ()),
        patch("custom_components.rockchip_llm.async_setup_entry", return_value=True),
    ):
        result = await hass.config_entries.flow.async_init(
            DOMAIN, context={"source": config_entries.SOURCE_USER}
        )
        result = await hass.config_entries.flow.async_configure(
            result["flow_id"], {"next_step_id": "local"}
        )
        assert result["step_id"] == "simulator"
        result = await hass.config_entries.flow.async_configure(
            result["flow_id"],
            {
                CONF_LIBRARY_PATH: str(sim_library),
                CONF_MODELS_DIR: str(models_dir),
                CONF_CACHE_DIR: str(cache_dir),
            },
        )
        assert result["step_id"] == "model"
        [option] = result["data_schema"].schema[CONF_MODEL].config["options"]
        assert option["label"] == "Qwen3 Sim (simulated)"
        result = await hass.config_entries.flow.async_configure(
            result["flow_id"], {CONF_MODEL: "Qwen3 Sim"}
        )
    assert result["type"] is FlowResultType.CREATE_ENTRY


def test_simulator_step_texts() -> None:
    """The simulator step's title and texts say plainly that nothing runs on an NPU."""
    english = json.loads((PACKAGE / "translations" / "en.json").read_text())
    step = english["config"]["step"]["simulator"]
    assert "simulator" in step["title"]
    assert "Nothing here runs on an NPU" in step["description"]
    assert "simulator" in step["data_description"]["library_path"]
