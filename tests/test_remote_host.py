"""Home Assistant with a runtime host it did not start, whose folders it cannot see.

The host runs on the board's Python (3.11) outside Home Assistant's process tree,
in a mount namespace of its own: its library, models and caches live on a tmpfs
that only that namespace has. Home Assistant reaches it over a Unix socket or TCP
(TLS and the pairing key the host printed), so any file access that went around the
host would fail.
"""

import asyncio
from collections.abc import AsyncIterator
import contextlib
from dataclasses import dataclass
from datetime import timedelta
import os
from pathlib import Path
import re
import shutil
import signal
import socket
import subprocess
import time
from typing import Any

import pytest
from pytest_homeassistant_custom_component.common import (
    MockConfigEntry,
    async_fire_time_changed,
    async_mock_service,
)
import pytest_socket

from custom_components.rockchip_llm.const import (
    CONF_HOST_ADDRESS,
    CONF_PAIRING_KEY,
    DOMAIN,
)
from custom_components.rockchip_llm.link import HOST_FOLDER
from homeassistant import config_entries
from homeassistant.components import conversation
from homeassistant.components.homeassistant.exposed_entities import async_expose_entity
from homeassistant.config_entries import ConfigEntryState
from homeassistant.core import Context, HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
from homeassistant.setup import async_setup_component
from homeassistant.util import dt as dt_util

from .conftest import HOST_PYTHON, SIM_LIBRARIES, model_text
from .test_conversation import speech

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="mount namespaces (unshare --mount) need root"
)

AGENT = "conversation.qwen3_sim_conversation"
"""The agent the flow creates: the model's name and its kind."""
SLOW_REPLY = " ".join(f"w{i}" for i in range(300))


