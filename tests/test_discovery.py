"""Runtime hosts found by zeroconf: offered under Discovered, followed when they move.

The flow runs through Home Assistant's flow manager with the ZeroconfServiceInfo
its zeroconf integration hands over, against real hosts (the board's Python);
the last test takes that info from a host's real announcement on a test LAN.
"""

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from functools import partial
from ipaddress import ip_address
import os
from pathlib import Path
from typing import Any

import pytest
from pytest_homeassistant_custom_component.common import (
    MockConfigEntry,
    async_fire_time_changed,
)

from custom_components.rockchip_llm.const import (
    CONF_HOST_ADDRESS,
    CONF_HOST_IDENTITY,
    CONF_PAIRING_KEY,
    DOMAIN,
)
from custom_components.rockchip_llm.host.announce import SERVICE_TYPE
from homeassistant import config_entries
from homeassistant.components import conversation
from homeassistant.config_entries import ConfigEntryState
from homeassistant.core import Context, HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
from homeassistant.helpers.service_info.zeroconf import ZeroconfServiceInfo
from homeassistant.util import dt as dt_util

from .board_host import LanBrowser
from .conftest import model_text
from .host_process import HostProcess, start_host, stop_host
from .lan import Lan
from .test_conversation import speech
from .test_tcp_pairing import host_step, pair

IDENTITY = "sha256:" + "ab" * 32
AGENT = "conversation.qwen3_sim_conversation"


@pytest.fixture
async def tcp_host(hass: HomeAssistant, tmp_path: Path) -> AsyncIterator[HostProcess]:
    """A host on 127.0.0.1 at a port of its own (started and stopped in a thread)."""
    host = await hass.async_add_executor_job(
        partial(start_host, tmp_path / "host", tcp=True)
    )
    yield host
    for entry in hass.config_entries.async_entries(DOMAIN):
        await hass.config_entries.async_unload(entry.entry_id)
    await hass.async_add_executor_job(stop_host, host)


def announcement(
    address: str,
    port: int | None,
    properties: dict[str, Any] | None = None,
    identity: str = IDENTITY,
) -> ZeroconfServiceInfo:
    """What HA's zeroconf hands over for a host announced at address:port."""
    return ZeroconfServiceInfo(
        ip_address=ip_address(address),
        ip_addresses=[ip_address(address)],
        port=port,
        hostname="rockchip-llm-abababababab.local.",
        type=SERVICE_TYPE,
        name=f"board-a.{SERVICE_TYPE}",
        properties={
            "id": identity,
            "version": "0.1.0",
            "protocol": "1",
            "name": "board-a",
        }
        if properties is None
        else properties,
    )


async def discover(hass: HomeAssistant, info: ZeroconfServiceInfo) -> Any:
    """Start the flow as HA's zeroconf integration does."""
    return await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": config_entries.SOURCE_ZEROCONF}, data=info
    )


def suggested(result: Any, key: str) -> Any:
    """The value a form suggests for a field."""
    for field in result["data_schema"].schema:
        if field == key:
            return (field.description or {}).get("suggested_value")
    raise KeyError(key)


def announced(host: HostProcess) -> ZeroconfServiceInfo:
    """The announcement of a host of the test."""
    assert host.tcp is not None and host.identity is not None
    return announcement(*host.tcp, identity=host.identity)


def paired_entry(host: HostProcess, address: str) -> MockConfigEntry:
    """An entry paired with host (its identity and key), at address."""
    assert host.identity is not None
    return MockConfigEntry(
        domain=DOMAIN,
        title="Rockchip LLM (board-a)",
        unique_id=host.identity,
        data={
            CONF_HOST_ADDRESS: address,
            CONF_PAIRING_KEY: host.pairing_key,
            CONF_HOST_IDENTITY: host.identity,
        },
    )


