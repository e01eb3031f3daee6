"""Shared fixtures: the simulator library, simulated model folders, HA glue."""

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator
import ctypes
import dataclasses
import json
import logging
import os
from pathlib import Path
import socket
import subprocess
import threading
from typing import Any
from unittest.mock import patch

import pytest
from pytest_homeassistant_custom_component.common import MockConfigEntry
import pytest_socket

from custom_components.rockchip_llm import link
from custom_components.rockchip_llm.const import DOMAIN
from custom_components.rockchip_llm.host.announce import ZEROCONF_PATH_ENV
from custom_components.rockchip_llm.host.cli import async_serve_socket
from custom_components.rockchip_llm.host.rkllm.abi import AbiFamily
from custom_components.rockchip_llm.host.rkllm.child import COVERAGE_PATH_ENV
from custom_components.rockchip_llm.host.rkllm.library import VerifiedLibrary
from custom_components.rockchip_llm.host.rkllm.probe import verify_and_copy_library
from custom_components.rockchip_llm.host.server import Host
from homeassistant import block_async_io
from homeassistant.config_entries import ConfigEntryState
from homeassistant.core import HomeAssistant
from homeassistant.helpers import issue_registry as ir
from homeassistant.setup import async_setup_component

from .board_python import find_host_python, setup_folder
from .entry_factory import runtime_entry
from .lan import BOARD_ADDRESSES, Lan

REPO = Path(__file__).parent.parent
PACKAGE = REPO / "custom_components" / DOMAIN
SIM_DIR = REPO / "tests" / "rkllm_sim"
SIM_BUILD = SIM_DIR / "build"
SIM_LIBRARIES = {
    AbiFamily.V1_2: SIM_BUILD / "librkllm_sim_1_2.so",
    AbiFamily.V1_3: SIM_BUILD / "librkllm_sim_1_3.so",
}

DEFAULT_REPLIES = (
    (
        "reply user turn on the {name} => "
        '<tool_call>{"name": "HassTurnOn", "arguments": {"name": "{name}"}}</tool_call>'
    ),
    (
        "reply user turn off the {name} => "
        '<tool_call>{"name": "HassTurnOff", "arguments": {"name": "{name}"}}</tool_call>'
    ),
    "reply tool * => Done.",
    "default => Hello from the simulator.",
)


def _host_python() -> str:
    python = find_host_python()
    if python is None:
        pytest.fail(
            "no Python 3.11-3.13 found to run the runtime host on (the board's)"
        )
    return python


HOST_PYTHON = _host_python()
"""The interpreter of every runtime host the tests start (Home Assistant's are 3.14)."""
HOST_COVERAGE = setup_folder("coverage", HOST_PYTHON)
"""coverage for the board's Python, from scripts/setup (child.COVERAGE_PATH_ENV)."""
HOST_ZEROCONF = setup_folder("zeroconf", HOST_PYTHON)
"""zeroconf for the board's Python, from scripts/setup (announce.ZEROCONF_PATH_ENV)."""


@pytest.fixture(autouse=True)
def host_on_board_python(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the runtime hosts Home Assistant starts on the board's Python, not HA's.

    Where scripts/setup installed coverage for it, the hosts and their workers are
    measured too (when the test run is). The hosts find zeroconf where setup put
    it, as a board's python3 with python3-zeroconf would (ROCKCHIP_LLM_ZEROCONF_PATH).
    """
    monkeypatch.setenv("ROCKCHIP_LLM_HOST_PYTHON", HOST_PYTHON)
    if HOST_COVERAGE.is_dir():
        monkeypatch.setenv(COVERAGE_PATH_ENV, str(HOST_COVERAGE))
    monkeypatch.setenv(ZEROCONF_PATH_ENV, str(HOST_ZEROCONF))


@pytest.fixture
async def in_process_host(
    hass: HomeAssistant, monkeypatch: pytest.MonkeyPatch
) -> AsyncGenerator[None]:
    """Run the hosts Home Assistant starts in this process, each on a thread.

    For the few tests that patch the host's own code (a disk that fails a write,
    a shorter watchdog): the link, the server and the workers are the real ones,
    only the host's process is this one.
    """
    threads: list[threading.Thread] = []

    def spawn(local: link.LocalHost) -> tuple[socket.socket, None, None]:
        ours, theirs = socket.socketpair()
        # Its records are this process's already: not sent over the link too.
        host = Host(dataclasses.replace(local.config, forward_logs=False))
        thread = threading.Thread(
            target=asyncio.run,
            args=(async_serve_socket(theirs, host),),
            name="in-process runtime host",
        )
        thread.start()
        threads.append(thread)
        return ours, None, None

    monkeypatch.setattr(link, "_spawn", spawn)
    yield
    for entry in hass.config_entries.async_entries(DOMAIN):
        if entry.state is ConfigEntryState.LOADED:
            await hass.config_entries.async_unload(entry.entry_id)
    for thread in threads:
        await hass.async_add_executor_job(thread.join, 30)
        assert not thread.is_alive(), "an in-process runtime host did not stop"


@pytest.fixture
def lan_sockets(socket_enabled: None) -> None:
    """Let the test reach hosts on 127.0.0.1 and on the boards of a test LAN."""
    pytest_socket.socket_allow_hosts(["127.0.0.1", *BOARD_ADDRESSES])


@pytest.fixture
def board_lan(lan_sockets: None) -> Generator[Lan]:
    """A LAN of the test's own (tests/lan.py: network namespaces, needs root)."""
    made = Lan()
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
async def hass_lan(hass: HomeAssistant, lan_sockets: None) -> AsyncGenerator[Lan]:
    """A LAN of the test's own for Home Assistant, removed after the entries unloaded."""
    made = Lan()
    try:
        yield made
    finally:
        for entry in hass.config_entries.async_entries(DOMAIN):
            await hass.config_entries.async_unload(entry.entry_id)
        await hass.async_add_executor_job(made.close)