@dataclass
class ExternalHost:
    """A host in a mount namespace of its own, started apart from Home Assistant."""

    hidden: Path
    """Its folder: a tmpfs inside its namespace, an empty folder outside."""
    socket: Path
    holder_pid: int
    """The process that keeps the namespace (and its tmpfs) alive."""
    log: Path
    tcp_port: int | None = None
    """Listen on 127.0.0.1 at this port instead of the Unix socket."""
    pid: int | None = None

    @property
    def address(self) -> str:
        """What the user types into the flow."""
        return f"127.0.0.1:{self.tcp_port}" if self.tcp_port else str(self.socket)

    @property
    def pairing_key(self) -> str:
        """The pairing key a TCP host printed at its last start ("" on a socket)."""
        keys = re.findall(r"^pairing key (\S+)$", self.log.read_text(), re.MULTILINE)
        return keys[-1] if keys else ""

    @property
    def where(self) -> str:
        """How the integration names the host in messages."""
        return self.address if self.tcp_port else f"unix:{self.socket}"

    def _pid_file(self, name: str) -> Path:
        return self.socket.parent / f"{name}.pid"

    def start(self) -> None:
        """Start (or start again) the host inside the namespace, outside HA's tree."""
        self.socket.unlink(missing_ok=True)
        started = self.log.read_text().count("listening on") if self.log.exists() else 0
        pid_file = self._pid_file("host")
        pid_file.unlink(missing_ok=True)
        command = " ".join(
            [
                f"echo $$ > {pid_file};",
                f"exec {HOST_PYTHON} -I -S {HOST_FOLDER}",
                f"--library {self.hidden}/librkllmrt.so --models {self.hidden}/models",
                f"--cache {self.hidden}/cache",
                f"--tcp 127.0.0.1:{self.tcp_port} --state {self.hidden}/state"
                if self.tcp_port
                else f"--socket {self.socket}",
                f">> {self.log} 2>&1",
            ]
        )
        subprocess.run(
            [
                "setsid",
                "-f",
                "nsenter",
                f"--mount=/proc/{self.holder_pid}/ns/mnt",
                "sh",
                "-c",
                command,
            ],
            check=True,
        )
        deadline = time.monotonic() + 30
        while (
            self.log.read_text().count("listening on") if self.log.exists() else 0
        ) <= started:
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)
        self.pid = int(pid_file.read_text())

    def kill(self) -> None:
        """Kill the host at once (SIGKILL)."""
        assert self.pid is not None
        os.kill(self.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{self.pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        self.pid = None


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + 10
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _start_external_host(tmp_path: Path, transport: str) -> ExternalHost:
    """Start a host serving the simulator and one model from folders only it sees."""
    staging = tmp_path / "staging"
    (staging / "models" / "Qwen3 Sim").mkdir(parents=True)
    shutil.copy(SIM_LIBRARIES[max(SIM_LIBRARIES)], staging / "librkllmrt.so")
    (staging / "models" / "Qwen3 Sim" / "model.rkllm").write_text(
        model_text(
            replies=(
                (
                    "reply user turn on the kitchen => "
                    '<tool_call>{"name": "HassTurnOn", "arguments": {"name": "Kitchen"}}'
                    "</tool_call>"
                ),
                "reply tool * => Done.",
                f"reply user talk => {SLOW_REPLY}",
                "default => Hello from the simulator.",
            ),
            decode_ms_per_token=5,
        )
    )
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    sockets = tmp_path / "sockets"
    sockets.mkdir()
    holder_file = sockets / "holder.pid"
    subprocess.run(
        [
            "setsid",
            "-f",
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            (
                f"mount -t tmpfs rockchip-llm-hidden {hidden} && "
                f"cp -r {staging}/. {hidden}/ && echo $$ > {holder_file} && "
                "exec sleep 600"
            ),
        ],
        check=True,
    )
    _wait_for(holder_file)
    shutil.rmtree(staging)  # from now on, the files exist only on the host's tmpfs
    host = ExternalHost(
        hidden=hidden,
        socket=sockets / "host.sock",
        holder_pid=int(holder_file.read_text()),
        log=tmp_path / "host.log",
        tcp_port=_free_port() if transport == "tcp" else None,
    )
    host.start()
    return host


@pytest.fixture
def transport() -> str:
    """How Home Assistant reaches the host: "unix" (a socket file) or "tcp"."""
    return "unix"


@pytest.fixture
async def external_host(tmp_path: Path, transport: str) -> AsyncIterator[ExternalHost]:
    """A host in a namespace of its own, stopped (with its namespace) afterwards."""
    loop = asyncio.get_running_loop()
    host = await loop.run_in_executor(None, _start_external_host, tmp_path, transport)
    try:
        yield host
    finally:
        if host.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(host.pid, signal.SIGTERM)
        os.kill(host.holder_pid, signal.SIGKILL)


@pytest.fixture
def host_sockets() -> None:
    """Let this test reach a host on a Unix socket (HA's test plugin blocks it)."""
    pytest_socket.enable_socket()
    pytest_socket.socket_allow_hosts(["127.0.0.1"], allow_unix_socket=True)


@pytest.fixture
async def kitchen(hass: HomeAssistant) -> list[Any]:
    """An exposed kitchen light; returns the calls of light.turn_on."""
    assert await async_setup_component(hass, "homeassistant", {})
    assert await async_setup_component(hass, "conversation", {})
    assert await async_setup_component(hass, "intent", {})
    hass.states.async_set("light.kitchen", "off", {"friendly_name": "Kitchen"})
    async_expose_entity(hass, conversation.DOMAIN, "light.kitchen", True)
    return async_mock_service(hass, "light", "turn_on")


async def converse(hass: HomeAssistant, text: str) -> conversation.ConversationResult:
    """Say text to the agent."""
    return await conversation.async_converse(
        hass, text, None, Context(), agent_id=AGENT
    )


async def add_entry(hass: HomeAssistant, host: ExternalHost) -> MockConfigEntry:
    """Add the runtime host through the config flow, as a user does."""
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": config_entries.SOURCE_USER}
    )
    assert result["type"] is FlowResultType.MENU
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {"next_step_id": "host"}
    )
    assert result["step_id"] == "host"
    typed = {CONF_HOST_ADDRESS: host.address}
    if host.tcp_port:
        typed[CONF_PAIRING_KEY] = host.pairing_key
    result = await hass.config_entries.flow.async_configure(result["flow_id"], typed)
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "model"
    placeholders = result["description_placeholders"]
    assert placeholders["host"] == host.where
    assert placeholders["runtime_version"] == "1.3.0 (the simulator, no NPU)"
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {"model": "Qwen3 Sim"}
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["title"] == f"Rockchip LLM ({host.address})"
    await hass.async_block_till_done()
    entry = result["result"]
    assert entry.state is ConfigEntryState.LOADED
    return entry


async def system_cache_created(hass: HomeAssistant) -> str:
    """The creation time of the agent's system cache, as list_caches reports it."""
    response = await hass.services.async_call(
        DOMAIN, "list_caches", {}, blocking=True, return_response=True
    )
    assert response is not None
    [system] = [cache for cache in response["caches"] if cache["name"] == "system"]
    assert system["valid"]
    created: str = system["created_at"]
    return created


def mapped_by_tree(pid: int) -> list[str]:
    """Files named librkllm* mapped by pid or any of its descendants."""
    found: list[str] = []
    children = Path(f"/proc/{pid}/task/{pid}/children")
    for child in children.read_text().split() if children.exists() else ():
        found += mapped_by_tree(int(child))
    with contextlib.suppress(OSError):
        found += [
            line.split()[-1]
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
            if "librkllm" in line
        ]
    return found


