"""WorkerModel: the binding in a worker process, against the simulator library."""

import asyncio
from collections.abc import Callable, Generator
import os
from pathlib import Path
import signal
import threading
import time

import pytest

from custom_components.rockchip_llm.host.rkllm.errors import (
    ModelClosedError,
    ModelFileMissing,
    ModelInitError,
    RunError,
    RunStalledError,
    WorkerDiedError,
)
from custom_components.rockchip_llm.host.rkllm.library import VerifiedLibrary
from custom_components.rockchip_llm.host.rkllm.protocol import encode
from custom_components.rockchip_llm.host.rkllm.runtime import (
    ModelParams,
    RunRequest,
    RunResult,
    Sampling,
)
from custom_components.rockchip_llm.host.rkllm.worker import WorkerModel

from .conftest import ModelWriter

type Opener = Callable[..., WorkerModel]


@pytest.fixture(params=["thread", "loop"])
def answers_loop(
    request: pytest.FixtureRequest,
) -> Generator[asyncio.AbstractEventLoop | None]:
    """Where workers read their answers: a thread, or an event loop (as on a host)."""
    if request.param == "thread":
        yield None
        return
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-loop")
    thread.start()
    try:
        yield loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


@pytest.fixture
def open_worker(
    verified_library: VerifiedLibrary, answers_loop: asyncio.AbstractEventLoop | None
) -> Generator[Opener]:
    """Start workers that are closed (process reaped, threads joined) after the test."""
    workers: list[WorkerModel] = []

    def open_(path: Path, *, init: bool = True, **options: object) -> WorkerModel:
        worker = WorkerModel(
            verified_library,
            f"m{len(workers)}",
            loop=answers_loop,
            **options,  # type: ignore[arg-type]
        )
        workers.append(worker)
        if init:
            worker.init(ModelParams(model_path=path)).result(timeout=30)
        return worker

    yield open_
    for worker in workers:
        worker.close()
        if worker.pid is not None:
            with pytest.raises(ChildProcessError):
                os.waitpid(worker.pid, os.WNOHANG)  # reaped, not a zombie
    assert not [t for t in threading.enumerate() if t.name.startswith("rkllm-worker")]


def run(
    worker: WorkerModel, prompt: str, **kwargs: object
) -> tuple[list[str], RunResult]:
    """Run to the end and return the streamed pieces and the result."""
    pieces: list[str] = []
    request = RunRequest(prompt=prompt, **kwargs)  # type: ignore[arg-type]
    result = worker.run(request, pieces.append).result(timeout=30)
    return pieces, result


def test_streams_a_reply_from_the_worker_process(
    write_model: ModelWriter, open_worker: Opener
) -> None:
    """Text streams piece by piece from another process; perf stats come back."""
    reply = "The kitchen light is on and the door is locked."
    worker = open_worker(write_model(replies=(f"default => {reply}",)))
    assert worker.pid is not None
    assert worker.pid != os.getpid()
    pieces, result = run(worker, "status?", sampling=Sampling(top_k=1))
    assert len(pieces) > 5
    assert "".join(pieces) == reply
    assert result.perf is not None
    assert result.perf.generate_tokens == len(pieces)
    assert worker.last_perf == result.perf
    assert not result.aborted


def test_every_call_crosses_the_process_boundary(
    write_model: ModelWriter, open_worker: Opener, tmp_path: Path
) -> None:
    """Tools, KV history, prompt caches and the KV size all work through the worker."""
    worker = open_worker(write_model())
    worker.set_function_tools("You are brief.", "[]").result(timeout=10)
    cache = tmp_path / "system.bin"
    run(worker, "hello", save_prompt_cache=cache)
    assert cache.exists()
    worker.load_prompt_cache(cache).result(timeout=10)
    _pieces, result = run(worker, "again", keep_history=True)
    assert result.kv_cache_size is not None and result.kv_cache_size > 0
    worker.clear_kv_cache(keep_system_prompt=True).result(timeout=10)
    worker.release_prompt_cache().result(timeout=10)
    worker.set_chat_template("sys", "<u>", "</u>").result(timeout=10)


def test_runtime_errors_keep_their_type(
    write_model: ModelWriter, open_worker: Opener
) -> None:
    """A failed init and a failed run arrive as the binding's own errors."""
    broken_path = write_model("Broken", extra=("init_error 1",))
    broken = open_worker(broken_path, init=False)
    with pytest.raises(ModelInitError, match="rkllm_init failed"):
        broken.init(ModelParams(model_path=broken_path)).result(timeout=30)
    worker = open_worker(write_model("Faulty", extra=("error_at_token 2",)))
    with pytest.raises(RunError) as caught:
        run(worker, "hello")
    assert caught.value.code == -1
    # the worker survived its model's error
    worker.set_chat_template("sys", "<u>", "</u>").result(timeout=10)


def test_a_model_file_gone_is_named(
    write_model: ModelWriter, open_worker: Opener
) -> None:
    """rkllm_init on a file removed since the scan: the error names the missing file."""
    path = write_model("Gone")
    path.unlink()
    worker = open_worker(path, init=False)
    with pytest.raises(ModelFileMissing) as caught:
        worker.init(ModelParams(model_path=path)).result(timeout=30)
    assert str(caught.value).startswith(f"the model file {path} is gone")
    assert "check the model file, the runtime version" not in str(caught.value)


def test_runtime_output_is_captured(
    write_model: ModelWriter, open_worker: Opener
) -> None:
    """What the runtime prints (I rkllm: ...) is kept for messages and diagnostics."""
    worker = open_worker(write_model())
    deadline = time.monotonic() + 10
    while not any("max_context_limit" in line for line in worker.output_tail()):
        assert time.monotonic() < deadline, worker.output_tail()
        time.sleep(0.05)


