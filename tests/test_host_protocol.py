"""A real runtime host process (the machine's Python 3.11) against bad input.

The host serves only its own folders (names with ``..``, absolute paths and
symlinks out of them are refused), bounds every message, and survives malformed
frames; its socket file is not world-writable.
"""

from collections.abc import Iterator
import json
import os
from pathlib import Path
import random
import socket
import stat
import time
from typing import Any

import pytest

from custom_components.rockchip_llm.host.heartbeat import HEARTBEAT
from custom_components.rockchip_llm.host.wire import MAX_MESSAGE_BYTES

from .host_process import (
    GONE_TIMEOUT,
    MODEL,
    HostProcess,
    allow_host_sockets,
    children,
    start_host,
    stop_host,
    wait_gone,
)

STAGING = ".x.bin.tmp-0123456789abcdef"
"""A name of the staging pattern (what cache.staging hands out)."""


@pytest.fixture(autouse=True)
def host_sockets(socket_enabled: None) -> None:
    """Let the test connect to the host's Unix socket and TCP loopback."""
    allow_host_sockets()


@pytest.fixture
def runtime_host(tmp_path: Path) -> Iterator[HostProcess]:
    """A host on a Unix socket in tmp_path, serving one simulated model."""
    host = start_host(tmp_path)
    try:
        yield host
    finally:
        stop_host(host)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder beside the host's, with a cache pair and a file it must not touch."""
    folder = tmp_path / "outside"
    (folder / MODEL).mkdir(parents=True)
    for name in ("x.bin", "x.json", f"{MODEL}/x.bin", f"{MODEL}/x.json"):
        (folder / name).write_text("not the host's\n")
    return folder


def _outside_untouched(outside: Path) -> None:
    names = sorted(str(p.relative_to(outside)) for p in outside.rglob("*"))
    assert names == sorted(
        [MODEL, "x.bin", "x.json", f"{MODEL}/x.bin", f"{MODEL}/x.json"]
    )
    for path in outside.rglob("*"):
        if path.is_file():
            assert path.read_text() == "not the host's\n"


BAD_MODELS = ("..", "../outside", "/etc", "a/b", f"{MODEL}/..", ".runtime", "a\\b", "")
BAD_NAMES = ("..", "../x", "/x", "x/y", "X", "x.bin", "")


def test_cache_requests_stay_in_the_store(
    runtime_host: HostProcess, outside: Path
) -> None:
    """Model and cache names that leave the store are refused by every cache op."""
    cache = runtime_host.cache_dir
    with runtime_host.client() as raw:
        for op in ("cache.get", "cache.delete", "cache.touch", "cache.staging"):
            for model in BAD_MODELS:
                error = raw.error(op, {"model": model, "name": "x"})
                assert error["kind"] == "InvalidModelName", (op, model, error)
            for name in BAD_NAMES:
                error = raw.error(op, {"model": MODEL, "name": name})
                assert error["kind"] == "InvalidCacheName", (op, name, error)
        for model in BAD_MODELS:
            error = raw.error(
                "cache.make_room",
                {"model": model, "name": "x", "prompt_length": 1, "evictable": ""},
            )
            assert error["kind"] == "InvalidModelName", error
        assert raw.error("cache.list", {"model": ".."})["kind"] == "InvalidModelName"

        # Links in the store that point out of it, a model folder and cache files,
        # are never followed: read as missing or "not_a_file", replaced by a build.
        cache.mkdir(exist_ok=True)
        (cache / "linked").symlink_to(outside / MODEL, target_is_directory=True)
        (cache / MODEL).mkdir(exist_ok=True)
        (cache / MODEL / "x.bin").symlink_to(outside / "x.bin")
        (cache / MODEL / "x.json").symlink_to(outside / "x.json")
        assert raw.ok("cache.get", {"model": "linked", "name": "x"}) is None
        assert raw.ok("cache.delete", {"model": "linked", "name": "x"}) is False
        assert raw.ok("cache.touch", {"model": "linked", "name": "x"}) is None
        got = raw.ok("cache.get", {"model": MODEL, "name": "x"})
        assert (got["problem"], got["metadata"]) == ("not_a_file", None)
        assert raw.ok("cache.touch", {"model": MODEL, "name": "x"}) is None
        listed = raw.ok("cache.list", {"model": None})
        assert [(e["model"], e["problem"]) for e in listed] == [(MODEL, "not_a_file")]
        _outside_untouched(outside)
        staging = raw.ok("cache.staging", {"model": "linked", "name": "x"})
        assert Path(staging).parent == cache / "linked"
        assert not (cache / "linked").is_symlink()
        assert raw.ok("cache.delete", {"model": MODEL, "name": "x"}) is True
        assert sorted((cache / MODEL).iterdir()) == []
    _outside_untouched(outside)


