"""Home Assistant and a runtime host on TCP: pairing, a changed host, a stalled link.

A real host process (the board's Python) on 127.0.0.1 with TLS and its pairing key;
Home Assistant pairs it through the config flow, refuses it when its identity or
key changed (and pairs it again through the reauth flow), follows it to a new
address, and notices within seconds a link that stops delivering (a proxy in
between that stalls), while the answer in flight gets a spoken error.
"""

import asyncio
from collections.abc import AsyncIterator
import contextlib
from datetime import timedelta
from pathlib import Path
import re
import secrets
import time
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
from custom_components.rockchip_llm.diagnostics import (
    async_get_config_entry_diagnostics,
)
from custom_components.rockchip_llm.host.identity import (
    CERTIFICATE_FILE,
    PAIRING_KEY_FILE,
    PRIVATE_KEY_FILE,
    format_pairing_key,
    load_or_create,
)
from custom_components.rockchip_llm.host.wire import HostIdentityChanged
from custom_components.rockchip_llm.link import TcpHost, async_connect
from homeassistant import config_entries
from homeassistant.config_entries import ConfigEntry, ConfigEntryState
from homeassistant.core import HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
from homeassistant.helpers import issue_registry as ir
from homeassistant.util import dt as dt_util

from .host_process import HostProcess, start_host, stop_host, wait_gone, write_sim_model
from .test_conversation import speech
from .test_remote_host import SLOW_REPLY, converse, host_sockets, kitchen

__all__ = ["host_sockets", "kitchen"]

REPLIES = (
    (
        "reply user turn on the kitchen => "
        '<tool_call>{"name": "HassTurnOn", "arguments": {"name": "Kitchen"}}'
        "</tool_call>"
    ),
    "reply tool * => Done.",
    f"reply user talk => {SLOW_REPLY}",
    "default => Hello from the simulator.",
)


def _start(tmp_path: Path, port: int = 0) -> HostProcess:
    if not (tmp_path / "models").exists():
        write_sim_model(tmp_path / "models", replies=REPLIES, decode_ms_per_token=20)
    return start_host(tmp_path, tcp=True, port=port)


@pytest.fixture
async def tcp_host(tmp_path: Path) -> AsyncIterator[HostProcess]:
    """A host on TCP 127.0.0.1, its state folder in tmp_path/state."""
    loop = asyncio.get_running_loop()
    host = await loop.run_in_executor(None, _start, tmp_path)
    try:
        yield host
    finally:
        await loop.run_in_executor(None, stop_host, host)


def address(host: HostProcess) -> str:
    """What the user types as the host's address."""
    assert host.tcp is not None
    return f"{host.tcp[0]}:{host.tcp[1]}"


async def refusals(hass: HomeAssistant, host: HostProcess, count: int) -> list[str]:
    """The host's logged refusals of 127.0.0.1, once there are count of them."""
    deadline = time.monotonic() + 10
    while True:
        log = await hass.async_add_executor_job(host.stderr)
        found = re.findall(r"Refused 127\.0\.0\.1:\d+: (.*)", log)
        if len(found) >= count or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.05)


async def host_step(hass: HomeAssistant) -> str:
    """Start the flow and choose "On a runtime host"; return the flow id."""
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": config_entries.SOURCE_USER}
    )
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {"next_step_id": "host"}
    )
    assert result["step_id"] == "host"
    return str(result["flow_id"])