@pytest.fixture(scope="session", autouse=True)
def build_simulator() -> None:
    """Build the simulator libraries once per session (make is incremental)."""
    subprocess.run(["make", "-s", "-C", str(SIM_DIR)], check=True)


@pytest.fixture(params=list(AbiFamily), ids=lambda family: f"abi{family}")
def abi_family(request: pytest.FixtureRequest) -> AbiFamily:
    """Run a test once per ABI family."""
    family: AbiFamily = request.param
    return family


@pytest.fixture
def sim_library(abi_family: AbiFamily) -> Path:
    """Path of the simulator library of the current ABI family."""
    return SIM_LIBRARIES[abi_family]


@pytest.fixture
def verified_library(sim_library: Path, tmp_path: Path) -> VerifiedLibrary:
    """The simulator as Home Assistant knows it: checked in a child, copied, not loaded."""
    return verify_and_copy_library(sim_library, tmp_path / "private")


def model_text(
    *,
    replies: tuple[str, ...] = DEFAULT_REPLIES,
    max_context_limit: int = 4096,
    prefill_ms_per_token: float = 0,
    decode_ms_per_token: float = 0,
    extra: tuple[str, ...] = (),
) -> str:
    """Return the text of a simulated model file."""
    lines = [
        "RKLLM-SIM 1",
        f"max_context_limit {max_context_limit}",
        f"prefill_ms_per_token {prefill_ms_per_token}",
        f"decode_ms_per_token {decode_ms_per_token}",
        *extra,
        *replies,
    ]
    return "\n".join(lines) + "\n"


type ModelWriter = Callable[..., Path]


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    """An empty models directory."""
    path = tmp_path / "models"
    path.mkdir()
    return path


@pytest.fixture
def write_model(models_dir: Path) -> ModelWriter:
    """Write a simulated model folder: write_model("Name", **model_text kwargs)."""

    def write(
        name: str = "Qwen3 Sim", file: str = "model.rkllm", **kwargs: object
    ) -> Path:
        folder = models_dir / name
        folder.mkdir(exist_ok=True)
        path = folder / file
        path.write_text(model_text(**kwargs))  # type: ignore[arg-type]
        return path

    return write


@pytest.fixture(autouse=True)
def auto_enable_custom_integrations(request: pytest.FixtureRequest) -> None:
    """Let Home Assistant load custom_components/ in every test that uses hass."""
    if "hass" in request.fixturenames:
        request.getfixturevalue("enable_custom_integrations")


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    """Where the integration keeps prompt caches."""
    return tmp_path / "cache"


@pytest.fixture
async def ha_base(hass: HomeAssistant) -> None:
    """Set up the core integrations an Assist agent runs with."""
    assert await async_setup_component(hass, "homeassistant", {})
    assert await async_setup_component(hass, "conversation", {})


type EntryFactory = Callable[..., Awaitable[MockConfigEntry]]


