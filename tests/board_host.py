"""A runtime host on a board of a test LAN (tests/lan.py): its own namespace and name.

The host runs ``python3 -I -S <host folder> --tcp ...`` as on a board, on the
simulator, with a hostname of its own (a UTS namespace), with or without zeroconf
for its Python; the test (Home Assistant) reaches it at the board's address.
"""

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
import os
from pathlib import Path
import select
import shutil
import signal
import subprocess
import time
from typing import IO, Self

from zeroconf import ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from custom_components.rockchip_llm.host.announce import SERVICE_TYPE, ZEROCONF_PATH_ENV
from custom_components.rockchip_llm.host.version import DEFAULT_PORT
from custom_components.rockchip_llm.link import HOST_FOLDER
from homeassistant.components.zeroconf.discovery import info_from_service
from homeassistant.helpers.service_info.zeroconf import ZeroconfServiceInfo

from .board_python import find_host_python, setup_folder
from .lan import REPO, Board

SIMULATOR = REPO / "tests" / "rkllm_sim" / "build" / "librkllm_sim_1_3.so"
START_TIMEOUT = 30.0
"""Seconds a host may take to start listening."""
LOG_TIMEOUT = 30.0
"""Seconds a line may take to appear in a host's log."""


def board_python() -> tuple[str, Path]:
    """The board's Python and its zeroconf folder (fails when setup made none)."""
    python = find_host_python()
    if python is None:
        raise RuntimeError("no Python 3.11-3.13 to run the runtime host on")
    zeroconf = setup_folder("zeroconf", python)
    if not (zeroconf / "zeroconf").is_dir():
        raise RuntimeError(
            f"no zeroconf for the board's Python in {zeroconf}: run scripts/setup"
        )
    return python, zeroconf


