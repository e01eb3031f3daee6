"""The host's side of a connection's life, with a real host process (Python 3.11).

A client that goes away has its workers stopped within seconds; a second client
is refused while one is connected, the same client reconnecting takes over; a
host and a client of different versions refuse each other and say what to update.
"""

import asyncio
from collections.abc import Iterator
import json
from pathlib import Path
import signal
import subprocess
import time

import pytest

from custom_components.rockchip_llm import link as link_module
from custom_components.rockchip_llm.host.version import (
    HOST_VERSION,
    PROTOCOL_VERSION,
    UPDATE_HOST,
    UPDATE_INTEGRATION,
    update_advice,
)
from custom_components.rockchip_llm.host.wire import HostBusy, HostVersionMismatch
from custom_components.rockchip_llm.link import TcpHost, UnixHost, async_connect

from .host_process import (
    GONE_TIMEOUT,
    HOST_FOLDER,
    MODEL,
    HostProcess,
    allow_host_sockets,
    children,
    host_python,
    pid_gone,
    start_host,
    stop_host,
    wait_gone,
)


@pytest.fixture(autouse=True)
def host_sockets(socket_enabled: None) -> None:
    """Let the test connect to the host's Unix socket and TCP loopback."""
    allow_host_sockets()


@pytest.fixture(params=["unix", "tcp"])
def runtime_host(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[HostProcess]:
    """A host on a Unix socket in tmp_path, or on TCP 127.0.0.1 (a free port)."""
    host = start_host(tmp_path, tcp=request.param == "tcp")
    try:
        yield host
    finally:
        stop_host(host)


def _address(host: HostProcess) -> UnixHost | TcpHost:
    if host.socket_path is not None:
        return UnixHost(host.socket_path)
    assert host.tcp is not None
    return TcpHost(*host.tcp, pairing_key=host.pairing_key, identity=host.identity)


def test_a_client_that_closes_has_its_workers_stopped(
    runtime_host: HostProcess,
) -> None:
    """Closing the connection stops every worker of that client within seconds."""
    with runtime_host.client() as raw:
        pids = [runtime_host.open_worker(raw), runtime_host.open_worker(raw)]
        assert children(runtime_host.pid) == set(pids)
    assert wait_gone(pids, runtime_host.pid) < GONE_TIMEOUT
    runtime_host.assert_alive()


_CLIENT_SCRIPT = """
import hashlib, importlib.util, json, os, socket, ssl, sys, time
where, key = json.loads(sys.argv[1]), bytes.fromhex(sys.argv[2])
if isinstance(where, str):
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(where)
else:  # TLS, then the pairing of the host's own pairing.py (standard library only)
    spec = importlib.util.spec_from_file_location("pairing", sys.argv[3])
    pairing = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pairing)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    sock = context.wrap_socket(socket.create_connection(tuple(where)))
    identity = "sha256:" + hashlib.sha256(sock.getpeercert(True)).hexdigest()
    nonce = os.urandom(pairing.NONCE_BYTES)
    sock.sendall(pairing.MAGIC + nonce)
    host_nonce = sock.recv(pairing.NONCE_BYTES)
    sock.sendall(pairing.client_proof(key, identity, nonce, host_nonce))
    assert len(sock.recv(pairing.PROOF_BYTES)) == pairing.PROOF_BYTES
file = sock.makefile("rwb")
def request(message):
    file.write(json.dumps(message).encode() + b"\\n")
    file.flush()
    while (line := file.readline()) == b"\\n" or "event" in (answer := json.loads(line)):
        pass  # heartbeats and the host's log records
    return answer
hello = {"protocol": %(protocol)d, "version": %(version)r, "client": "killed"}
assert "ok" in request({"id": 1, "op": "hello", "args": hello})
opened = request(
    {"id": 2, "op": "worker.open", "args": {"model": %(model)r, "params": {"model_path": "", "sampling": {}}}}
)
print(opened["ok"]["pid"], flush=True)
time.sleep(120)
"""


def test_a_killed_client_has_its_workers_stopped(runtime_host: HostProcess) -> None:
    """A client process killed with SIGKILL: its worker is gone within seconds."""
    where = (
        str(runtime_host.socket_path) if runtime_host.socket_path else runtime_host.tcp
    )
    script = _CLIENT_SCRIPT % {
        "protocol": PROTOCOL_VERSION,
        "version": HOST_VERSION,
        "model": MODEL,
    }
    key = runtime_host.key.hex() if runtime_host.tcp else ""
    client = subprocess.Popen(
        [
            host_python(),
            "-I",
            "-c",
            script,
            json.dumps(where),
            key,
            str(HOST_FOLDER / "pairing.py"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert client.stdout is not None
        pid = int(client.stdout.readline())
        runtime_host.worker_pids.append(pid)
        assert not pid_gone(pid, runtime_host.pid)
        client.send_signal(signal.SIGKILL)
        client.wait()
    finally:
        client.kill()
        client.wait()
        if client.stdout is not None:
            client.stdout.close()
    wait_gone([pid], runtime_host.pid)
    runtime_host.assert_alive()


def test_a_second_client_is_refused(runtime_host: HostProcess) -> None:
    """Another client id gets HostBusy, never the first one's model."""
    with runtime_host.client("first") as first:
        pid = runtime_host.open_worker(first)
        second = runtime_host.connect()
        answer = second.hello("second")
        assert answer["error"]["kind"] == "HostBusy", answer
        assert "in use by another Home Assistant" in answer["error"]["message"]
        assert second.at_end()
        second.close()
        # The first client and its worker are untouched.
        assert not pid_gone(pid, runtime_host.pid)
        result = first.ok("worker.run", {"worker": 1, "request": {"prompt": "hi"}})
        assert result["aborted"] is False
        assert children(runtime_host.pid) == {pid}


async def test_home_assistant_gets_host_busy(runtime_host: HostProcess) -> None:
    """Home Assistant's own client raises HostBusy with the host's message."""
    with (
        runtime_host.client("first"),
        pytest.raises(HostBusy, match="in use by another Home Assistant"),
    ):
        await async_connect(_address(runtime_host), "second")


def test_the_same_client_reconnecting_takes_over(runtime_host: HostProcess) -> None:
    """The same client id takes the place of its earlier connection and its workers."""
    first = runtime_host.connect()
    assert "ok" in first.hello("same")
    old_pid = runtime_host.open_worker(first)
    with runtime_host.client("same") as second:
        # The earlier connection asks for a worker while it is being taken over.
        first.send(
            {
                "id": 9,
                "op": "worker.open",
                "args": {"model": MODEL, "params": {"model_path": "", "sampling": {}}},
            }
        )
        assert first.at_end()
        wait_gone([old_pid], runtime_host.pid)
        deadline = time.monotonic() + GONE_TIMEOUT
        while children(runtime_host.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert children(runtime_host.pid) == set(), "a worker of the old link stayed"
        new_pid = runtime_host.open_worker(second)
        result = second.ok("worker.run", {"worker": 1, "request": {"prompt": "hi"}})
        assert result["aborted"] is False
        assert children(runtime_host.pid) == {new_pid}
    first.close()


def test_stopping_the_host_while_it_stops_workers(tmp_path: Path) -> None:
    """SIGTERM just after a client left: the host stops its workers and ends cleanly."""
    for attempt in range(3):
        folder = tmp_path / str(attempt)
        folder.mkdir()
        host = start_host(folder)
        with host.client() as raw:
            pid = host.open_worker(raw)
        host.process.send_signal(signal.SIGTERM)
        host.process.wait(timeout=30)
        assert pid_gone(pid), "the worker outlived its host"
        stop_host(host)
        assert host.process.returncode == 0
        assert "Traceback" not in host.stderr(), host.stderr()


@pytest.mark.parametrize(
    ("version", "advice"),
    [("99.0.0", UPDATE_HOST), ("0.0.1", UPDATE_INTEGRATION)],
)
def test_a_client_of_another_version_is_refused(
    runtime_host: HostProcess, version: str, advice: str
) -> None:
    """The host says which side is older and what to update."""
    raw = runtime_host.connect()
    answer = raw.hello(version=version)
    error = answer["error"]
    assert error["kind"] == "HostVersionMismatch", error
    assert f"the integration is version {version}" in error["message"]
    assert f"this one is {HOST_VERSION}" in error["message"]
    assert error["message"].endswith(advice)
    assert raw.at_end()
    raw.close()
    runtime_host.assert_alive()


async def test_home_assistant_of_another_version_is_refused(
    runtime_host: HostProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Home Assistant's client, newer than the host, is told to update the host."""
    monkeypatch.setattr(link_module, "HOST_VERSION", "99.0.0")
    with pytest.raises(HostVersionMismatch) as refused:
        await async_connect(_address(runtime_host), "newer")
    assert str(refused.value).endswith(UPDATE_HOST)
    assert "the integration is version 99.0.0" in str(refused.value)


@pytest.mark.parametrize(
    ("host_version", "advice"),
    [("0.0.1", UPDATE_HOST), ("99.0.0", UPDATE_INTEGRATION)],
)
async def test_a_host_of_another_version_is_refused(
    tmp_path: Path, host_version: str, advice: str
) -> None:
    """A host whose hello reports another version: the client refuses and closes."""
    closed = asyncio.Event()

    async def fake_host(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        hello = json.loads(await reader.readline())
        assert hello["op"] == "hello"
        ok = {"host_version": host_version, "protocol": 1, "cache_dir": "/nowhere"}
        writer.write(json.dumps({"id": hello["id"], "ok": ok}).encode() + b"\n")
        await writer.drain()
        if not await reader.read():
            closed.set()
        writer.close()

    path = tmp_path / "fake.sock"
    server = await asyncio.start_unix_server(fake_host, path=str(path))
    async with server:
        with pytest.raises(HostVersionMismatch) as refused:
            await async_connect(UnixHost(path), "client")
        async with asyncio.timeout(10):
            await closed.wait()  # the client hung up
    message = str(refused.value)
    assert f"is version {host_version}" in message
    assert f"this integration {HOST_VERSION}" in message
    assert message.endswith(advice)


def test_update_advice_compares_releases_as_numbers() -> None:
    """0.10.0 is newer than 0.9.0 (text comparison says otherwise)."""
    assert update_advice("0.10.0", "0.9.0") == UPDATE_INTEGRATION
    assert update_advice("0.9.0", "0.10.0") == UPDATE_HOST
    assert update_advice("1.2.0", "1.2.0") == UPDATE_HOST