def test_commit_and_discard_take_only_staging_paths_of_the_store(
    runtime_host: HostProcess, outside: Path
) -> None:
    """A staging path outside the store, or metadata naming another place, is refused."""
    cache = runtime_host.cache_dir
    with runtime_host.client() as raw:
        staging = raw.ok("cache.staging", {"model": MODEL, "name": "good"})
        assert Path(staging).parent == cache / MODEL
        (cache / "linked").symlink_to(outside / MODEL, target_is_directory=True)
        (outside / MODEL / STAGING).write_text("not the host's\n")
        bad_staging = [
            str(outside / MODEL / STAGING),  # absolute, elsewhere
            str(cache / MODEL / ".." / ".." / "outside" / MODEL / STAGING),
            str(cache / "linked" / STAGING),  # through a symlink out of the store
            f"{MODEL}/{STAGING}",  # relative
            str(cache / MODEL / "x.bin"),  # not a staging name
        ]
        metadata = _metadata("good")
        for path in bad_staging:
            error = raw.error("cache.commit", {"staging": path, "metadata": metadata})
            assert error["kind"] == "BadRequest", (path, error)
            assert "not a staging path" in error["message"], error
            error = raw.error("cache.discard", {"staging": path})
            assert error["kind"] == "BadRequest", (path, error)
            error = raw.error("cache.write_problem", {"staging": path})
            assert error["kind"] == "BadRequest", (path, error)
        Path(staging).write_bytes(b"a cache")  # as the runtime would write it
        for model, name in (("..", "good"), ("linked", "good"), (MODEL, "../x")):
            error = raw.error(
                "cache.commit",
                {
                    "staging": staging,
                    "metadata": {**metadata, "model": model, "name": name},
                },
            )
            assert error["kind"] in ("InvalidModelName", "InvalidCacheName"), error
    assert (outside / MODEL / STAGING).read_text() == "not the host's\n"
    assert not (outside / MODEL / "good.bin").exists()


def _metadata(name: str) -> dict[str, object]:
    return {
        "name": name,
        "model": MODEL,
        "created_at": "2026-01-01T00:00:00+00:00",
        "prompt_sha256": "0" * 64,
        "prompt_length": 1,
        "tokens": 1,
        "size_bytes": 1,
        "build_ms": 1.0,
        "source": "test",
        "model_fingerprint": {},
        "runtime_family": "1.3",
        "runtime_version": "1.3.0",
        "context": {},
        "version": 1,
    }


