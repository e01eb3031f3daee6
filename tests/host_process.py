"""A real runtime host process for tests: the machine's Python 3.11, the simulator.

The host runs ``python3.11 -I -S <host folder>`` as a user would start it, on a
Unix socket in the test's folder or on TCP 127.0.0.1 (TLS and the pairing key, its
state folder in the test's). :class:`RawClient` speaks the wire protocol with
blocking sockets, so a test can send anything, well formed or not.
"""

from collections.abc import Iterator
import contextlib
from dataclasses import dataclass, field
import functools
import json
import os
from pathlib import Path
import secrets
import select
import shutil
import signal
import socket
import ssl
import subprocess
import time
from typing import Any

import pytest
import pytest_socket

from custom_components.rockchip_llm.host import heartbeat, pairing
from custom_components.rockchip_llm.host.identity import identity_of, parse_pairing_key
from custom_components.rockchip_llm.host.version import HOST_VERSION, PROTOCOL_VERSION

from .conftest import PACKAGE, SIM_LIBRARIES, model_text

HOST_FOLDER = PACKAGE / "host"
MODEL = "Qwen3 Sim"
START_TIMEOUT = 30.0
"""Seconds a host may take to start listening (a loaded CI machine)."""
ANSWER_TIMEOUT = 30.0
"""Seconds a request may take to be answered."""
GONE_TIMEOUT = 10.0
"""Seconds a worker may take to be stopped after its client went away."""


def tls_context() -> ssl.SSLContext:
    """A client's TLS: 1.3, any certificate (the test checks the identity itself)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def tls_connect(address: tuple[str, int]) -> ssl.SSLSocket:
    """A TLS connection to a TCP host (not paired yet)."""
    sock = socket.create_connection(address, timeout=ANSWER_TIMEOUT)
    return tls_context().wrap_socket(sock)


def peer_identity(sock: ssl.SSLSocket) -> str:
    """The identity of the certificate a TLS connection shows."""
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    return identity_of(der)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    """Read size bytes; fewer when the other end closes first."""
    data = b""
    while len(data) < size:
        try:
            chunk = sock.recv(size - len(data))
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data


@dataclass
class Pairing:
    """What a client sent and received in one pairing handshake."""

    opening: bytes
    host_nonce: bytes
    proof: bytes
    host_proof: bytes


def pair(sock: ssl.SSLSocket, key: bytes) -> Pairing:
    """Pair as Home Assistant does; the host's proof is checked."""
    identity = peer_identity(sock)
    nonce = secrets.token_bytes(pairing.NONCE_BYTES)
    opening = pairing.MAGIC + nonce
    sock.sendall(opening)
    host_nonce = recv_exactly(sock, pairing.NONCE_BYTES)
    assert len(host_nonce) == pairing.NONCE_BYTES, "the host closed the pairing"
    proof = pairing.client_proof(key, identity, nonce, host_nonce)
    sock.sendall(proof)
    answer = recv_exactly(sock, pairing.PROOF_BYTES)
    assert answer == pairing.host_proof(key, identity, nonce, host_nonce), answer
    return Pairing(opening, host_nonce, proof, answer)


@functools.cache
def host_python() -> str:
    """The machine's own Python 3.11 or newer, not Home Assistant's (fails clearly)."""
    candidates = [
        shutil.which("python3.11"),
        "/usr/bin/python3.11",
        shutil.which("python3"),
        "/usr/bin/python3",
    ]
    found: list[tuple[tuple[int, int], str]] = []
    for candidate in dict.fromkeys(c for c in candidates if c):
        try:
            probe = subprocess.run(
                [
                    candidate,
                    "-I",
                    "-S",
                    "-c",
                    "import sys; print(sys.executable, *sys.version_info[:2])",
                ],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            )
        except OSError, subprocess.SubprocessError:
            continue
        executable, major, minor = probe.stdout.rsplit(maxsplit=2)
        if (int(major), int(minor)) >= (3, 11):
            found.append(((int(major), int(minor)), executable))
    if not found:
        pytest.fail(
            "no Python 3.11 or newer besides Home Assistant's was found (looked for "
            "python3.11 and python3 on PATH and in /usr/bin): the runtime host must "
            "be tested on the board's own Python"
        )
    return min(found)[1]  # the oldest: 3.11 where the machine has it


def allow_host_sockets() -> None:
    """Allow connections to Unix sockets and 127.0.0.1 for this test (HA's plugin
    allows only the loopback address); pytest_socket restores its guard afterwards."""
    pytest_socket.socket_allow_hosts(["127.0.0.1"], allow_unix_socket=True)


def write_sim_model(models_dir: Path, name: str = MODEL, **kwargs: Any) -> Path:
    """Write a simulated model folder: <models>/<name>/model.rkllm."""
    folder = models_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.rkllm"
    path.write_text(model_text(**kwargs))
    return path


