"""A runtime host on TCP: its identity, TLS and the pairing check, with real processes.

Whoever does not prove the pairing key over TLS (plain text, no key, a wrong key,
a handshake replayed) gets nothing and is logged; an address that keeps failing is
refused for a while; the identity and the key are made once, in the state folder.
"""

from collections.abc import Callable, Iterator
import functools
import hashlib
from pathlib import Path
import re
import secrets
import socket
import ssl
import stat
import subprocess
import time
from typing import TypeVar

import pytest

from custom_components.rockchip_llm.host import cli, identity as identity_module
from custom_components.rockchip_llm.host.identity import (
    CERTIFICATE_FILE,
    PAIRING_KEY_FILE,
    PRIVATE_KEY_FILE,
    default_state_dir,
    format_pairing_key,
    parse_pairing_key,
)
from custom_components.rockchip_llm.host.pairing import (
    MAGIC,
    NONCE_BYTES,
    PROOF_BYTES,
    client_proof,
)
from custom_components.rockchip_llm.host.tcp_server import (
    FAILURE_LIMIT,
    FailureLimit,
    peer_text,
)
from custom_components.rockchip_llm.host.version import DEFAULT_PORT

from .host_process import (
    HOST_FOLDER,
    HostProcess,
    RawClient,
    allow_host_sockets,
    host_python,
    pair,
    peer_identity,
    recv_exactly,
    start_host,
    stop_host,
    tls_connect,
    tls_context,
)

T = TypeVar("T")


@pytest.fixture(autouse=True)
def host_sockets(socket_enabled: None) -> None:
    """Let the test connect to the host on TCP loopback."""
    allow_host_sockets()


@pytest.fixture
def tcp_host(tmp_path: Path) -> Iterator[HostProcess]:
    """A host on TCP 127.0.0.1 (a free port), its state folder in tmp_path."""
    host = start_host(tmp_path, tcp=True)
    try:
        yield host
    finally:
        stop_host(host)


def refusals(host: HostProcess, count: int = 1) -> list[str]:
    """The host's log lines of refused connections, once there are count of them."""
    deadline = time.monotonic() + 10
    while (
        len(found := re.findall(r"Refused 127\.0\.0\.1:\d+: (.*)", host.stderr()))
        < (count)
        and time.monotonic() < deadline
    ):
        time.sleep(0.02)
    return found