def test_workers_load_and_save_caches_only_in_the_store(
    runtime_host: HostProcess, outside: Path
) -> None:
    """load_prompt_cache and a run's save_prompt_cache refuse paths out of the store."""
    cache = runtime_host.cache_dir
    with runtime_host.client() as raw:
        runtime_host.open_worker(raw)
        (cache / MODEL).mkdir(parents=True, exist_ok=True)
        (cache / "linked").symlink_to(outside / MODEL, target_is_directory=True)
        (cache / MODEL / "leak.bin").symlink_to(outside / "x.bin")
        for path in (
            str(outside / MODEL / "x.bin"),
            str(cache / MODEL / ".." / ".." / "outside" / MODEL / "x.bin"),
            str(cache / "linked" / "x.bin"),
            f"{MODEL}/x.bin",
            "/etc/passwd",
        ):
            error = raw.error("worker.load_prompt_cache", {"worker": 1, "path": path})
            assert error["kind"] == "BadRequest", (path, error)
            assert "not a prompt cache of this host" in error["message"]
        # A cache file of the store that is a link: never handed to the runtime.
        leak = str(cache / MODEL / "leak.bin")
        error = raw.error("worker.load_prompt_cache", {"worker": 1, "path": leak})
        assert error["kind"] == "CacheContentMismatch", error
        assert "not_a_file" in error["message"]
        for path in (
            str(outside / MODEL / STAGING),
            str(cache / "linked" / STAGING),
            str(cache / MODEL / ".." / ".." / "outside" / MODEL / STAGING),
            str(cache / STAGING),  # the store's root is no model folder
            str(cache / ".runtime" / STAGING),  # the private library copy's folder
            str(cache / MODEL / "x.bin"),
        ):
            request = {"prompt": "hello", "save_prompt_cache": path}
            error = raw.error("worker.run", {"worker": 1, "request": request})
            assert error["kind"] == "BadRequest", (path, error)
        # The worker still answers: the refusals did not reach it.
        answer = raw.ok("worker.run", {"worker": 1, "request": {"prompt": "hi"}})
        assert answer["aborted"] is False
    _outside_untouched(outside)
    assert not (cache / STAGING).exists()
    assert not (cache / ".runtime" / STAGING).exists()


@pytest.mark.parametrize(
    "model",
    ["..", f"../models/{MODEL}", f"{MODEL}/model.rkllm", "/", f"/{MODEL}", "", "."],
)
def test_models_are_only_folders_of_the_models_folder(
    runtime_host: HostProcess, model: str
) -> None:
    """worker.open and models.fingerprint refuse model names that are paths."""
    absolute = str(runtime_host.models_dir / MODEL)
    with runtime_host.client() as raw:
        for name in (model, absolute):
            for op, args in (
                ("worker.open", {"model": name, "params": {"model_path": ""}}),
                ("models.fingerprint", {"model": name}),
            ):
                error = raw.error(op, args)
                assert "is not in the runtime host's models folder" in error["message"]
        assert children(runtime_host.pid) == set()  # no worker was started
        assert raw.ok("models.fingerprint", {"model": MODEL})["size"] > 0


@pytest.mark.parametrize("greeted", [False, True], ids=["before-hello", "after-hello"])
def test_a_line_over_the_limit_ends_that_connection(
    runtime_host: HostProcess, greeted: bool
) -> None:
    """A message longer than MAX_MESSAGE_BYTES ends its connection; the host goes on."""
    raw = runtime_host.connect()
    worker_pid = None
    if greeted:
        assert "ok" in raw.hello()
        worker_pid = runtime_host.open_worker(raw)
        # Just under the limit is a message like any other.
        padding = "x" * (MAX_MESSAGE_BYTES - 200)
        assert raw.ok("models.scan", {"padding": padding})["models"]
    raw.send_raw(b'{"id": 7, "op": "models.scan", "args": {"padding": "')
    raw.send_raw(b"x" * (MAX_MESSAGE_BYTES + 1))
    assert raw.at_end(), "the host kept reading a message over the limit"
    raw.close()
    if worker_pid is not None:
        wait_gone([worker_pid], runtime_host.pid)
    assert f"a message longer than {MAX_MESSAGE_BYTES} bytes" in runtime_host.stderr()
    runtime_host.assert_alive()


def test_the_socket_is_not_world_writable(tmp_path: Path) -> None:
    """The socket file is mode 660 even when the host starts with umask 000."""
    old = os.umask(0)
    try:
        host = start_host(tmp_path)
    finally:
        os.umask(old)
    try:
        assert host.socket_path is not None
        mode = host.socket_path.stat().st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o660, oct(mode)
        host.assert_alive()
    finally:
        stop_host(host)
    assert not host.socket_path.exists()  # removed when the host stopped


def test_the_host_replaces_only_a_stale_socket(tmp_path: Path) -> None:
    """A file (not a socket) where the socket goes is never replaced."""
    (tmp_path / "host.sock").write_text("precious\n")
    with pytest.raises(pytest.fail.Exception, match="not a socket; refusing"):
        start_host(tmp_path)
    assert (tmp_path / "host.sock").read_text() == "precious\n"