@dataclass
class BoardHost:
    """A host process on a board."""

    board: Board
    process: subprocess.Popen[bytes]
    log: Path
    port: int
    identity: str
    """The identity the host printed (sha256:… of its certificate)."""
    pairing_key: str
    """The pairing key the host printed."""

    @property
    def address(self) -> str:
        """What a user types into the flow."""
        return f"{self.board.address}:{self.port}"

    def log_text(self) -> str:
        """What the host logged so far."""
        return self.log.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = LOG_TIMEOUT) -> None:
        """Wait until the host logged text (fails with the log after timeout)."""
        deadline = time.monotonic() + timeout
        while text not in self.log_text():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise AssertionError(
                    f"the host never logged {text!r}:\n{self.log_text()}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop the host (SIGTERM) and wait for it."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(20)


def start_board_host(
    board: Board,
    folder: Path,
    *,
    hostname: str,
    model_text: str,
    zeroconf: bool = True,
    listen: str = "0.0.0.0",  # noqa: S104 - every address of the board's namespace
    port: int = DEFAULT_PORT,
    extra_env: Mapping[str, str] | None = None,
    model: str = "Qwen3 Sim",
) -> BoardHost:
    """Start a host on the board serving one simulated model (its folder's name).

    Without zeroconf the host's Python finds none (an empty folder is searched).
    """
    folder.mkdir(parents=True, exist_ok=True)
    model_folder = folder / "models" / model
    model_folder.mkdir(parents=True, exist_ok=True)
    (model_folder / "model.rkllm").write_text(model_text)
    library = folder / "librkllmrt.so"
    shutil.copy(SIMULATOR, library)
    python, zeroconf_folder = board_python()
    if not zeroconf:
        zeroconf_folder = folder / "no-zeroconf"
        zeroconf_folder.mkdir(exist_ok=True)
    log = folder / "host.log"
    env = {
        **os.environ,
        "PYTHONDONTWRITEBYTECODE": "1",
        ZEROCONF_PATH_ENV: str(zeroconf_folder),
        **(extra_env or {}),
    }
    with log.open("ab") as stderr:
        process = board.start(
            [
                python,
                "-I",
                "-S",
                str(HOST_FOLDER),
                "--library",
                str(library),
                "--models",
                str(folder / "models"),
                "--cache",
                str(folder / "cache"),
                "--tcp",
                f"{listen}:{port}",
                "--state",
                str(folder / "state"),
            ],  # fmt: skip
            hostname=hostname,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
        )
    printed = _wait_listening(process, log)
    return BoardHost(
        board, process, log, port, printed["identity"], printed["pairing key"]
    )


async def async_start_board_host(
    board: Board, folder: Path, *, hostname: str, model_text: str
) -> BoardHost:
    """Start a host on the board (start_board_host), off the event loop."""
    return await asyncio.to_thread(
        partial(
            start_board_host, board, folder, hostname=hostname, model_text=model_text
        )
    )


def _wait_listening(process: subprocess.Popen[bytes], log: Path) -> dict[str, str]:
    """Wait for "listening on"; return what the host printed before (identity, key).

    Read from the pipe itself: a buffered reader would take several lines at once
    and leave select nothing to report.
    """
    stdout: IO[bytes] | None = process.stdout
    assert stdout is not None
    printed: dict[str, str] = {}
    pending = b""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        while b"\n" not in pending:
            left = max(deadline - time.monotonic(), 0)
            ready, _, _ = select.select([stdout], [], [], left)
            chunk = os.read(stdout.fileno(), 4096) if ready else b""
            if not chunk:
                raise AssertionError(
                    f"the host did not start: {pending!r}\n{log.read_text()}"
                )
            pending += chunk
        raw, pending = pending.split(b"\n", 1)
        line = raw.decode()
        if line.startswith("listening on "):
            return printed
        if not line.startswith(("identity ", "pairing key ")):
            raise AssertionError(f"the host did not start: {line!r}\n{log.read_text()}")
        name, _, value = line.strip().rpartition(" ")
        printed[name] = value


class LanBrowser:
    """Home Assistant's view of the hosts announced on one link (its zeroconf).

    The zeroconf package of Home Assistant browses on the root side of the link,
    and each announcement is read with HA's own ``info_from_service``: what its
    zeroconf integration hands to a config flow.
    """

    def __init__(self, interface: str) -> None:
        """Browse on the link of this address of the root namespace."""
        self._interface = interface
        self._changes: asyncio.Queue[tuple[str, ServiceStateChange]] = asyncio.Queue()
        self._zeroconf: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None

    async def __aenter__(self) -> Self:
        """Start browsing."""
        self._zeroconf = AsyncZeroconf(interfaces=[self._interface])
        self._browser = AsyncServiceBrowser(
            self._zeroconf.zeroconf, SERVICE_TYPE, handlers=[self._changed]
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Stop browsing."""
        assert self._browser is not None and self._zeroconf is not None
        await self._browser.async_cancel()
        await self._zeroconf.async_close()

    def _changed(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        self._changes.put_nowait((name, state_change))

    async def _async_next(self, *wanted: ServiceStateChange) -> str:
        async with asyncio.timeout(LOG_TIMEOUT):
            while True:
                name, change = await self._changes.get()
                if change in wanted:
                    return name

    async def async_added(self) -> ZeroconfServiceInfo:
        """Wait for the next host announced; return what HA's zeroconf makes of it."""
        return await self._async_info(await self._async_next(ServiceStateChange.Added))

    async def async_announced_at(self, address: str) -> ZeroconfServiceInfo:
        """Wait for a host announced (new or updated: HA's zeroconf takes both) at address."""
        async with asyncio.timeout(LOG_TIMEOUT):
            while True:
                name = await self._async_next(
                    ServiceStateChange.Added, ServiceStateChange.Updated
                )
                if str((info := await self._async_info(name)).ip_address) == address:
                    return info

    async def _async_info(self, name: str) -> ZeroconfServiceInfo:
        assert self._zeroconf is not None
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        assert await info.async_request(self._zeroconf.zeroconf, 3000), name
        found = info_from_service(info)
        assert found is not None, info
        return found

    async def async_start_host(
        self, board: Board, folder: Path, *, hostname: str, model_text: str
    ) -> tuple[BoardHost, ZeroconfServiceInfo]:
        """Start a host on the board; return it with its announcement as HA reads it."""
        host = await async_start_board_host(
            board, folder, hostname=hostname, model_text=model_text
        )
        return host, await self.async_added()

    async def async_removed(self) -> str:
        """Wait for a host to withdraw its announcement; return its name."""
        return await self._async_next(ServiceStateChange.Removed)