@pytest.fixture
def make_entry(
    hass: HomeAssistant,
    ha_base: None,
    sim_library: Path,
    models_dir: Path,
    cache_dir: Path,
    write_model: ModelWriter,
) -> EntryFactory:
    """Create and set up a config entry with one agent per options dict."""

    async def make(
        *agents: dict[str, Any],
        setup: bool = True,
        model_kwargs: dict[str, Any] | None = None,
        ai_tasks: tuple[dict[str, Any], ...] = (),
    ) -> MockConfigEntry:
        if not any(models_dir.iterdir()):
            write_model(**(model_kwargs or {}))
        entry = runtime_entry(
            library=sim_library,
            models_dir=models_dir,
            cache_dir=cache_dir,
            model="Qwen3 Sim",
            agents=agents or ({},),
            ai_tasks=ai_tasks,
        )
        entry.add_to_hass(hass)
        if setup:
            await hass.config_entries.async_setup(entry.entry_id)
            await hass.async_block_till_done()
        return entry

    return make


@pytest.fixture(autouse=True)
def sim_trace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The simulator's trace of this test: every process it runs in appends to it.

    Models run in worker processes, so the simulator's counters and run records
    are read from this file (RKLLM_SIM_TRACE, inherited by the workers).
    """
    path = tmp_path / "rkllm-sim-trace.log"
    monkeypatch.setenv("RKLLM_SIM_TRACE", str(path))
    return path


def _trace_lines(kind: str) -> list[list[str]]:
    """The trace lines of one kind, split into kind, pid, and the rest."""
    path = Path(os.environ["RKLLM_SIM_TRACE"])
    if not path.exists():
        return []
    return [
        line.split(" ", 3)
        for line in path.read_text().splitlines()
        if line.startswith(f"{kind} ")
    ]


def sim_counter(entry: MockConfigEntry, name: str) -> int:
    """A simulator counter, added up over the test's processes (workers included)."""
    assert entry.domain == DOMAIN
    return sum(int(fields[3]) for fields in _trace_lines("count") if fields[2] == name)


@pytest.fixture(autouse=True)
def reset_sim_counters() -> None:
    """Start every test with zeroed simulator counters (in this process)."""
    for path in SIM_LIBRARIES.values():
        if path.exists():
            ctypes.CDLL(str(path)).rkllm_sim_reset_counters()


def run_records(entry: MockConfigEntry) -> list[dict[str, Any]]:
    """The simulator's records of the runs of the first agent's worker, in order."""
    loaded = next(iter(entry.runtime_data.agents.values())).session
    pid = str(loaded.worker.pid)
    return [json.loads(fields[3]) for fields in _trace_lines("run") if fields[1] == pid]


def last_run_record(entry: MockConfigEntry) -> dict[str, Any]:
    """The simulator's record of the first agent's last run (in its worker)."""
    runs = run_records(entry)
    assert runs, "no run traced for the first agent's worker"
    return runs[-1]


def agent_issues(hass: HomeAssistant) -> list[ir.IssueEntry]:
    """The repairs of agents that could not start."""
    return [
        issue
        for (domain, issue_id), issue in ir.async_get(hass).issues.items()
        if domain == DOMAIN and issue_id.startswith("agent_failed_")
    ]


def agent_issue_error(hass: HomeAssistant) -> str:
    """The reason in the one agent repair there is."""
    [issue] = agent_issues(hass)
    assert issue.translation_key == "agent_failed"
    assert issue.translation_placeholders is not None
    return issue.translation_placeholders["error"]


# Where HA reports what an integration does wrong: blocking calls in the event loop,
# and use of deprecated or removed APIs ("Detected that custom integration ...").
REPORT_LOGGERS = ("homeassistant.util.loop", "homeassistant.helpers.frame")


class _ReportLog(logging.Handler):
    """Collects HA's reports about this integration."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "integration 'rockchip_llm'" in message:
            self.calls.append(message.split("\n", 1)[0])


@pytest.fixture(autouse=True)
def blocking_calls(request: pytest.FixtureRequest) -> Generator[list[str]]:
    """Run every Home Assistant test with HA's blocking-call detection on.

    A blocking call our code makes on the event loop, or HA's report of a deprecated
    API it uses, fails the test. HA leaves file I/O unchecked under unittest; it is
    checked here as in a real instance. Plain tests of the binding block on purpose
    and run without it.
    """
    if "hass" not in request.fixturenames:
        yield []
        return
    request.getfixturevalue("disable_block_async_io")  # restores after the test
    with patch.object(block_async_io, "_IN_TESTS", False):
        block_async_io.enable()
    log = _ReportLog()
    for name in REPORT_LOGGERS:
        logging.getLogger(name).addHandler(log)
    try:
        yield log.calls
    finally:
        for name in REPORT_LOGGERS:
            logging.getLogger(name).removeHandler(log)
    assert not log.calls, "Home Assistant reported:\n" + "\n".join(log.calls)