def pid_gone(pid: int, parent: int | None = None) -> bool:
    """Whether a process ended and was reaped (a zombie still counts as there)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    state, ppid = stat.rsplit(")", 1)[1].split()[:2]
    if parent is not None and int(ppid) != parent:
        return True  # the pid was reused by another process
    return False


def wait_gone(
    pids: list[int], parent: int | None, timeout: float = GONE_TIMEOUT
) -> float:
    """Wait until every pid is gone; return the seconds it took (fails after timeout)."""
    start = time.monotonic()
    while not all(pid_gone(pid, parent) for pid in pids):
        if time.monotonic() - start > timeout:
            left = [pid for pid in pids if not pid_gone(pid, parent)]
            pytest.fail(f"worker processes {left} still there after {timeout:g} s")
        time.sleep(0.05)
    return time.monotonic() - start


def children(pid: int) -> set[int]:
    """The child processes of a process (every thread's)."""
    found: set[int] = set()
    with contextlib.suppress(FileNotFoundError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):
                found.update(int(p) for p in (task / "children").read_text().split())
    return found


class RawClient:
    """A client of the wire protocol over a blocking socket."""

    def __init__(self, sock: socket.socket, *, beats: bool = False) -> None:
        """Use a connected socket; beats: send the heartbeat while waiting (TCP)."""
        self.sock = sock
        self._beats = beats
        sock.settimeout(heartbeat.INTERVAL if beats else ANSWER_TIMEOUT)
        self._buffer = b""
        self._ids = 100

    def _recv(self, deadline: float) -> bytes:
        """One chunk (b"" at the end), beating while it waits (TCP)."""
        while True:
            try:
                return self.sock.recv(65536)
            except ConnectionResetError:
                return b""
            except TimeoutError:
                if not self._beats or time.monotonic() > deadline:
                    raise
                self.send_raw(heartbeat.HEARTBEAT)

    def close(self) -> None:
        """Close the connection."""
        self.sock.close()

    def send_raw(self, data: bytes) -> None:
        """Send bytes as they are (the host may already have closed)."""
        with contextlib.suppress(BrokenPipeError, ConnectionResetError, ssl.SSLError):
            self.sock.sendall(data)

    def send(self, message: Any) -> None:
        """Send one JSON line."""
        self.send_raw(json.dumps(message).encode() + b"\n")

    def read_line(self) -> bytes:
        """One line from the host; b"" at the end of the stream."""
        deadline = time.monotonic() + ANSWER_TIMEOUT
        while b"\n" not in self._buffer:
            chunk = self._recv(deadline)
            if not chunk:
                rest, self._buffer = self._buffer, b""
                return rest
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line + b"\n"

    def read(self) -> dict[str, Any] | None:
        """One message from the host (heartbeats skipped); None at the end."""
        line = heartbeat.HEARTBEAT
        while line == heartbeat.HEARTBEAT:
            line = self.read_line()
        if not line:
            return None
        message: dict[str, Any] = json.loads(line)
        return message

    def answer(self, request_id: int) -> dict[str, Any]:
        """The answer to a request (its text, events and other answers skipped)."""
        while (message := self.read()) is not None:
            if message.get("id") == request_id and "text" not in message:
                return message
        raise AssertionError(
            f"the host closed the connection before answering {request_id}"
        )

    def request(self, op: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send a request and return its answer message (ok or error)."""
        self._ids += 1
        self.send({"id": self._ids, "op": op, "args": args or {}})
        return self.answer(self._ids)

    def ok(self, op: str, args: dict[str, Any] | None = None) -> Any:
        """Send a request that must succeed; return its value."""
        answer = self.request(op, args)
        assert "ok" in answer, f"{op} failed: {answer}"
        return answer["ok"]

    def error(self, op: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send a request that must fail; return its error."""
        answer = self.request(op, args)
        assert "error" in answer, f"{op} did not fail: {answer}"
        error: dict[str, Any] = answer["error"]
        return error

    def hello(
        self,
        client: str = "test-client",
        *,
        version: str = HOST_VERSION,
        protocol: int = PROTOCOL_VERSION,
    ) -> dict[str, Any]:
        """Greet the host; return its answer message."""
        self.send(
            {
                "id": 1,
                "op": "hello",
                "args": {"protocol": protocol, "version": version, "client": client},
            }
        )
        return self.answer(1)

    def open_worker(self, model: str = MODEL) -> dict[str, Any]:
        """Start a worker for a model; return {"worker", "pid", "context_limit"}."""
        opened: dict[str, Any] = self.ok(
            "worker.open",
            {"model": model, "params": {"model_path": "", "sampling": {}}},
        )
        return opened

    def at_end(self, timeout: float = 10.0) -> bool:
        """Whether the host ends the connection within timeout (data before is skipped)."""
        deadline = time.monotonic() + timeout
        self.sock.settimeout(min(timeout, heartbeat.INTERVAL))
        try:
            while time.monotonic() < deadline:
                try:
                    if not self._recv(deadline):
                        return True
                except TimeoutError:
                    return False
                except ssl.SSLError:  # a TLS stream cut off without its close
                    return True
            return False
        finally:
            self.sock.settimeout(heartbeat.INTERVAL if self._beats else ANSWER_TIMEOUT)


@dataclass
class HostProcess:
    """A runtime host process and its folders."""

    process: subprocess.Popen[bytes]
    socket_path: Path | None
    tcp: tuple[str, int] | None
    models_dir: Path
    cache_dir: Path
    stderr_path: Path
    identity: str | None = None
    """A TCP host's identity, as it printed it."""
    pairing_key: str = ""
    """A TCP host's pairing key, as it printed it."""
    worker_pids: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int:
        """The host's process id."""
        return self.process.pid

    def stderr(self) -> str:
        """What the host wrote to its standard error so far."""
        return self.stderr_path.read_text(errors="replace")

    @property
    def key(self) -> bytes:
        """A TCP host's pairing key."""
        return parse_pairing_key(self.pairing_key)

    def connect(self) -> RawClient:
        """A new connection to the host (over TCP: TLS, identity checked, paired)."""
        if self.socket_path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(self.socket_path))
            return RawClient(sock)
        assert self.tcp is not None
        tls = tls_connect(self.tcp)
        assert peer_identity(tls) == self.identity
        pair(tls, self.key)
        return RawClient(tls, beats=True)

    @contextlib.contextmanager
    def client(self, client: str = "test-client") -> Iterator[RawClient]:
        """A greeted connection, closed afterwards."""
        raw = self.connect()
        try:
            answer = raw.hello(client)
            assert "ok" in answer, answer
            yield raw
        finally:
            raw.close()

    def open_worker(self, raw: RawClient, model: str = MODEL) -> int:
        """Start a worker on a connection; return its pid (remembered)."""
        pid = int(raw.open_worker(model)["pid"])
        self.worker_pids.append(pid)
        return pid

    def assert_alive(self) -> None:
        """The host still runs and greets a fresh client."""
        assert self.process.poll() is None, f"the host ended:\n{self.stderr()}"
        raw = self.connect()
        try:
            answer = raw.hello("liveness-check")
        finally:
            raw.close()
        assert "ok" in answer, answer


def start_host(
    tmp_path: Path,
    *,
    tcp: bool = False,
    library: Path = SIM_LIBRARIES[max(SIM_LIBRARIES)],
    extra: tuple[str, ...] = (),
    port: int = 0,
) -> HostProcess:
    """Start a host serving a simulated model; wait until it listens.

    On TCP (127.0.0.1, a free port unless given), its state folder is
    tmp_path/state.
    """
    models_dir = tmp_path / "models"
    cache_dir = tmp_path / "cache"
    if not models_dir.exists():
        write_sim_model(models_dir)
    stderr_path = tmp_path / "host-stderr.log"
    socket_path = None if tcp else tmp_path / "host.sock"
    where = (
        ["--tcp", f"127.0.0.1:{port}", "--state", str(tmp_path / "state")]
        if tcp
        else ["--socket", str(socket_path)]
    )
    command = [
        host_python(),
        "-I",
        "-S",
        str(HOST_FOLDER),
        "--models",
        str(models_dir),
        "--cache",
        str(cache_dir),
        "--library",
        str(library),
        *where,
        *extra,
    ]
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
            bufsize=0,  # unbuffered: select sees every line the host printed
        )
    assert process.stdout is not None
    printed: dict[str, str] = {}
    line = ""
    deadline = time.monotonic() + START_TIMEOUT
    while not line.startswith("listening on "):
        left = deadline - time.monotonic()
        ready, _, _ = select.select([process.stdout], [], [], max(left, 0))
        line = process.stdout.readline().decode() if ready else ""
        if line.startswith(("identity ", "pairing key ")):
            name, _, value = line.strip().rpartition(" ")
            printed[name] = value
        elif not line.startswith("listening on "):
            process.kill()
            process.wait()
            pytest.fail(f"the host did not start: {line!r}\n{stderr_path.read_text()}")
    address = None
    if tcp:
        host, port = (
            line.removeprefix("listening on ").strip().strip("()").split(", ")[:2]
        )
        address = (host.strip("'"), int(port))
    return HostProcess(
        process,
        socket_path,
        address,
        models_dir,
        cache_dir,
        stderr_path,
        identity=printed.get("identity"),
        pairing_key=printed.get("pairing key", ""),
    )


def stop_host(host: HostProcess) -> None:
    """Stop a host (SIGTERM); check that it and every worker it started ended."""
    process = host.process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            pytest.fail(f"the host did not stop on SIGTERM:\n{host.stderr()}")
    if process.stdout is not None:
        process.stdout.close()
    leftover = [pid for pid in host.worker_pids if not pid_gone(pid)]
    for pid in leftover:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not leftover, f"workers {leftover} outlived the host"
