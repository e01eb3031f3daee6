"""The "model folder missing" repair, fixed through Home Assistant's repairs API."""

from http import HTTPStatus
import json
from pathlib import Path
import shutil
from typing import Any

from pytest_homeassistant_custom_component.common import MockConfigEntry
from pytest_homeassistant_custom_component.typing import ClientSessionGenerator

from custom_components.rockchip_llm.const import DOMAIN
from homeassistant.config_entries import ConfigEntryState
from homeassistant.core import HomeAssistant
from homeassistant.helpers import issue_registry as ir
from homeassistant.setup import async_setup_component

from .conftest import PACKAGE, EntryFactory, ModelWriter

FIX_URL = "/api/repairs/issues/fix"
FIX_FLOW = json.loads((PACKAGE / "translations" / "en.json").read_text())["issues"][
    "model_missing"
]["fix_flow"]


async def broken_agent(
    hass: HomeAssistant,
    make_entry: EntryFactory,
    models_dir: Path,
    write_model: ModelWriter,
) -> tuple[MockConfigEntry, str]:
    """Two agents; the first one's model folder is renamed. Return its subentry id."""
    assert await async_setup_component(hass, "repairs", {})
    write_model()
    write_model("Other")
    entry = await make_entry({}, {"model": "Other"})
    (models_dir / "Qwen3 Sim").rename(models_dir / "Renamed")
    assert await hass.config_entries.async_reload(entry.entry_id)
    await hass.async_block_till_done()
    subentry_id = next(
        s.subentry_id
        for s in entry.subentries.values()
        if s.data["model"] == "Qwen3 Sim"
    )
    return entry, subentry_id


async def start_fix(
    hass_client: ClientSessionGenerator, issue_id: str
) -> dict[str, Any]:
    """Open the issue's fix flow as the frontend does."""
    client = await hass_client()
    response = await client.post(
        FIX_URL, json={"handler": DOMAIN, "issue_id": issue_id}
    )
    assert response.status == HTTPStatus.OK
    data: dict[str, Any] = await response.json()
    return data


async def submit_fix(
    hass_client: ClientSessionGenerator, flow_id: str, user_input: dict[str, Any]
) -> dict[str, Any]:
    """Submit a step of the fix flow."""
    client = await hass_client()
    response = await client.post(f"{FIX_URL}/{flow_id}", json=user_input)
    assert response.status == HTTPStatus.OK
    data: dict[str, Any] = await response.json()
    return data


async def test_pick_another_model(
    hass: HomeAssistant,
    hass_client: ClientSessionGenerator,
    make_entry: EntryFactory,
    models_dir: Path,
    write_model: ModelWriter,
) -> None:
    """The fix flow lists the folders found now; the pick loads the agent again."""
    entry, subentry_id = await broken_agent(hass, make_entry, models_dir, write_model)
    issue_id = f"model_missing_{subentry_id}"
    issue = ir.async_get(hass).async_get_issue(DOMAIN, issue_id)
    assert issue is not None and issue.is_fixable
    assert subentry_id not in entry.runtime_data.agents

    result = await start_fix(hass_client, issue_id)
    assert result["type"] == "form"
    assert result["step_id"] == "init"
    assert "{agent}" in FIX_FLOW["step"]["init"]["title"]
    assert result["description_placeholders"] == {
        "models_dir": str(models_dir),
        "agent": "Agent 0",
        "model": "Qwen3 Sim",
    }
    [field] = result["data_schema"]
    assert [option["value"] for option in field["selector"]["select"]["options"]] == [
        "Other",
        "Renamed",
    ]

    result = await submit_fix(hass_client, result["flow_id"], {"model": "Renamed"})
    assert result["type"] == "create_entry"
    await hass.async_block_till_done()
    assert entry.subentries[subentry_id].data["model"] == "Renamed"
    assert entry.state is ConfigEntryState.LOADED
    assert entry.runtime_data.agents[subentry_id].session.name == "Renamed"
    assert ir.async_get(hass).async_get_issue(DOMAIN, issue_id) is None
    assert hass.states.get("conversation.agent_0").state != "unavailable"


async def test_picked_folder_vanished(
    hass: HomeAssistant,
    hass_client: ClientSessionGenerator,
    make_entry: EntryFactory,
    models_dir: Path,
    write_model: ModelWriter,
) -> None:
    """A folder removed while the form is open is refused; the agent is unchanged."""
    entry, subentry_id = await broken_agent(hass, make_entry, models_dir, write_model)
    result = await start_fix(hass_client, f"model_missing_{subentry_id}")
    await hass.async_add_executor_job(shutil.rmtree, models_dir / "Renamed")
    result = await submit_fix(hass_client, result["flow_id"], {"model": "Renamed"})
    assert result["type"] == "form"
    assert result["errors"] == {"model": "model_gone"}
    assert "gone too" in FIX_FLOW["error"]["model_gone"]
    assert entry.subentries[subentry_id].data["model"] == "Qwen3 Sim"


async def test_no_models_left(
    hass: HomeAssistant,
    hass_client: ClientSessionGenerator,
    make_entry: EntryFactory,
    models_dir: Path,
    write_model: ModelWriter,
) -> None:
    """With no model folder at all the flow says so and the issue stays."""
    _entry, subentry_id = await broken_agent(hass, make_entry, models_dir, write_model)
    for name in ("Renamed", "Other"):
        await hass.async_add_executor_job(shutil.rmtree, models_dir / name)
    issue_id = f"model_missing_{subentry_id}"
    result = await start_fix(hass_client, issue_id)
    assert result["type"] == "abort"
    assert result["reason"] == "no_models"
    assert "No models found in {models_dir}" in FIX_FLOW["abort"]["no_models"]
    assert ir.async_get(hass).async_get_issue(DOMAIN, issue_id) is not None


async def test_agent_removed_meanwhile(
    hass: HomeAssistant,
    hass_client: ClientSessionGenerator,
    make_entry: EntryFactory,
    models_dir: Path,
    write_model: ModelWriter,
) -> None:
    """An agent deleted before the fix leaves nothing to fix."""
    entry, subentry_id = await broken_agent(hass, make_entry, models_dir, write_model)
    issue_id = f"model_missing_{subentry_id}"
    hass.config_entries.async_remove_subentry(entry, subentry_id)
    await hass.async_block_till_done()
    result = await start_fix(hass_client, issue_id)
    assert result["type"] == "abort"
    assert result["reason"] == "agent_removed"
    assert "removed" in FIX_FLOW["abort"]["agent_removed"]


async def test_models_folder_gone(
    hass: HomeAssistant,
    hass_client: ClientSessionGenerator,
    make_entry: EntryFactory,
    models_dir: Path,
    write_model: ModelWriter,
) -> None:
    """Without the models folder (drive unmounted) the flow says so."""
    _entry, subentry_id = await broken_agent(hass, make_entry, models_dir, write_model)
    await hass.async_add_executor_job(shutil.rmtree, models_dir)
    result = await start_fix(hass_client, f"model_missing_{subentry_id}")
    assert result["type"] == "abort"
    assert result["reason"] == "models_dir_missing"
    assert "{models_dir} does not exist" in FIX_FLOW["abort"]["models_dir_missing"]
    assert result["description_placeholders"]["models_dir"] == str(models_dir)