def closed_without_a_word(sock: socket.socket) -> bool:
    """Whether the host closes the connection and sends nothing before."""
    sock.settimeout(30)
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def test_identity_is_made_once_and_kept(tmp_path: Path) -> None:
    """The first start makes certificate, key and pairing key, printed; later ones reuse them."""
    host = start_host(tmp_path, tcp=True)
    stop_host(host)
    state = tmp_path / "state"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / PRIVATE_KEY_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE((state / PAIRING_KEY_FILE).stat().st_mode) == 0o600
    assert sorted(path.name for path in state.iterdir()) == sorted(
        [CERTIFICATE_FILE, PRIVATE_KEY_FILE, PAIRING_KEY_FILE]
    )
    der = ssl.PEM_cert_to_DER_cert((state / CERTIFICATE_FILE).read_text())
    assert host.identity == f"sha256:{hashlib.sha256(der).hexdigest()}"
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", host.identity)
    assert re.fullmatch(r"([0-9A-Z]{4}-){7}[0-9A-Z]{4}", host.pairing_key)
    assert (state / PAIRING_KEY_FILE).read_text() == host.pairing_key + "\n"
    log = host.stderr()
    assert "Made a new certificate and pairing key" in log
    assert f"Identity {host.identity}" in log
    assert f"Pairing key {host.pairing_key}" in log
    text = subprocess.run(
        ["openssl", "x509", "-in", str(state / CERTIFICATE_FILE), "-noout", "-text"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "prime256v1" in text or "P-256" in text

    again = start_host(tmp_path, tcp=True)
    try:
        assert (again.identity, again.pairing_key) == (host.identity, host.pairing_key)
        assert "Made a new" not in again.stderr()
        with again.client() as raw:
            assert raw.ok("models.scan")["models"]
    finally:
        stop_host(again)


def test_a_new_pairing_key_when_its_file_is_deleted(tmp_path: Path) -> None:
    """Deleting the pairing-key file makes a new key; the identity stays."""
    first = start_host(tmp_path, tcp=True)
    stop_host(first)
    (tmp_path / "state" / PAIRING_KEY_FILE).unlink()
    second = start_host(tmp_path, tcp=True)
    try:
        assert second.identity == first.identity
        assert second.pairing_key != first.pairing_key
        assert "Made a new pairing key" in second.stderr()
    finally:
        stop_host(second)


def _run_host(
    tmp_path: Path, extra: list[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a host that is expected to stop at once."""
    return subprocess.run(
        [
            host_python(),
            "-I",
            "-S",
            str(HOST_FOLDER),
            "--models",
            str(tmp_path / "models"),
            "--cache",
            str(tmp_path / "cache"),
            "--tcp",
            "127.0.0.1:0",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def test_without_openssl_the_host_says_to_install_it(tmp_path: Path) -> None:
    """No openssl command at the first start: a clear message, exit 1, nothing half made."""
    done = _run_host(
        tmp_path, ["--state", str(tmp_path / "state")], env={"PATH": "/nonexistent"}
    )
    assert done.returncode == 1
    assert "openssl command" in done.stderr
    assert "sudo apt install openssl" in done.stderr
    assert "listening" not in done.stdout
    assert list((tmp_path / "state").iterdir()) == []


@pytest.mark.parametrize(
    "damage", [CERTIFICATE_FILE, PRIVATE_KEY_FILE, PAIRING_KEY_FILE]
)
def test_a_damaged_state_file_is_named(tmp_path: Path, damage: str) -> None:
    """A damaged certificate, private key or pairing key: the host names the file
    and says what to do.
    """
    stop_host(start_host(tmp_path, tcp=True))
    (tmp_path / "state" / damage).write_text("not what it was\n")
    done = _run_host(tmp_path, ["--state", str(tmp_path / "state")])
    assert done.returncode == 1, done.stderr
    assert str(tmp_path / "state" / damage) in done.stderr
    assert "delete" in done.stderr
    assert "pair Home Assistant again" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_unusable_state_folder_is_named(tmp_path: Path) -> None:
    """A state folder that is a file: the host says so and names --state."""
    (tmp_path / "state").write_text("a file\n")
    done = _run_host(tmp_path, ["--state", str(tmp_path / "state")])
    assert done.returncode == 1
    assert f"state folder {tmp_path / 'state'} cannot be used" in done.stderr
    assert "--state" in done.stderr


def test_the_state_folder_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """systemd's $STATE_DIRECTORY first, else ~/.local/state/rockchip-llm."""
    systemd = tmp_path / "var-lib"
    done = subprocess.run(
        [
            host_python(),
            "-I",
            "-c",
            (
                "import sys; sys.path.insert(0, sys.argv[1]);"
                "import identity; print(identity.default_state_dir())"
            ),
            str(HOST_FOLDER),
        ],
        capture_output=True,
        text=True,
        check=True,
        env={"STATE_DIRECTORY": f"{systemd}:{tmp_path / 'other'}", "HOME": "/h"},
    )
    assert done.stdout.strip() == str(systemd)
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    assert default_state_dir() == Path.home() / ".local" / "state" / "rockchip-llm"


def test_tcp_listens_on_this_machine_unless_told() -> None:
    """--tcp alone is 127.0.0.1 on the default port; an address is taken as given."""
    parser = cli._parser()  # noqa: SLF001
    base = ["--models", "m", "--cache", "c"]
    assert parser.parse_args([*base, "--tcp"]).tcp == ("127.0.0.1", DEFAULT_PORT)
    assert parser.parse_args([*base, "--tcp", "0.0.0.0"]).tcp == (
        "0.0.0.0",
        DEFAULT_PORT,
    )
    assert parser.parse_args([*base, "--tcp", "192.0.2.7:9000"]).tcp == (
        "192.0.2.7",
        9000,
    )


def test_pairing_keys_are_read_as_people_type_them() -> None:
    """Case, spaces, dashes, O for 0 and I or L for 1 do not matter; the rest is refused."""
    key = secrets.token_bytes(identity_module.PAIRING_KEY_BYTES)
    text = format_pairing_key(key)
    assert len(text.replace("-", "")) == 32
    assert parse_pairing_key(text) == key
    assert parse_pairing_key(" " + text.lower().replace("-", " ") + "\n") == key
    assert parse_pairing_key(text.replace("0", "o").replace("1", "l")) == key
    assert parse_pairing_key("0" * 32) == bytes(20)
    with pytest.raises(ValueError, match="has 31"):
        parse_pairing_key(text[:-1])
    with pytest.raises(ValueError, match="'U' is not a character"):
        parse_pairing_key("U" * 32)


def test_the_failure_limit_forgets_with_time() -> None:
    """An address is refused after FAILURE_LIMIT failures until the oldest is a window old."""
    now = [1000.0]
    limit = FailureLimit(limit=3, window=60, clock=lambda: now[0])
    assert [limit.failed("192.0.2.1") for _ in range(3)] == [False, False, True]
    assert limit.refused("192.0.2.1")
    assert not limit.refused("192.0.2.2")
    now[0] += 59
    assert limit.refused("192.0.2.1")
    now[0] += 2
    assert not limit.refused("192.0.2.1")
    limit.failed("192.0.2.3")
    limit.succeeded("192.0.2.3")
    assert limit.failed("192.0.2.3") is False  # its count started again


def test_peer_addresses_are_written_as_people_do() -> None:
    """IPv4 as address:port, IPv6 in brackets."""
    assert peer_text(("192.0.2.1", 5000)) == "192.0.2.1:5000"
    assert peer_text(("2001:db8::1", 5000, 0, 0)) == "[2001:db8::1]:5000"


def test_a_plain_text_client_gets_nothing(tcp_host: HostProcess) -> None:
    """A hello in plain text: the connection closes without a byte; the host logs it."""
    assert tcp_host.tcp is not None
    with socket.create_connection(tcp_host.tcp) as sock:
        RawClient(sock).send({"id": 1, "op": "models.scan", "args": {}})
        assert closed_without_a_word(sock)
    [refused] = refusals(tcp_host)
    assert refused.startswith("no TLS handshake (plain text")
    tcp_host.assert_alive()


def test_a_client_without_the_key_gets_nothing(tcp_host: HostProcess) -> None:
    """TLS, then a request instead of the pairing: closed, nothing sent, logged."""
    assert tcp_host.tcp is not None
    with tls_connect(tcp_host.tcp) as sock:
        RawClient(sock).send({"id": 1, "op": "models.scan", "args": {}})
        assert closed_without_a_word(sock)
    assert refusals(tcp_host) == ["it did not start the pairing handshake"]


def test_a_wrong_key_gets_nothing(tcp_host: HostProcess) -> None:
    """A proof made with another key: closed before the host proves anything."""
    assert tcp_host.tcp is not None
    with tls_connect(tcp_host.tcp) as sock:
        identity = peer_identity(sock)
        sock.sendall(MAGIC + secrets.token_bytes(NONCE_BYTES))
        assert len(recv_exactly(sock, NONCE_BYTES)) == NONCE_BYTES
        sock.sendall(secrets.token_bytes(PROOF_BYTES))
        assert closed_without_a_word(sock)
    assert identity == tcp_host.identity
    [refused] = refusals(tcp_host)
    assert refused.startswith("its pairing proof is wrong")
    tcp_host.assert_alive()


def test_a_replayed_pairing_gets_nothing(tcp_host: HostProcess) -> None:
    """A client's messages of a good pairing, sent again over a new TLS connection:
    the host's new nonce makes the old proof worthless.
    """
    assert tcp_host.tcp is not None
    with tls_connect(tcp_host.tcp) as sock:
        recorded = pair(sock, tcp_host.key)
    with tls_connect(tcp_host.tcp) as sock:
        sock.sendall(recorded.opening)
        host_nonce = recv_exactly(sock, NONCE_BYTES)
        assert host_nonce != recorded.host_nonce
        sock.sendall(recorded.proof)
        assert closed_without_a_word(sock)
    [refused] = refusals(tcp_host)
    assert refused.startswith("its pairing proof is wrong")


def _recorded_session(address: tuple[str, int], key: bytes) -> bytes:
    """Pair over TLS as a client and return every byte it sent, as the network saw it."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = tls_context().wrap_bio(incoming, outgoing)
    sent = bytearray()
    with socket.create_connection(address, timeout=30) as sock:

        def flush() -> None:
            if data := outgoing.read():
                sent.extend(data)
                sock.sendall(data)

        def pump(step: Callable[[], T]) -> T:
            while True:
                try:
                    return step()
                except ssl.SSLWantReadError:
                    flush()
                    incoming.write(sock.recv(65536))

        def read(size: int) -> bytes:
            data = b""
            while len(data) < size:
                data += pump(functools.partial(tls.read, size - len(data)))
            return data

        pump(tls.do_handshake)
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        identity = f"sha256:{hashlib.sha256(der).hexdigest()}"
        nonce = secrets.token_bytes(NONCE_BYTES)
        tls.write(MAGIC + nonce)
        flush()
        host_nonce = read(NONCE_BYTES)
        tls.write(client_proof(key, identity, nonce, host_nonce))
        flush()
        assert len(read(PROOF_BYTES)) == PROOF_BYTES  # paired
    return bytes(sent)


def test_a_replayed_recording_of_the_network_gets_nothing(
    tcp_host: HostProcess,
) -> None:
    """The bytes of a good connection, replayed: TLS fails (new keys each time)."""
    assert tcp_host.tcp is not None
    recording = _recorded_session(tcp_host.tcp, tcp_host.key)
    with socket.create_connection(tcp_host.tcp) as sock:
        sock.sendall(recording)
        assert closed_without_a_word(sock)
    [refused] = refusals(tcp_host)
    assert refused.startswith("no TLS handshake")


def test_an_address_that_keeps_failing_is_refused(tcp_host: HostProcess) -> None:
    """After FAILURE_LIMIT wrong keys, even the right key is refused for a while."""
    assert tcp_host.tcp is not None
    for _ in range(FAILURE_LIMIT):
        with tls_connect(tcp_host.tcp) as sock:
            sock.sendall(MAGIC + secrets.token_bytes(NONCE_BYTES))
            recv_exactly(sock, NONCE_BYTES)
            sock.sendall(secrets.token_bytes(PROOF_BYTES))
            assert closed_without_a_word(sock)
    with tls_connect(tcp_host.tcp) as sock, pytest.raises((AssertionError, OSError)):
        pair(sock, tcp_host.key)
    log = tcp_host.stderr()
    assert len(refusals(tcp_host, FAILURE_LIMIT)) == FAILURE_LIMIT
    assert (
        f"Refusing 127.0.0.1 for up to 60 s: {FAILURE_LIMIT} failed connections" in log
    )
