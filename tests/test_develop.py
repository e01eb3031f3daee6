"""scripts/develop: its port, its loopback-only default and a restart from the UI.

The real script runs a real Home Assistant (in a small configuration of its own);
a restart is asked for through HA's REST API as the UI's Settings -> System ->
Restart does.
"""

from collections.abc import Iterator
import json
import os
from pathlib import Path
import signal
import socket
import subprocess
import time
from typing import Any
import urllib.error
import urllib.parse
import urllib.request

import pytest

from .conftest import REPO

START_TIMEOUT_S = 180
"""Home Assistant's first start on a loaded CI machine."""
NPU_LIBRARIES = ("/usr/lib/librkllmrt.so", "/usr/local/lib/librkllmrt.so")
"""Where scripts/develop looks for Rockchip's runtime before it takes the simulator."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class _Instance:
    """A scripts/develop run and a client of its Home Assistant."""

    def __init__(self, config: Path, port: int, log: Path) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.config = config
        self.port = port
        self.log = log
        self.token = ""
        script = str(REPO / "scripts" / "develop")
        with log.open("w") as output:
            self.process = subprocess.Popen(
                [script, "--port", str(port), "--config", str(config)],
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def request(
        self, method: str, path: str, data: dict[str, Any] | None = None, *, form=False
    ) -> Any:
        body = None
        headers = {}
        if data is not None:
            if form:
                body = urllib.parse.urlencode(data).encode()
                headers["Content-Type"] = "application/x-www-form-urlencoded"
            else:
                body = json.dumps(data).encode()
                headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.base + path, body, headers, method=method)
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"null")

    def running(self) -> bool:
        """Whether HA answers and has finished starting."""
        try:
            return bool(self.request("GET", "/api/config")["state"] == "RUNNING")
        except OSError, urllib.error.URLError, ValueError:
            return False

    def wait(self, condition, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not condition():
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.5)

    def onboard(self) -> None:
        """Create the owner account and take its access token."""

        def answers() -> bool:
            try:
                self.request("GET", "/api/onboarding")
            except OSError, urllib.error.URLError:
                return False
            return True

        self.wait(answers, "the HTTP server")
        client_id = f"{self.base}/"
        code = self.request(
            "POST",
            "/api/onboarding/users",
            {
                "client_id": client_id,
                "name": "Developer",
                "username": "dev",
                "password": "dev-password",
                "language": "en",
            },
        )["auth_code"]
        self.token = self.request(
            "POST",
            "/auth/token",
            {"grant_type": "authorization_code", "code": code, "client_id": client_id},
            form=True,
        )["access_token"]


def _listeners(port: int) -> set[str]:
    """Local addresses (hex, as the kernel lists them) listening on port."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, _remote, state = line.split()[1:4]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


@pytest.fixture
def instance(tmp_path: Path, socket_enabled: None) -> Iterator[_Instance]:
    """scripts/develop on a free port; its process group is ended afterwards.

    The test talks HTTP to it on 127.0.0.1 (socket_enabled: pytest-socket's switch).
    """
    config = tmp_path / "config"
    config.mkdir()
    (config / "configuration.yaml").write_text("api:\nonboarding:\n")
    running = _Instance(config, _free_port(), tmp_path / "develop.log")
    try:
        yield running
    finally:
        if running.process.poll() is None:
            os.killpg(running.process.pid, signal.SIGKILL)
            running.process.wait()


def test_develop_port_loopback_and_restart(instance: _Instance) -> None:
    """It serves on the given port on 127.0.0.1 only, and comes back after a restart."""
    instance.onboard()
    instance.wait(instance.running, "Home Assistant to start")
    assert _listeners(instance.port) == {"0100007F"}  # 127.0.0.1, nothing else
    # Without an NPU library, a config folder of its own gets the simulated demo
    # model where the simulator's form looks for it.
    if not any(Path(path).exists() for path in NPU_LIBRARIES):
        demo = "rkllm/models/Qwen3 Demo (SIMULATED)/qwen3-demo-simulated.rkllm"
        assert (instance.config / demo).read_bytes() == (
            REPO / "config" / demo
        ).read_bytes()
        assert (
            "[develop] copied the simulated demo model into" in instance.log.read_text()
        )

    instance.request("POST", "/api/services/homeassistant/restart", {})
    instance.wait(lambda: not instance.running(), "Home Assistant to stop")
    instance.wait(instance.running, "Home Assistant to start again")
    log = instance.log.read_text()
    assert "[develop] Home Assistant asked for a restart: starting it again" in log
    assert (
        log.count(f"[develop] Home Assistant on http://127.0.0.1:{instance.port}") == 2
    )

    # Stopping the script stops Home Assistant with it.
    instance.process.send_signal(signal.SIGTERM)
    assert instance.process.wait(timeout=60) == 0
    with pytest.raises(ProcessLookupError):
        os.killpg(instance.process.pid, 0)