# Fuzz: malformed, truncated and random frames over fresh connections.

FUZZ_SEED = 1717
FUZZ_CONNECTIONS = (120, 120, 24)
"""Connections whose first frame is fuzzed; greeted ones; greeted with a worker."""
FUZZ_FRAMES = 16
"""Most frames sent over one greeted connection."""
_STRINGS = (
    "", "..", "../..", "/etc/passwd", MODEL, "x", "good", ".runtime", "\0", "\ud800",
    "\udfff", "é", "\n", "🙂", "a" * 5000, "X" * 65, f"{MODEL}/x.bin", STAGING,
)  # fmt: skip
_NUMBERS = (0, 1, -1, 2, 2**31, 2**63, -(2**64), 10**30, 0.5, -1.5, 1e308)
_BASE_ARGS: dict[str, dict[str, Any]] = {
    "hello": {"protocol": 1, "version": "0.1.0", "client": "fuzz"},
    "models.scan": {},
    "models.fingerprint": {"model": MODEL},
    "board.info": {},
    "board.npu_load": {},
    "worker.open": {"model": MODEL, "params": {"model_path": "", "sampling": {}}},
    "worker.close": {"worker": 1},
    "worker.abort": {"worker": 1},
    "worker.tail": {"worker": 1},
    "worker.run": {"worker": 1, "request": {"prompt": "hi", "max_new_tokens": 4}},
    "worker.load_prompt_cache": {"worker": 1, "path": "x"},
    "worker.release_prompt_cache": {"worker": 1},
    "worker.clear_kv_cache": {"worker": 1, "keep_system_prompt": True},
    "worker.set_chat_template": {
        "worker": 1,
        "system": "",
        "prefix": "",
        "postfix": "",
    },
    "worker.set_function_tools": {
        "worker": 1,
        "system": "",
        "tools_json": "[]",
        "tool_response_tag": "t",
    },
    "cache.list": {"model": None},
    "cache.get": {"model": MODEL, "name": "x"},
    "cache.delete": {"model": MODEL, "name": "x"},
    "cache.touch": {"model": MODEL, "name": "x"},
    "cache.make_room": {
        "model": MODEL,
        "name": "x",
        "prompt_length": 10,
        "evictable": "auto_",
    },
    "cache.staging": {"model": MODEL, "name": "x"},
    "cache.commit": {"staging": STAGING, "metadata": {}},
    "cache.discard": {"staging": STAGING},
    "cache.write_problem": {"staging": STAGING},
    "cache.disk_problem": {
        "model": MODEL,
        "name": "x",
        "needed_bytes": 10,
        "evictable": "auto_",
    },
    "cache.usage": {},
}


def _value(rng: random.Random, depth: int = 0) -> Any:
    """A random JSON value."""
    kind = rng.randrange(9 if depth < 3 else 5)
    if kind == 0:
        return rng.choice((None, True, False))
    if kind in (1, 2):
        return rng.choice(_NUMBERS)
    if kind in (3, 4):
        if rng.random() < 0.3:
            return "".join(
                chr(rng.randrange(1, 0x11000)) for _ in range(rng.randrange(8))
            )
        return rng.choice(_STRINGS)
    if kind in (5, 6):
        return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {
        rng.choice((*_STRINGS[:8], "prompt", "sampling", "worker")): _value(
            rng, depth + 1
        )
        for _ in range(rng.randrange(4))
    }


def _mutated(rng: random.Random, value: Any) -> Any:
    """A value with some of its (nested) fields replaced, removed or added."""
    if isinstance(value, dict):
        value = dict(value)
        for key in list(value):
            roll = rng.random()
            if roll < 0.15:
                del value[key]
            elif roll < 0.35:
                value[key] = _value(rng)
            else:
                value[key] = _mutated(rng, value[key])
        if rng.random() < 0.2:
            value[rng.choice(("extra", "model_path", "id"))] = _value(rng)
    return value