async def pair(hass: HomeAssistant, where: str, key: str) -> ConfigEntry:
    """Add the host through the flow with its key; return the loaded entry."""
    flow_id = await host_step(hass)
    result = await hass.config_entries.flow.async_configure(
        flow_id, {CONF_HOST_ADDRESS: where, CONF_PAIRING_KEY: key}
    )
    assert result["step_id"] == "model", result
    result = await hass.config_entries.flow.async_configure(
        flow_id, {"model": "Qwen3 Sim"}
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    await hass.async_block_till_done()
    entry: ConfigEntry = result["result"]
    assert entry.state is ConfigEntryState.LOADED
    return entry


async def test_pairing_through_the_flow(
    hass: HomeAssistant, host_sockets: None, tcp_host: HostProcess, kitchen: list[Any]
) -> None:
    """No key, a malformed key and a wrong key are form errors; the printed key,
    typed loosely, pairs the host and pins its identity.
    """
    flow_id = await host_step(hass)
    attempts = [
        ({}, "pairing_key_required"),
        ({CONF_PAIRING_KEY: "1234-5678"}, "invalid_pairing_key"),
        (
            {CONF_PAIRING_KEY: format_pairing_key(secrets.token_bytes(20))},
            "host_pairing_refused",
        ),
    ]
    for typed, error in attempts:
        result = await hass.config_entries.flow.async_configure(
            flow_id, {CONF_HOST_ADDRESS: address(tcp_host), **typed}
        )
        assert result["type"] is FlowResultType.FORM
        assert result["step_id"] == "host"
        assert result["errors"] == {CONF_PAIRING_KEY: error}
        assert result["description_placeholders"]["key_file"] == PAIRING_KEY_FILE
    # Only the wrong key reached the host, which logged it (and told nothing).
    [refused] = await refusals(hass, tcp_host, 1)
    assert refused.startswith("its pairing proof is wrong")

    loosely = tcp_host.pairing_key.lower().replace("-", " ")
    result = await hass.config_entries.flow.async_configure(
        flow_id, {CONF_HOST_ADDRESS: address(tcp_host), CONF_PAIRING_KEY: loosely}
    )
    assert result["step_id"] == "model"
    assert result["description_placeholders"]["host"] == address(tcp_host)
    result = await hass.config_entries.flow.async_configure(
        flow_id, {"model": "Qwen3 Sim"}
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    await hass.async_block_till_done()
    entry = result["result"]
    assert entry.unique_id == tcp_host.identity
    assert dict(entry.data) == {
        CONF_HOST_ADDRESS: address(tcp_host),
        CONF_PAIRING_KEY: tcp_host.pairing_key,
        CONF_HOST_IDENTITY: tcp_host.identity,
    }
    assert entry.state is ConfigEntryState.LOADED
    result = await converse(hass, "turn on the kitchen")
    assert speech(result) == "Done."
    assert len(kitchen) == 1

    diagnostics = await async_get_config_entry_diagnostics(hass, entry)
    assert diagnostics["entry"]["data"][CONF_PAIRING_KEY] == "**REDACTED**"
    assert diagnostics["host"]["identity"] == tcp_host.identity
    assert tcp_host.pairing_key not in str(diagnostics)


async def test_an_address_that_is_none_is_a_form_error(
    hass: HomeAssistant, kitchen: list[Any]
) -> None:
    """A port out of range: the address field says so, nothing is connected."""
    flow_id = await host_step(hass)
    result = await hass.config_entries.flow.async_configure(
        flow_id, {CONF_HOST_ADDRESS: "192.0.2.1:70000", CONF_PAIRING_KEY: "x"}
    )
    assert result["errors"] == {CONF_HOST_ADDRESS: "invalid_host_address"}
    assert "70000" in result["description_placeholders"]["error"]


async def test_an_entry_without_a_pairing_key_asks_for_one(
    hass: HomeAssistant, host_sockets: None, tcp_host: HostProcess, kitchen: list[Any]
) -> None:
    """A TCP entry of an earlier release (address only): the reauth flow pairs it."""
    entry = MockConfigEntry(
        domain=DOMAIN, title="Rockchip LLM", data={CONF_HOST_ADDRESS: address(tcp_host)}
    )
    entry.add_to_hass(hass)
    await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.SETUP_ERROR
    assert "no usable pairing key" in (entry.reason or "")
    [flow] = hass.config_entries.flow.async_progress_by_handler(DOMAIN)
    assert flow["context"]["source"] == config_entries.SOURCE_REAUTH
    result = await hass.config_entries.flow.async_configure(
        flow["flow_id"], {CONF_PAIRING_KEY: tcp_host.pairing_key}
    )
    assert result["reason"] == "reauth_successful"
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.LOADED
    assert entry.unique_id == tcp_host.identity


async def test_the_same_host_at_another_address_is_not_added_twice(
    hass: HomeAssistant, host_sockets: None, tcp_host: HostProcess, kitchen: list[Any]
) -> None:
    """An entry paired with this identity (at an old address): the flow aborts."""
    MockConfigEntry(
        domain=DOMAIN,
        unique_id=tcp_host.identity,
        data={CONF_HOST_ADDRESS: "192.0.2.1:7823"},
    ).add_to_hass(hass)
    flow_id = await host_step(hass)
    result = await hass.config_entries.flow.async_configure(
        flow_id,
        {CONF_HOST_ADDRESS: address(tcp_host), CONF_PAIRING_KEY: tcp_host.pairing_key},
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "host_already_configured"


async def _restart(
    hass: HomeAssistant, host: HostProcess, tmp_path: Path, forget: list[str]
) -> HostProcess:
    """Stop the host, delete files of its state folder, start it on the same port."""
    await hass.async_add_executor_job(stop_host, host)
    for name in forget:
        await hass.async_add_executor_job((tmp_path / "state" / name).unlink)
    assert host.tcp is not None
    return await hass.async_add_executor_job(_start, tmp_path, host.tcp[1])


@pytest.mark.parametrize(
    ("forget", "reason"),
    [
        ([CERTIFICATE_FILE, PRIVATE_KEY_FILE, PAIRING_KEY_FILE], "another identity"),
        ([PAIRING_KEY_FILE], "did not accept the pairing key"),
    ],
    ids=["new-identity", "new-key"],
)
async def test_a_changed_host_is_refused_and_paired_again(
    hass: HomeAssistant,
    host_sockets: None,
    tmp_path: Path,
    kitchen: list[Any],
    forget: list[str],
    reason: str,
) -> None:
    """A reinstalled host (a new certificate) or a new key: the entry stops with a
    message that says so, the reauth flow (and its repair) asks for the new key,
    and the host is paired again.
    """
    host = await hass.async_add_executor_job(_start, tmp_path)
    try:
        entry = await pair(hass, address(host), host.pairing_key)
        old_identity = host.identity
        host = await _restart(hass, host, tmp_path, forget)
        assert (host.identity != old_identity) == (len(forget) > 1)
        await hass.async_block_till_done()
        async_fire_time_changed(hass, dt_util.utcnow() + timedelta(minutes=2))
        await hass.async_block_till_done(wait_background_tasks=True)

        assert entry.state is ConfigEntryState.SETUP_ERROR
        assert reason in (entry.reason or "")
        assert address(host) in (entry.reason or "")
        issue = ir.async_get(hass).async_get_issue(
            "homeassistant", f"config_entry_reauth_{DOMAIN}_{entry.entry_id}"
        )
        assert issue is not None
        [flow] = hass.config_entries.flow.async_progress_by_handler(DOMAIN)
        assert flow["context"]["source"] == config_entries.SOURCE_REAUTH
        assert flow["step_id"] == "reauth_confirm"
        form = await hass.config_entries.flow.async_configure(flow["flow_id"])
        placeholders = form["description_placeholders"]
        assert placeholders is not None
        assert placeholders["address"] == address(host)
        assert reason in placeholders["reason"]
        # The host logged the refused try (a new identity: Home Assistant hung up
        # before the pairing, see the test below; a new key: the proof was wrong).
        assert len(await refusals(hass, host, 1)) == 1

        result = await hass.config_entries.flow.async_configure(
            flow["flow_id"], {CONF_PAIRING_KEY: "0" * 32}
        )
        assert result["errors"] == {CONF_PAIRING_KEY: "host_pairing_refused"}
        result = await hass.config_entries.flow.async_configure(
            flow["flow_id"], {CONF_PAIRING_KEY: host.pairing_key}
        )
        assert result["type"] is FlowResultType.ABORT
        assert result["reason"] == "reauth_successful"
        await hass.async_block_till_done()
        assert entry.state is ConfigEntryState.LOADED
        assert entry.unique_id == host.identity
        assert entry.data[CONF_HOST_IDENTITY] == host.identity
        assert entry.data[CONF_PAIRING_KEY] == host.pairing_key
        assert (
            ir.async_get(hass).async_get_issue(
                "homeassistant", f"config_entry_reauth_{DOMAIN}_{entry.entry_id}"
            )
            is None
        )
        result = await converse(hass, "turn on the kitchen")
        assert speech(result) == "Done."
    finally:
        await hass.async_add_executor_job(stop_host, host)


async def reconfigure(hass: HomeAssistant, entry: ConfigEntry) -> Any:
    """Start the entry's reconfigure flow; return its first form."""
    return await hass.config_entries.flow.async_init(
        DOMAIN,
        context={
            "source": config_entries.SOURCE_RECONFIGURE,
            "entry_id": entry.entry_id,
        },
    )


async def test_nothing_is_sent_to_a_host_of_another_identity(
    host_sockets: None, tmp_path: Path
) -> None:
    """The identity is checked right after TLS: a host showing another certificate
    gets not one byte (no pairing proof to collect), and the error names both.
    """
    loop = asyncio.get_running_loop()
    identity, _made = await loop.run_in_executor(None, load_or_create, tmp_path)
    received = bytearray()
    hung_up = asyncio.Event()

    async def impostor(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        with contextlib.suppress(ConnectionError):
            received.extend(await reader.read())
        hung_up.set()
        writer.close()

    server = await asyncio.start_server(
        impostor, "127.0.0.1", 0, ssl=identity.server_context()
    )
    port = server.sockets[0].getsockname()[1]
    paired = "sha256:" + "0" * 64
    async with server:
        with pytest.raises(HostIdentityChanged) as refused:
            await async_connect(
                TcpHost(
                    "127.0.0.1",
                    port,
                    pairing_key=identity.pairing_key_text,
                    identity=paired,
                ),
                "client",
            )
        async with asyncio.timeout(10):
            await hung_up.wait()
    assert received == b""
    assert identity.identity in str(refused.value)
    assert paired in str(refused.value)
    assert refused.value.placeholders["address"] == f"127.0.0.1:{port}"


async def test_reconfigure_follows_the_host_to_a_new_port(
    hass: HomeAssistant, host_sockets: None, tmp_path: Path, kitchen: list[Any]
) -> None:
    """The same data reloads as before; a wrong key is a form error; the host moved
    to another port (same identity) is followed."""
    host = await hass.async_add_executor_job(_start, tmp_path)
    try:
        entry = await pair(hass, address(host), host.pairing_key)
        result = await reconfigure(hass, entry)
        assert result["step_id"] == "reconfigure_host"
        result = await hass.config_entries.flow.async_configure(
            result["flow_id"],
            {
                CONF_HOST_ADDRESS: address(host),
                CONF_PAIRING_KEY: host.pairing_key.lower(),
            },
        )
        assert result["reason"] == "reconfigure_successful"
        await hass.async_block_till_done()
        assert entry.state is ConfigEntryState.LOADED

        result = await reconfigure(hass, entry)
        result = await hass.config_entries.flow.async_configure(
            result["flow_id"],
            {CONF_HOST_ADDRESS: address(host), CONF_PAIRING_KEY: "0" * 32},
        )
        assert result["errors"] == {CONF_PAIRING_KEY: "host_pairing_refused"}

        # The host starts again on another port: the entry waits for it there.
        await hass.async_add_executor_job(stop_host, host)
        host = await hass.async_add_executor_job(_start, tmp_path)
        await hass.async_block_till_done()
        assert entry.state is ConfigEntryState.SETUP_RETRY
        result = await hass.config_entries.flow.async_configure(
            result["flow_id"],
            {CONF_HOST_ADDRESS: address(host), CONF_PAIRING_KEY: host.pairing_key},
        )
        assert result["reason"] == "reconfigure_successful"
        await hass.async_block_till_done()
        assert entry.state is ConfigEntryState.LOADED
        assert entry.data[CONF_HOST_ADDRESS] == address(host)
        assert entry.unique_id == host.identity
    finally:
        await hass.async_add_executor_job(stop_host, host)


class StallingProxy:
    """Forwards TCP to a host until it stalls: then nothing passes and nothing
    closes (as a dead network), and new connections are refused."""

    def __init__(self, target: tuple[str, int]) -> None:
        """Forward to target."""
        self._target = target
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self.port = 0
        self.stalled = False

    async def async_start(self) -> None:
        """Listen (on the same port as before, if there was one)."""
        self.stalled = False
        self._server = await asyncio.start_server(
            self._async_connection, "127.0.0.1", self.port
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _async_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        host_reader, host_writer = await asyncio.open_connection(*self._target)
        self._writers += [writer, host_writer]
        for source, sink in ((reader, host_writer), (host_reader, writer)):
            task = asyncio.create_task(self._async_pump(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _async_pump(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter
    ) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await source.read(65536):
                if not self.stalled:  # a stalled link loses what it is given
                    sink.write(data)
                    await sink.drain()
        if not self.stalled:
            sink.close()

    def stall(self) -> None:
        """Deliver nothing from now on; refuse new connections."""
        self.stalled = True
        assert self._server is not None
        self._server.close()  # (its wait_closed would wait for the connections)

    async def async_close(self) -> None:
        """Cut every connection and stop listening."""
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        self._writers = []
        if self._tasks:
            await asyncio.wait(self._tasks)


async def test_a_stalled_link_is_noticed_within_seconds(
    hass: HomeAssistant,
    host_sockets: None,
    tcp_host: HostProcess,
    kitchen: list[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The link stops delivering in the middle of a long answer: both ends notice by
    the heartbeat (not TCP's minutes), the answer ends with a spoken error, not cut
    short; the entry waits for the host and comes back with the link.
    """
    assert tcp_host.tcp is not None
    proxy = StallingProxy(tcp_host.tcp)
    await proxy.async_start()
    entry: ConfigEntry | None = None
    try:
        entry = await pair(hass, f"127.0.0.1:{proxy.port}", tcp_host.pairing_key)
        session = next(iter(entry.runtime_data.agents.values())).session
        worker_pid = session.worker.pid
        answer = hass.async_create_task(converse(hass, "talk"))
        while not session.busy:
            await asyncio.sleep(0.01)
        proxy.stall()
        async with asyncio.timeout(30):  # TCP alone would wait for minutes
            result = await answer
        assert result.response.error_code is not None
        assert speech(result) == (
            "Sorry, I lost the connection to the runtime host of my language model; "
            "please ask again in a moment"
        )
        assert "nothing arrived for 6 s" in caplog.text  # the cause, in the log
        await hass.async_block_till_done()
        assert entry.state is ConfigEntryState.SETUP_RETRY  # the proxy refuses now

        # The host gave the silent connection up too, and stopped its worker.
        async with asyncio.timeout(30):
            while "nothing arrived from it" not in await hass.async_add_executor_job(
                tcp_host.stderr
            ):
                await asyncio.sleep(0.1)
        await hass.async_add_executor_job(wait_gone, [worker_pid], tcp_host.pid)

        await proxy.async_close()
        await proxy.async_start()
        async_fire_time_changed(hass, dt_util.utcnow() + timedelta(minutes=2))
        await hass.async_block_till_done(wait_background_tasks=True)
        assert entry.state is ConfigEntryState.LOADED
        result = await converse(hass, "turn on the kitchen")
        assert speech(result) == "Done."
    finally:
        if entry is not None:
            await hass.config_entries.async_unload(entry.entry_id)
        await proxy.async_close()


async def test_an_entry_whose_link_stalled_unloads(
    hass: HomeAssistant, host_sockets: None, tcp_host: HostProcess, kitchen: list[Any]
) -> None:
    """Unloading while the link delivers nothing (before anyone noticed) ends: the
    heartbeat gives up the link, and what unloading waited for on it fails.
    """
    assert tcp_host.tcp is not None
    proxy = StallingProxy(tcp_host.tcp)
    await proxy.async_start()
    try:
        entry = await pair(hass, f"127.0.0.1:{proxy.port}", tcp_host.pairing_key)
        proxy.stall()
        async with asyncio.timeout(30):  # without the heartbeat: TCP's minutes
            assert await hass.config_entries.async_unload(entry.entry_id)
        assert entry.state is ConfigEntryState.NOT_LOADED
        await hass.async_block_till_done()
    finally:
        await proxy.async_close()