async def set_up_discovered(
    hass: HomeAssistant, info: ZeroconfServiceInfo, key: str
) -> Any:
    """Confirm a discovered host, take the address the host step suggests, pick the model."""
    result = await discover(hass, info)
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "zeroconf_confirm"
    result = await hass.config_entries.flow.async_configure(result["flow_id"], {})
    assert result["step_id"] == "host"
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"],
        {
            CONF_HOST_ADDRESS: suggested(result, CONF_HOST_ADDRESS),
            CONF_PAIRING_KEY: key,
        },
    )
    assert result["step_id"] == "model", result
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {"model": "Qwen3 Sim"}
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    await hass.async_block_till_done()
    return result


async def converse(hass: HomeAssistant, text: str, agent: str = AGENT) -> str:
    """Say text to an agent; return its answer."""
    result = await conversation.async_converse(
        hass, text, None, Context(), agent_id=agent
    )
    return speech(result)


async def test_a_discovered_host_is_offered_with_its_name_and_set_up(
    hass: HomeAssistant, ha_base: None, lan_sockets: None, tcp_host: HostProcess
) -> None:
    """Confirm with the host's name, the host step filled in, the key, then the model."""
    assert tcp_host.tcp is not None
    address, port = tcp_host.tcp
    result = await discover(hass, announced(tcp_host))
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "zeroconf_confirm"
    assert result["description_placeholders"] == {
        "name": "board-a",
        "address": f"{address}:{port}",
    }
    [flow] = hass.config_entries.flow.async_progress()
    assert flow["context"]["title_placeholders"] == {"name": "board-a"}
    assert flow["context"]["unique_id"] == tcp_host.identity

    result = await hass.config_entries.flow.async_configure(result["flow_id"], {})
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "host"
    assert suggested(result, CONF_HOST_ADDRESS) == f"{address}:{port}"
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_HOST_ADDRESS: f"{address}:{port}"}
    )
    assert result["errors"] == {CONF_PAIRING_KEY: "pairing_key_required"}
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"],
        {
            CONF_HOST_ADDRESS: f"{address}:{port}",
            CONF_PAIRING_KEY: tcp_host.pairing_key,
        },
    )
    assert result["step_id"] == "model"
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {"model": "Qwen3 Sim"}
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["title"] == "Rockchip LLM (board-a)"
    entry = result["result"]
    assert entry.unique_id == tcp_host.identity
    assert entry.data == {
        CONF_HOST_ADDRESS: f"{address}:{port}",
        CONF_PAIRING_KEY: tcp_host.pairing_key,
        CONF_HOST_IDENTITY: tcp_host.identity,
    }
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.LOADED
    assert await converse(hass, "Hello") == "Hello from the simulator."


async def test_a_host_that_is_not_the_announced_one_is_refused(
    hass: HomeAssistant, ha_base: None, lan_sockets: None, tcp_host: HostProcess
) -> None:
    """An announcement of another identity than the host there proves: a form error."""
    assert tcp_host.tcp is not None
    address, port = tcp_host.tcp
    result = await discover(hass, announcement(address, port))  # IDENTITY: forged
    result = await hass.config_entries.flow.async_configure(result["flow_id"], {})
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"],
        {
            CONF_HOST_ADDRESS: f"{address}:{port}",
            CONF_PAIRING_KEY: tcp_host.pairing_key,
        },
    )
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "host"
    assert result["errors"] == {"base": "identity_not_announced"}
    assert result["description_placeholders"]["identity"] == tcp_host.identity
    assert result["description_placeholders"]["announced"] == IDENTITY
    assert not hass.config_entries.async_entries(DOMAIN)


async def test_a_host_that_moved_is_followed(
    hass: HomeAssistant, ha_base: None, lan_sockets: None, tcp_host: HostProcess
) -> None:
    """Found at a new address, proving its identity there: the entry takes it."""
    assert tcp_host.tcp is not None
    address, port = tcp_host.tcp
    entry = paired_entry(tcp_host, "127.0.0.1:1")  # where nobody listens now
    entry.add_to_hass(hass)
    await hass.config_entries.async_setup(entry.entry_id)
    assert entry.state is ConfigEntryState.SETUP_RETRY

    result = await discover(hass, announced(tcp_host))
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "host_already_configured"
    assert entry.data[CONF_HOST_ADDRESS] == f"{address}:{port}"
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.LOADED
    assert not hass.config_entries.flow.async_progress()