@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_host_in_its_own_namespace_serves_home_assistant(
    hass: HomeAssistant,
    host_sockets: None,
    external_host: ExternalHost,
    kitchen: list[Any],
) -> None:
    """Set up through the flow, switch a light, list caches: nothing on HA's disk."""
    entry = await add_entry(hass, external_host)
    result = await converse(hass, "turn on the kitchen")
    assert speech(result) == "Done."
    assert len(kitchen) == 1
    await system_cache_created(hass)
    # The host's folders are not Home Assistant's: the cache and the library copy
    # it reports exist only in the host's namespace.
    response = await hass.services.async_call(
        DOMAIN, "list_caches", {}, blocking=True, return_response=True
    )
    assert response is not None
    [folder] = response["cache_dirs"]
    assert folder["path"] == str(external_host.hidden / "cache")
    assert not await hass.async_add_executor_job(
        (external_host.hidden / "cache").exists
    )
    assert not await hass.async_add_executor_job(any, external_host.hidden.iterdir())
    # No process Home Assistant started maps a runtime, and HA maps nothing of the
    # host's (this test process itself may map the simulator for binding tests).
    mapped = await hass.async_add_executor_job(mapped_by_tree, os.getpid())
    assert not [path for path in mapped if path.startswith(str(external_host.hidden))]
    children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children")
    for child in (await hass.async_add_executor_job(children.read_text)).split():
        assert await hass.async_add_executor_job(mapped_by_tree, int(child)) == []
    assert entry.runtime_data.engine.host.where == external_host.where


@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_restarts_of_home_assistant_and_of_the_host(
    hass: HomeAssistant,
    host_sockets: None,
    external_host: ExternalHost,
    kitchen: list[Any],
) -> None:
    """A reload (HA restart) and a killed host both come back with the cache reused."""
    entry = await add_entry(hass, external_host)
    created = await system_cache_created(hass)
    assert await hass.config_entries.async_reload(entry.entry_id)
    assert await system_cache_created(hass) == created

    # The host is killed in the middle of an answer: a spoken error, then the
    # entry waits for the host and comes back by itself.
    answer = hass.async_create_task(converse(hass, "talk"))
    session = next(iter(entry.runtime_data.agents.values())).session
    while not session.busy:
        await hass.async_add_executor_job(time.sleep, 0.01)
    await hass.async_add_executor_job(external_host.kill)
    result = await answer
    assert result.response.error_code is not None
    assert "runtime host" in speech(result)
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.SETUP_RETRY
    assert external_host.where in (entry.reason or "")
    state = hass.states.get(AGENT)
    assert state is None or state.state == "unavailable"

    await hass.async_add_executor_job(external_host.start)
    async_fire_time_changed(hass, dt_util.utcnow() + timedelta(minutes=2))
    await hass.async_block_till_done(wait_background_tasks=True)
    assert entry.state is ConfigEntryState.LOADED
    assert await system_cache_created(hass) == created  # loaded, not rebuilt
    result = await converse(hass, "turn on the kitchen")
    assert speech(result) == "Done."
    assert len(kitchen) == 1


async def test_host_not_reachable_at_start(
    hass: HomeAssistant, host_sockets: None, tmp_path: Path
) -> None:
    """No host at the address: not ready, with the address and the cause."""
    nobody = tmp_path / "nobody.sock"
    entry = MockConfigEntry(
        domain=DOMAIN, title="Rockchip LLM", data={CONF_HOST_ADDRESS: str(nobody)}
    )
    entry.add_to_hass(hass)
    assert await async_setup_component(hass, "homeassistant", {})
    await hass.config_entries.async_setup(entry.entry_id)
    assert entry.state is ConfigEntryState.SETUP_RETRY
    assert str(nobody) in (entry.reason or "")
    assert "No such file" in (entry.reason or "")


@pytest.mark.parametrize("transport", ["tcp"])
async def test_a_host_that_stalls_during_a_reload_is_connected_again_once(
    hass: HomeAssistant,
    host_sockets: None,
    external_host: ExternalHost,
    kitchen: list[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The link goes silent while the reload waits for the host: one set-up, not two.

    (A board's new address does the same: the old link dies during the reload
    its announcement started.)
    """
    entry = await add_entry(hass, external_host)
    connections = external_host.log.read_text().count(f"/{entry.entry_id} (")
    assert external_host.pid is not None
    os.kill(external_host.pid, signal.SIGSTOP)
    try:
        reload = hass.async_create_task(
            hass.config_entries.async_reload(entry.entry_id)
        )
        # The unload waits for the stalled host until the heartbeat gives up on it.
        while entry.state in (
            ConfigEntryState.LOADED,
            ConfigEntryState.UNLOAD_IN_PROGRESS,
        ):
            await asyncio.sleep(0.05)
    finally:
        os.kill(external_host.pid, signal.SIGCONT)
    assert await reload
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.LOADED
    assert "The link to the runtime host ended while unloading" in caplog.text
    assert "Reconnecting to the runtime host" not in caplog.text
    log = await hass.async_add_executor_job(external_host.log.read_text)
    assert log.count(f"/{entry.entry_id} (") == connections + 1
    assert speech(await converse(hass, "turn on the kitchen")) == "Done."