def _request_frame(rng: random.Random, request_id: int) -> bytes:
    """A request of a known op (or not) with fuzzed arguments."""
    op = rng.choice((*_BASE_ARGS, "nope", ""))
    args = _mutated(rng, _BASE_ARGS.get(op, {}))
    message: dict[str, Any] = {"id": request_id, "op": op, "args": args}
    if rng.random() < 0.1:
        message = _mutated(rng, message)
    text = json.dumps(message, ensure_ascii=rng.random() < 0.5)
    return text.encode("utf-8", "surrogatepass") + b"\n"


def _frame(rng: random.Random, request_id: int, requests: float) -> tuple[bytes, bool]:
    """One frame (a fuzzed request with that chance), and whether it is truncated."""
    roll = rng.random()
    if roll < requests:
        return _request_frame(rng, request_id), False
    roll = rng.random()
    if roll < 0.45:  # bytes of a request flipped, dropped or inserted
        data = bytearray(_request_frame(rng, request_id)[:-1])
        for _ in range(rng.randrange(1, 4)):
            at = rng.randrange(len(data) + 1)
            action = rng.randrange(3)
            if action == 0 and at < len(data):
                data[at] ^= 1 << rng.randrange(8)
            elif action == 1:
                del data[at : at + rng.randrange(1, 6)]
            else:
                data[at:at] = rng.randbytes(rng.randrange(1, 6))
        return bytes(data).replace(b"\n", b" ") + b"\n", False
    if roll < 0.65:  # truncated: the connection ends inside a message
        frame = _request_frame(rng, request_id)
        return frame[: rng.randrange(len(frame) - 1)], True
    return rng.choice(
        (
            HEARTBEAT,  # an empty line: skipped, as the heartbeat of a TCP link
            b"   \n",
            b"[]\n",
            b'"hello"\n',
            b"123\n",
            b"null\n",
            b"[" * 200_000 + b"\n",
            b'{"a":' * 200_000 + b"\n",
            b'{"id": 1e400, "op": "models.scan", "args": {}}\n',
            b'{"id": 1, "op": "models.scan", "args": []}\n',
            b'{"id": "1", "op": "models.scan", "args": {}}\n',
            b'{"id": 1, "op": 7, "args": {}}\n',
            b'{"id": 1, "op": "hello", "args": {"protocol": 1e400, "version": []}}\n',
            b'{"id": ' + b"9" * 5000 + b"}\n",
            b"\xff\xfe\x00{\n",
            rng.randbytes(rng.randrange(1, 200)).replace(b"\n", b"") + b"\n",
        )
    ), False


def _hello_frame() -> bytes:
    """A hello as a first frame."""
    return json.dumps(
        {"id": 1, "op": "hello", "args": _BASE_ARGS["hello"]}
    ).encode() + (b"\n")


def _message(line: bytes) -> dict[str, Any] | None:
    """The object a line holds as the host parses it, None if it holds none."""
    try:
        message = json.loads(line)
    except ValueError, RecursionError:
        return None
    return message if isinstance(message, dict) else None


def _is_request(line: bytes) -> bool:
    """Whether the host takes a line as a request (it ends the connection otherwise)."""
    message = _message(line)
    return (
        message is not None
        and isinstance(message.get("id"), int)
        and isinstance(message.get("op"), str)
        and isinstance(message.get("args", {}), dict)
    )


def _is_hello(line: bytes) -> bool:
    """Whether the host answers a first line (a hello with its arguments)."""
    message = _message(line)
    return (
        message is not None
        and message.get("op") == "hello"
        and isinstance(message.get("args"), dict)
    )


def _worker_pids(answer: dict[str, Any]) -> list[int]:
    ok = answer.get("ok")
    return (
        [ok["pid"]] if isinstance(ok, dict) and isinstance(ok.get("pid"), int) else []
    )