async def test_a_forged_announcement_moves_no_entry(
    hass: HomeAssistant,
    ha_base: None,
    lan_sockets: None,
    tcp_host: HostProcess,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Another host announced with a paired host's identity: the entry stays put."""
    entry = paired_entry(tcp_host, "127.0.0.1:1")
    entry.add_to_hass(hass)
    await hass.config_entries.async_setup(entry.entry_id)
    other = await hass.async_add_executor_job(
        partial(start_host, tmp_path / "other", tcp=True)
    )
    try:
        assert other.tcp is not None and tcp_host.identity is not None
        forged = announcement(*other.tcp, identity=tcp_host.identity)
        result = await discover(hass, forged)
        assert result["type"] is FlowResultType.ABORT
        assert result["reason"] == "host_already_configured"
        assert entry.data[CONF_HOST_ADDRESS] == "127.0.0.1:1"
        assert f"Not moving Rockchip LLM (board-a) to 127.0.0.1:{other.tcp[1]}" in (
            caplog.text
        )
        assert "shows another identity" in caplog.text
        assert not hass.config_entries.flow.async_progress()
    finally:
        await hass.config_entries.async_unload(entry.entry_id)
        await hass.async_add_executor_job(stop_host, other)


async def test_a_configured_host_found_again_is_not_offered(
    hass: HomeAssistant, ha_base: None, lan_sockets: None, tcp_host: HostProcess
) -> None:
    """Same identity and address: no flow, no reload; also for one added by address."""
    result = await set_up_discovered(hass, announced(tcp_host), tcp_host.pairing_key)
    entry = result["result"]
    host_link = entry.runtime_data.engine.host.link

    result = await discover(hass, announced(tcp_host))
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "host_already_configured"
    await hass.async_block_till_done()
    assert entry.runtime_data.engine.host.link is host_link  # not reloaded

    # An entry at an address with another identity (a host being re-paired): no flow.
    by_address = MockConfigEntry(
        domain=DOMAIN, data={CONF_HOST_ADDRESS: "192.0.2.7:7823"}
    )
    by_address.add_to_hass(hass)
    other = {"id": "sha256:" + "cd" * 32, "name": "board-b"}
    result = await discover(hass, announcement("192.0.2.7", 7823, other))
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "already_configured"
    assert not hass.config_entries.flow.async_progress()


async def test_a_host_added_by_address_is_known_by_its_identity(
    hass: HomeAssistant, ha_base: None, lan_sockets: None, tcp_host: HostProcess
) -> None:
    """Paired by a typed name: announced at its address, it proves itself there
    (while it serves the entry) and the entry follows; found again, nothing happens."""
    assert tcp_host.tcp is not None
    address, port = tcp_host.tcp
    entry = await pair(hass, f"localhost:{port}", tcp_host.pairing_key)
    assert entry.unique_id == tcp_host.identity

    result = await discover(hass, announced(tcp_host))
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "host_already_configured"
    await hass.async_block_till_done()
    assert entry.data[CONF_HOST_ADDRESS] == f"{address}:{port}"
    assert entry.state is ConfigEntryState.LOADED
    host_link = entry.runtime_data.engine.host.link

    result = await discover(hass, announced(tcp_host))
    assert result["reason"] == "host_already_configured"
    await hass.async_block_till_done()
    assert entry.runtime_data.engine.host.link is host_link  # not reloaded
    assert not hass.config_entries.flow.async_progress()
    assert await converse(hass, "Hello") == "Hello from the simulator."


async def test_one_entry_per_host(
    hass: HomeAssistant, ha_base: None, lan_sockets: None, tcp_host: HostProcess
) -> None:
    """A host already set up cannot be added again, by its address or by discovery."""
    assert tcp_host.tcp is not None
    address, port = tcp_host.tcp
    await set_up_discovered(hass, announced(tcp_host), tcp_host.pairing_key)
    result = await hass.config_entries.flow.async_configure(
        await host_step(hass),
        {
            CONF_HOST_ADDRESS: f" {address}:{port} ",
            CONF_PAIRING_KEY: tcp_host.pairing_key,
        },
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "already_configured"
    assert len(hass.config_entries.async_entries(DOMAIN)) == 1


async def test_a_host_found_twice_is_offered_once(
    hass: HomeAssistant, ha_base: None
) -> None:
    """Two announcements of one host (two addresses) while it is offered: one flow."""
    first = await discover(hass, announcement("192.0.2.7", 7823))
    assert first["step_id"] == "zeroconf_confirm"
    second = await discover(hass, announcement("fd00::7", 7823))
    assert second["type"] is FlowResultType.ABORT
    assert second["reason"] == "already_in_progress"
    [flow] = hass.config_entries.flow.async_progress()
    assert flow["flow_id"] == first["flow_id"]


async def test_an_ipv6_host_is_offered_with_brackets(
    hass: HomeAssistant, ha_base: None
) -> None:
    """An IPv6 address and the port read as the host step takes them."""
    result = await discover(hass, announcement("fd00::7", None))
    assert result["description_placeholders"]["address"] == "[fd00::7]:7823"


async def test_an_announcement_without_identity_is_refused(
    hass: HomeAssistant, ha_base: None
) -> None:
    """A service of our type without an id cannot be told apart: not offered."""
    result = await discover(hass, announcement("192.0.2.7", 7823, {"name": "x"}))
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "discovered_without_id"
    assert not hass.config_entries.flow.async_progress()


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
async def test_a_host_announced_on_the_lan_is_set_up_from_its_announcement(
    hass: HomeAssistant, ha_base: None, hass_lan: Lan, tmp_path: Path
) -> None:
    """The board's real announcement, read by HA's zeroconf code, sets it up."""
    board = await hass.async_add_executor_job(hass_lan.add_board)
    async with LanBrowser(board.root_address) as browser:
        host, info = await browser.async_start_host(
            board, tmp_path / "a", hostname="board-a", model_text=model_text()
        )
    result = await set_up_discovered(hass, info, host.pairing_key)
    entry = result["result"]
    assert entry.unique_id == info.properties["id"] == host.identity
    assert entry.data[CONF_HOST_ADDRESS] == f"{board.address}:7823"
    assert result["title"] == "Rockchip LLM (board-a)"
    assert await converse(hass, "Hello") == "Hello from the simulator."


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
async def test_a_board_with_a_new_lease_is_followed_from_its_announcement(
    hass: HomeAssistant, ha_base: None, hass_lan: Lan, tmp_path: Path
) -> None:
    """The board's address changed: its new announcement moves the entry, which answers."""
    board = await hass.async_add_executor_job(hass_lan.add_board)
    async with LanBrowser(board.root_address) as browser:
        host, info = await browser.async_start_host(
            board, tmp_path / "a", hostname="board-a", model_text=model_text()
        )
        entry = (await set_up_discovered(hass, info, host.pairing_key))["result"]
        assert await converse(hass, "Hello") == "Hello from the simulator."
        await hass.async_add_executor_job(board.move)
        moved = await browser.async_announced_at(board.address)

    result = await discover(hass, moved)
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "host_already_configured"
    assert entry.data[CONF_HOST_ADDRESS] == f"{board.address}:7823"
    for _tenth in range(300):  # real time: the set-up talks to the board
        if entry.state is ConfigEntryState.LOADED:
            break
        if entry.state is ConfigEntryState.SETUP_RETRY:
            # The link had gone silent and its set-up was trying the old address
            # when the announcement came (HA reloads only a loaded or retrying
            # entry): the next retry, due in seconds, takes the new one.
            async_fire_time_changed(hass, dt_util.utcnow() + timedelta(seconds=10))
        await asyncio.sleep(0.1)
    assert await converse(hass, "Hello") == "Hello from the simulator."
