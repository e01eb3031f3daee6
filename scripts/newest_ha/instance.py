"""A Home Assistant process on a configuration of its own, and its REST and websocket API."""

import asyncio
from collections.abc import Callable, Iterator, Mapping
import contextlib
from dataclasses import dataclass, field
import json
import os
from pathlib import Path
import socket
import subprocess
import sys
import time
from typing import Any
import urllib.error
import urllib.parse
import urllib.request

import aiohttp

ROOT = Path(__file__).resolve().parents[2]
SIMULATOR = ROOT / "tests" / "rkllm_sim" / "build" / "librkllm_sim_1_3.so"
RESTART_EXIT_CODE = 100
"""What hass exits with when a restart is asked (its supervisor starts it again)."""


DEPRECATION = "Detected that custom integration"


class CheckFailed(Exception):
    """A step of the check did not see what it expected."""


def expect(condition: bool, what: str) -> None:
    """Fail the check with what was expected when condition is false."""
    if not condition:
        raise CheckFailed(what)


def free_port() -> int:
    """Return a loopback port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for[T](what: str, probe: Callable[[], T | None], timeout: float = 120.0) -> T:
    """Poll probe until it returns something other than None."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            if (value := probe()) is not None:
                return value
        if time.monotonic() > deadline:
            raise CheckFailed(f"timed out waiting for {what}")
        time.sleep(0.2)


@dataclass
class Instance:
    """One configuration folder and the hass processes started on it, one at a time."""

    config_dir: Path
    port: int
    token: str | None = None
    logs: list[Path] = field(default_factory=list)
    _process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The instance's base URL."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        """The output of the running (or last) process."""
        return self.logs[-1]

    def start(self) -> None:
        """Start hass (no package installs: the venv holds what it needs)."""
        log = self.config_dir.parent / f"hass-{len(self.logs) + 1}.log"
        self.logs.append(log)
        with log.open("wb") as output:
            self._process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "homeassistant",
                    "--config",
                    str(self.config_dir),
                    "--skip-pip",
                ],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env={**os.environ, "ROCKCHIP_LLM_SIMULATOR": str(SIMULATOR)},
            )
        wait_for("the HTTP server", self._http_up)

    def _http_up(self) -> bool | None:
        if self._process is not None and self._process.poll() is not None:
            raise CheckFailed(f"hass ended with {self._process.returncode}")
        with urllib.request.urlopen(f"{self.url}/api/onboarding", timeout=5):
            return True

    def wait_running(self) -> None:
        """Wait until Home Assistant reports it has started."""
        wait_for(
            "Home Assistant to start",
            lambda: True if self.get("/api/config")["state"] == "RUNNING" else None,
        )

    def wait_exit(self, timeout: float = 120.0) -> int:
        """Wait for the process to end on its own; return its exit code."""
        assert self._process is not None
        code = self._process.wait(timeout)
        self._process = None
        return code

    def stop(self) -> None:
        """Stop the running process (as a service manager would)."""
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(60)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        form: bool = False,
    ) -> Any:
        """Call the REST API; return the decoded JSON answer."""
        headers = {}
        data = None
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if body is not None and form:
            data = urllib.parse.urlencode(body).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        elif body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(
            self.url + path, data=data, headers=headers, method=method
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as err:
            raise CheckFailed(
                f"{method} {path}: HTTP {err.code}: {err.read().decode()[:500]}"
            ) from err
        return json.loads(text) if text else None

    def get(self, path: str) -> Any:
        """GET a path of the REST API."""
        return self.request("GET", path)

    def post(self, path: str, body: Mapping[str, Any] | None = None) -> Any:
        """POST JSON to a path of the REST API."""
        return self.request("POST", path, body if body is not None else {})

    def command(self, message: Mapping[str, Any]) -> Any:
        """Send one websocket command (what the frontend asks); return its result."""

        async def ask() -> Any:
            async with (
                aiohttp.ClientSession() as session,
                session.ws_connect(f"{self.url}/api/websocket") as socket,
            ):
                await socket.receive_json()  # auth_required
                await socket.send_json({"type": "auth", "access_token": self.token})
                if (auth := await socket.receive_json())["type"] != "auth_ok":
                    raise CheckFailed(f"websocket authentication failed: {auth}")
                await socket.send_json({"id": 1, **message})
                answer = await socket.receive_json(timeout=120)
            if not answer.get("success"):
                raise CheckFailed(f"websocket {message['type']}: {answer}")
            return answer["result"]

        return asyncio.run(ask())

    def state(self, entity_id: str) -> dict[str, Any] | None:
        """Return the state object of an entity, None while it does not exist."""
        for state in self.get("/api/states"):
            if state["entity_id"] == entity_id:
                found: dict[str, Any] = state
                return found
        return None

    def entity_ids(self, prefix: str, suffix: str = "") -> list[str]:
        """Entity ids that start with prefix and end with suffix."""
        return [
            state["entity_id"]
            for state in self.get("/api/states")
            if state["entity_id"].startswith(prefix)
            and state["entity_id"].endswith(suffix)
        ]

    def log_lines(self) -> Iterator[str]:
        """Yield the lines every process on this configuration wrote so far."""
        for log in self.logs:
            yield from log.read_text(errors="replace").splitlines()


def onboard(ha: Instance) -> None:
    """Create the owner through onboarding and take an access token."""
    client_id = f"{ha.url}/"
    answer = ha.post(
        "/api/onboarding/users",
        {
            "client_id": client_id,
            "name": "Check",
            "username": "check",
            "password": "check-password",
            "language": "en",
        },
    )
    tokens = ha.request(
        "POST",
        "/auth/token",
        {
            "grant_type": "authorization_code",
            "code": answer["auth_code"],
            "client_id": client_id,
        },
        form=True,
    )
    ha.token = tokens["access_token"]


def converse(
    ha: Instance, agent: str, text: str, conversation_id: str | None = None
) -> dict[str, Any]:
    """Send a message to the agent; return the response part of the answer."""
    body = {"text": text, "agent_id": agent, "language": "en"}
    if conversation_id:
        body["conversation_id"] = conversation_id
    answer: dict[str, Any] = ha.post("/api/conversation/process", body)
    return answer


def speech(answer: dict[str, Any]) -> str:
    """Return the plain speech of a conversation answer."""
    text: str = answer["response"]["speech"]["plain"]["speech"]
    return text


def check_log(ha: Instance) -> None:
    """No deprecation report and no error of ours in any run's log."""
    bad = [
        line
        for line in ha.log_lines()
        if DEPRECATION in line
        or ("rockchip_llm" in line and (" ERROR " in line or "Traceback" in line))
    ]
    expect(not bad, "the log is clean:\n" + "\n".join(bad))