def _fuzz_connection(
    host: HostProcess, rng: random.Random, *, greet: bool, worker: bool
) -> tuple[list[int], int]:
    """Fuzz one connection; return the pids of the workers it started and the
    number of requests answered."""
    raw = host.connect()
    pids: list[int] = []
    answered = 0
    try:
        if greet:
            assert "ok" in raw.hello(f"fuzz-{rng.randrange(3)}")
            if worker:
                pids.append(host.open_worker(raw))
        else:
            frame, truncated = _frame(rng, 1, 0.5)
            raw.send_raw(frame)
            if frame == HEARTBEAT:  # skipped: the host still waits for a hello
                frame = _hello_frame()
                raw.send_raw(frame)
            if truncated or not _is_hello(frame):
                if truncated:
                    raw.sock.shutdown(socket.SHUT_WR)
                assert raw.at_end(), f"the host kept a connection after {frame[:200]!r}"
                return pids, answered
            answer = raw.read()
            assert answer is not None and ("ok" in answer or "error" in answer)
            if "error" in answer:
                assert raw.at_end(), f"the host kept a refused client: {answer}"
                return pids, answered
        for request_id in range(2, 2 + rng.randrange(1, FUZZ_FRAMES + 1)):
            frame, truncated = _frame(rng, request_id, 0.9)
            raw.send_raw(frame)
            if frame == HEARTBEAT:  # skipped; the next request is answered
                continue
            if truncated:
                raw.sock.shutdown(socket.SHUT_WR)
            if truncated or not _is_request(frame):
                assert raw.at_end(), f"the host kept a connection after {frame[:200]!r}"
                return pids, answered
            answer = raw.answer(json.loads(frame)["id"])
            assert "ok" in answer or "error" in answer, answer
            pids += _worker_pids(answer)
            answered += 1
    finally:
        raw.close()
    return pids, answered


@pytest.mark.timeout(600)
def test_fuzzed_frames_never_crash_the_host_or_leak_a_worker(
    runtime_host: HostProcess,
) -> None:
    """Random, mutated and truncated frames; after each connection the host greets
    a fresh client and has no worker left: every request got an answer, every bad
    frame ended its connection."""
    rng = random.Random(FUZZ_SEED)
    before, greeted, with_worker = FUZZ_CONNECTIONS
    plan = [(False, False)] * before + [(True, False)] * greeted
    plan += [(True, True)] * with_worker
    rng.shuffle(plan)
    answered = 0
    for greet, worker in plan:
        pids, count = _fuzz_connection(runtime_host, rng, greet=greet, worker=worker)
        answered += count
        runtime_host.worker_pids += pids
        wait_gone(pids, runtime_host.pid)
        deadline = time.monotonic() + GONE_TIMEOUT
        while children(runtime_host.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert children(runtime_host.pid) == set(), "a worker outlived its connection"
        runtime_host.assert_alive()
    assert answered >= 400  # the fuzz reached the requests, not only the framing
    log = runtime_host.stderr()
    assert "Traceback" not in log, log
    assert "never retrieved" not in log, log


def test_every_request_is_answered_even_with_lone_surrogates(
    runtime_host: HostProcess,
) -> None:
    """Text JSON allows but UTF-8 cannot carry (a lone surrogate) gets a clear refusal."""
    with runtime_host.client() as raw:
        for op, args in (
            ("cache.get", {"model": MODEL, "name": "\ud800"}),
            ("cache.get", {"model": "\udfff", "name": "x"}),
            ("models.fingerprint", {"model": "\ud800"}),
        ):
            error = raw.error(op, args)
            assert error["kind"] == "BadRequest", error
            assert "lone surrogates" in error["message"]
        # An error message that quotes what was sent is answered all the same.
        params = {"model_path": "", "sampling": {}, "\ud800": 1}
        error = raw.error("worker.open", {"model": MODEL, "params": params})
        assert error["kind"] == "BadRequest"
        assert "\ud800" in error["message"]
        runtime_host.open_worker(raw)
        error = raw.error(
            "worker.run", {"worker": 1, "request": {"prompt": "hi \ud800"}}
        )
        assert error == {
            "kind": "BadRequest",
            "message": "a prompt with a NUL character or a lone surrogate",
            "placeholders": {},
        }
        answer = raw.ok("worker.run", {"worker": 1, "request": {"prompt": "hi"}})
        assert answer["aborted"] is False
    runtime_host.assert_alive()
