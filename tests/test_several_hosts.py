"""Several runtime hosts: one entry each, their agents on each, one down leaves the rest.

Two boards of a test LAN (network namespaces with names of their own) each run
a host; Home Assistant (the hass fixture) has an entry per host. The device page
tells the boards apart: a device per host, and each agent's device runs via it.
"""

from dataclasses import dataclass
from datetime import timedelta
from functools import partial
import os
from pathlib import Path

import pytest
from pytest_homeassistant_custom_component.common import async_fire_time_changed

from custom_components.rockchip_llm.const import (
    CONF_HOST_ADDRESS,
    CONF_PAIRING_KEY,
    DOMAIN,
)
from custom_components.rockchip_llm.host.board import DEVICE_TREE_ENV
from custom_components.rockchip_llm.host.version import HOST_VERSION
from custom_components.rockchip_llm.host_device import host_device_identifier
from homeassistant import config_entries
from homeassistant.components import conversation
from homeassistant.config_entries import ConfigEntry, ConfigEntryState
from homeassistant.core import Context, HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
from homeassistant.helpers import device_registry as dr, entity_registry as er
from homeassistant.util import dt as dt_util

from .board_host import BoardHost, start_board_host
from .conftest import model_text
from .lan import Lan
from .test_conversation import speech

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="network namespaces (ip netns) need root"
)


@dataclass
class Site:
    """A board's host and its entry in Home Assistant."""

    host: BoardHost
    entry: ConfigEntry
    agent: str
    """The entity id of its conversation agent."""


def start(hass_lan: Lan, folder: Path, name: str, soc: str | None = None) -> BoardHost:
    """A board named name (with a device tree of that SoC) whose host greets by name."""
    board = hass_lan.add_board()
    extra_env = {}
    if soc is not None:
        tree = folder / "device-tree"
        tree.mkdir(parents=True)
        (tree / "compatible").write_bytes(f"vendor,{name}\0rockchip,{soc}\0".encode())
        extra_env[DEVICE_TREE_ENV] = str(tree)
    return start_board_host(
        board,
        folder,
        hostname=name,
        model_text=model_text(replies=(f"default => Hello from {name}.",)),
        extra_env=extra_env,
    )


async def add(hass: HomeAssistant, host: BoardHost) -> Site:
    """Add the host by its address through the config flow."""
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": config_entries.SOURCE_USER}
    )
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {"next_step_id": "host"}
    )
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"],
        {CONF_HOST_ADDRESS: host.address, CONF_PAIRING_KEY: host.pairing_key},
    )
    assert result["step_id"] == "model", result
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {"model": "Qwen3 Sim"}
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    await hass.async_block_till_done()
    entry = result["result"]
    assert entry.state is ConfigEntryState.LOADED
    assert entry.unique_id == host.identity
    [agent] = [
        item.entity_id
        for item in er.async_entries_for_config_entry(
            er.async_get(hass), entry.entry_id
        )
        if item.domain == conversation.DOMAIN
    ]
    return Site(host, entry, agent)


async def ask(hass: HomeAssistant, site: Site) -> str:
    """Say hello to a site's agent; return its answer."""
    result = await conversation.async_converse(
        hass, "Hello", None, Context(), agent_id=site.agent
    )
    return speech(result)


async def test_each_host_has_its_entry_its_agents_and_its_device(
    hass: HomeAssistant, ha_base: None, hass_lan: Lan, tmp_path: Path
) -> None:
    """Two boards, two entries; the device page names the board of each agent."""
    hosts = [
        await hass.async_add_executor_job(
            partial(start, hass_lan, tmp_path / "a", "board-a", "rk3588")
        ),
        await hass.async_add_executor_job(start, hass_lan, tmp_path / "b", "board-b"),
    ]
    sites = [await add(hass, host) for host in hosts]
    assert [await ask(hass, site) for site in sites] == [
        "Hello from board-a.",
        "Hello from board-b.",
    ]
    registry = dr.async_get(hass)
    boards = {}
    for site in sites:
        [board] = [
            device
            for device in dr.async_entries_for_config_entry(
                registry, site.entry.entry_id
            )
            if host_device_identifier(site.entry) in device.identifiers
        ]
        boards[board.name] = board
        agent = er.async_get(hass).async_get(site.agent)
        assert agent is not None and agent.device_id is not None
        agent_device = registry.async_get(agent.device_id)
        assert agent_device is not None
        assert agent_device.via_device_id == board.id
    assert set(boards) == {"board-a", "board-b"}
    assert boards["board-a"].model == "RK3588 runtime host"
    assert boards["board-a"].manufacturer == "Rockchip"
    assert boards["board-b"].model == "Runtime host"  # no device tree: SoC unknown
    assert {board.sw_version for board in boards.values()} == {HOST_VERSION}


async def test_one_host_down_leaves_the_other_answering(
    hass: HomeAssistant, ha_base: None, hass_lan: Lan, tmp_path: Path
) -> None:
    """A stopped host makes only its agents unavailable; it comes back when it is up."""
    a = await hass.async_add_executor_job(start, hass_lan, tmp_path / "a", "board-a")
    b = await hass.async_add_executor_job(start, hass_lan, tmp_path / "b", "board-b")
    site_a, site_b = await add(hass, a), await add(hass, b)

    await hass.async_add_executor_job(a.stop)
    await hass.async_block_till_done()
    assert site_a.entry.state is ConfigEntryState.SETUP_RETRY
    assert a.address in (site_a.entry.reason or "")
    state = hass.states.get(site_a.agent)
    assert state is not None and state.state == "unavailable"
    assert site_b.entry.state is ConfigEntryState.LOADED
    assert await ask(hass, site_b) == "Hello from board-b."

    await hass.async_add_executor_job(start_again, a)
    async_fire_time_changed(hass, dt_util.utcnow() + timedelta(minutes=2))
    await hass.async_block_till_done(wait_background_tasks=True)
    assert site_a.entry.state is ConfigEntryState.LOADED
    assert await ask(hass, site_a) == "Hello from board-a."
    assert await ask(hass, site_b) == "Hello from board-b."


def start_again(host: BoardHost) -> None:
    """Start a stopped board's host again, as before."""
    again = start_board_host(
        host.board,
        host.log.parent,
        hostname="board-a",
        model_text=model_text(replies=("default => Hello from board-a.",)),
    )
    assert again.address == host.address