def test_a_crashed_worker_fails_its_run_and_stays_dead(
    write_model: ModelWriter, open_worker: Opener
) -> None:
    """A segfault mid-run fails the run at once, naming the signal; the caller survives."""
    deaths: list[WorkerDiedError] = []
    worker = open_worker(
        write_model(replies=("default => " + "word " * 200,), decode_ms_per_token=20),
        on_death=deaths.append,
    )
    started = threading.Event()
    future = worker.run(RunRequest(prompt="talk"), lambda _text: started.set())
    assert started.wait(10)
    assert worker.pid is not None
    os.kill(worker.pid, signal.SIGSEGV)
    with pytest.raises(WorkerDiedError, match="SIGSEGV"):
        future.result(timeout=10)
    assert deaths and deaths[0] is worker.death
    assert "max_context_limit" in str(worker.death)  # the runtime's last lines
    with pytest.raises(WorkerDiedError):
        worker.run(RunRequest(prompt="again"), lambda _text: None)
    worker.abort()  # harmless on a dead worker


def test_a_stalled_run_is_aborted_and_the_worker_goes_on(
    write_model: ModelWriter, open_worker: Opener
) -> None:
    """No text for stall_timeout: the run is aborted with a clear error; the next run works."""
    worker = open_worker(
        write_model(
            replies=("reply user slow => " + "word " * 50, "default => Fine."),
            decode_ms_per_token=1000,
        ),
        stall_timeout=0.5,
        abort_grace=10,
    )
    pieces: list[str] = []
    with pytest.raises(RunStalledError, match="no text for 0.5 s"):
        worker.run(RunRequest(prompt="slow"), pieces.append).result(timeout=30)
    assert len(pieces) < 50
    assert worker.death is None
    worker.stall_timeout = 30
    assert "".join(run(worker, "hello")[0]) == "Fine."


def test_a_wedged_worker_is_killed(
    write_model: ModelWriter, open_worker: Opener
) -> None:
    """A run that ignores the abort (a frozen process here) is ended by killing the worker."""
    worker = open_worker(
        write_model(replies=("default => " + "word " * 200,), decode_ms_per_token=20),
        stall_timeout=0.5,
        abort_grace=0.5,
    )
    started = threading.Event()
    future = worker.run(RunRequest(prompt="talk"), lambda _text: started.set())
    assert started.wait(10)
    assert worker.pid is not None
    os.kill(worker.pid, signal.SIGSTOP)  # wedged: no text, no reaction to abort
    with pytest.raises(RunStalledError):
        future.result(timeout=30)
    assert worker.death is not None
    assert "SIGKILL" in str(worker.death)


def test_close_ends_the_process(write_model: ModelWriter, open_worker: Opener) -> None:
    """close() destroys the handle in the worker and reaps it; later calls are refused."""
    worker = open_worker(write_model())
    worker.close()
    with pytest.raises(ModelClosedError):
        worker.run(RunRequest(prompt="hello"), lambda _text: None)
    assert worker.death is None


def test_a_request_behind_a_long_run_waits_without_counting_as_stalled(
    write_model: ModelWriter, open_worker: Opener
) -> None:
    """A request made while a run streams is sent after it, its stall clock started then."""
    reply = "word " * 150
    worker = open_worker(
        write_model(replies=(f"default => {reply}",), decode_ms_per_token=10),
        stall_timeout=0.5,
    )
    started = threading.Event()
    pieces: list[str] = []

    def sink(text: str) -> None:
        pieces.append(text)
        started.set()

    running = worker.run(RunRequest(prompt="talk"), sink)
    assert started.wait(10)
    cleared = worker.clear_kv_cache(keep_system_prompt=False)
    result = running.result(timeout=30)  # 1.5 s of text: three stall timeouts
    assert not result.aborted
    assert "".join(pieces) == reply.strip()
    cleared.result(timeout=10)
    assert worker.death is None


def test_an_abort_stops_only_the_request_it_names(
    write_model: ModelWriter, open_worker: Opener
) -> None:
    """An abort that arrives for an earlier request leaves the run in progress alone."""
    reply = "word " * 100
    worker = open_worker(
        write_model(replies=(f"default => {reply}",), decode_ms_per_token=5)
    )
    started = threading.Event()
    pieces: list[str] = []

    def sink(text: str) -> None:
        pieces.append(text)
        started.set()

    running = worker.run(RunRequest(prompt="talk"), sink)
    assert started.wait(10)
    assert worker._abort_fd is not None  # noqa: SLF001 - a late abort of init (id 1)
    os.write(worker._abort_fd, encode({"id": 1}))  # noqa: SLF001
    result = running.result(timeout=30)
    assert not result.aborted
    assert "".join(pieces) == reply.strip()
    started.clear()
    aborted = worker.run(RunRequest(prompt="talk"), lambda _text: started.set())
    assert started.wait(10)
    worker.abort()
    assert aborted.result(timeout=30).aborted


def test_close_reads_the_end_itself_once_the_loop_is_gone(
    write_model: ModelWriter, verified_library: VerifiedLibrary
) -> None:
    """A worker read on a loop that has closed since still closes: close reads its end."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-loop")
    thread.start()
    worker = WorkerModel(verified_library, "m", loop=loop)
    try:
        worker.init(ModelParams(model_path=write_model())).result(timeout=30)
        assert "".join(run(worker, "hello")[0])
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
    worker.close()
    assert worker.pid is not None
    with pytest.raises(ChildProcessError):
        os.waitpid(worker.pid, os.WNOHANG)  # reaped, not a zombie
    assert worker.death is None
    assert not [t for t in threading.enumerate() if t.name.startswith("rkllm-worker")]
