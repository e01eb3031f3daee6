"""The simulator's crash switches and trace file, in real worker processes.

The runtime's known crashes (a segfault in rkllm_init, ggml's abort(), a wedged
run) must only ever happen in a worker, so they are proven there; the trace file
is how tests see the counters and runs of a worker.
"""

from collections.abc import Generator
from concurrent.futures import Future
import json
import os
from pathlib import Path
import signal
import subprocess
import sys
import threading
import time

import pytest

from custom_components.rockchip_llm.host.rkllm.errors import (
    ModelInitError,
    RunStalledError,
    WorkerDiedError,
)
from custom_components.rockchip_llm.host.rkllm.library import VerifiedLibrary
from custom_components.rockchip_llm.host.rkllm.runtime import (
    ModelParams,
    RunRequest,
    RunResult,
)
from custom_components.rockchip_llm.host.rkllm.worker import (
    ABORT_GRACE,
    STALL_TIMEOUT,
    WorkerModel,
)

from .conftest import REPO, ModelWriter
from .sim_words import words

BARE_INIT = """\
import ctypes, sys
from pathlib import Path
from custom_components.rockchip_llm.host.rkllm.library import load_library
lib = load_library(Path(sys.argv[1])).cdll
param = lib.rkllm_createDefaultParam()
param.model_path = sys.argv[2].encode()
handle = ctypes.c_void_p()
no_callback = lib.rkllm_init.argtypes[2]()  # NULL in both families
code = lib.rkllm_init(ctypes.byref(handle), ctypes.byref(param), no_callback)
print("returned", code, flush=True)
"""
WORDS = "default => " + words(20)


@pytest.fixture
def workers() -> Generator[list[WorkerModel]]:
    """Workers appended here are closed (process reaped) after the test."""
    started: list[WorkerModel] = []
    yield started
    for worker in started:
        worker.close()


def start(
    workers: list[WorkerModel],
    library: VerifiedLibrary,
    *,
    stall_timeout: float = STALL_TIMEOUT,
    abort_grace: float = ABORT_GRACE,
) -> WorkerModel:
    """A new worker (not yet initialised) that the fixture closes."""
    worker = WorkerModel(
        library,
        f"m{len(workers)}",
        stall_timeout=stall_timeout,
        abort_grace=abort_grace,
    )
    workers.append(worker)
    return worker


def wait_for_output(worker: WorkerModel, text: str) -> None:
    """Wait until the worker's runtime output has a line containing text."""
    deadline = time.monotonic() + 10
    while not any(text in line for line in worker.output_tail()):
        assert time.monotonic() < deadline, worker.output_tail()
        time.sleep(0.05)


def test_crash_in_init_is_a_segfault(
    write_model: ModelWriter,
    verified_library: VerifiedLibrary,
    workers: list[WorkerModel],
) -> None:
    """crash_in_init 1: the worker dies with SIGSEGV after the model line."""
    path = write_model(extra=("crash_in_init 1",))
    worker = start(workers, verified_library)
    with pytest.raises(WorkerDiedError, match="SIGSEGV") as caught:
        worker.init(ModelParams(model_path=path)).result(timeout=30)
    assert caught.value is worker.death


def test_crash_in_init_prints_the_model_line_first(
    write_model: ModelWriter, sim_library: Path
) -> None:
    """Called bare (no capture of fd 2), rkllm_init prints its load lines, then crashes."""
    path = write_model(extra=("crash_in_init 1",))
    child = subprocess.run(
        [sys.executable, "-c", BARE_INIT, str(sim_library), str(path)],
        capture_output=True,
        check=False,
        cwd=REPO,
        timeout=60,
    )
    assert child.returncode == -signal.SIGSEGV, child.stderr
    last = child.stderr.decode().splitlines()[-1]
    assert "max_context_limit: 4096" in last
    assert b"returned" not in child.stdout


def test_the_death_message_has_the_line_printed_before_the_crash(
    write_model: ModelWriter,
    verified_library: VerifiedLibrary,
    workers: list[WorkerModel],
) -> None:
    """The WorkerDiedError of a crash in init names the runtime's last line."""
    path = write_model(extra=("crash_in_init 1",))
    worker = start(workers, verified_library)
    with pytest.raises(WorkerDiedError, match="SIGSEGV") as caught:
        worker.init(ModelParams(model_path=path)).result(timeout=30)
    assert "max_context_limit: 4096" in str(caught.value)


def test_abort_at_token_is_a_sigabrt(
    write_model: ModelWriter,
    verified_library: VerifiedLibrary,
    workers: list[WorkerModel],
) -> None:
    """abort_at_token 3: three tokens stream, then a GGML_ASSERT line and SIGABRT."""
    path = write_model(replies=(WORDS,), extra=("abort_at_token 3",))
    worker = start(workers, verified_library)
    worker.init(ModelParams(model_path=path)).result(timeout=30)
    pieces: list[str] = []
    with pytest.raises(WorkerDiedError, match="SIGABRT"):
        worker.run(RunRequest(prompt="talk"), pieces.append).result(timeout=30)
    assert "".join(pieces) == words(3)
    wait_for_output(worker, "GGML_ASSERT(")


def test_hang_at_token_ignores_the_abort_and_is_killed(
    write_model: ModelWriter,
    verified_library: VerifiedLibrary,
    workers: list[WorkerModel],
) -> None:
    """hang_at_token 2: the watchdog's abort does nothing; killing the worker works."""
    path = write_model(replies=(WORDS,), extra=("hang_at_token 2",))
    worker = start(workers, verified_library, stall_timeout=0.5, abort_grace=0.5)
    worker.init(ModelParams(model_path=path)).result(timeout=30)
    pieces: list[str] = []
    with pytest.raises(RunStalledError, match="no text for 0.5 s"):
        worker.run(RunRequest(prompt="talk"), pieces.append).result(timeout=30)
    assert "".join(pieces) == words(2)
    # had rkllm_abort ended the run, the worker would still be alive
    assert worker.death is not None
    assert "SIGKILL" in str(worker.death)
    assert "simulated hang after 2 generated tokens" in str(worker.death)


@pytest.mark.parametrize(
    "setting", ["crash_in_init 2", "abort_at_token -2", "hang_at_token x"]
)
def test_bad_crash_settings_fail_init(
    write_model: ModelWriter,
    verified_library: VerifiedLibrary,
    workers: list[WorkerModel],
    setting: str,
) -> None:
    """A bad value of a crash switch is a model-file error, not a crash."""
    path = write_model(extra=(setting,))
    worker = start(workers, verified_library)
    with pytest.raises(ModelInitError):
        worker.init(ModelParams(model_path=path)).result(timeout=30)
    assert worker.death is None
    wait_for_output(worker, f"bad value for setting: {setting.partition(' ')[0]}")


def run_to_end(worker: WorkerModel, prompt: str) -> tuple[str, RunResult]:
    """Run prompt; return the streamed text and the result."""
    pieces: list[str] = []
    future: Future[RunResult] = worker.run(RunRequest(prompt=prompt), pieces.append)
    result = future.result(timeout=30)
    return "".join(pieces), result


def test_trace_file_records_counters_and_runs_of_each_worker(
    write_model: ModelWriter,
    verified_library: VerifiedLibrary,
    workers: list[WorkerModel],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two workers trace into one file: whole lines, their own pids, parseable runs."""
    trace = tmp_path / "trace.log"
    monkeypatch.setenv("RKLLM_SIM_TRACE", str(trace))
    path = write_model(
        replies=("reply user lines => two\\nlines", "default => " + "tok " * 40)
    )
    first, second = start(workers, verified_library), start(workers, verified_library)
    for worker in (first, second):
        worker.init(ModelParams(model_path=path)).result(timeout=30)
    prompts = {first: "say two lines\nplease", second: "something long"}
    replies: dict[WorkerModel, str] = {}

    def run_one(worker: WorkerModel) -> None:
        for _ in range(5):
            replies[worker] = run_to_end(worker, prompts[worker])[0]

    threads = [threading.Thread(target=run_one, args=(w,)) for w in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for worker in (first, second):
        worker.close()

    lines = trace.read_text().split("\n")
    assert lines.pop() == ""  # every line ends with a newline
    for worker in (first, second):
        pid = worker.pid
        assert pid is not None and pid != os.getpid()
        mine = [line for line in lines if line.split(" ")[1] == str(pid)]
        counts = [line for line in mine if line.startswith("count ")]
        assert counts[:3] == [
            f"count {pid} live_handles +1",
            f"count {pid} init 1",
            f"count {pid} run 1",
        ]
        assert counts[-2:] == [f"count {pid} live_handles -1", f"count {pid} destroy 1"]
        assert counts.count(f"count {pid} run 1") == 5
        runs = [line.split(" ", 3) for line in mine if line.startswith("run ")]
        assert len(runs) == 5
        assert len({handle for _kind, _pid, handle, _json in runs}) == 1
        assert runs[0][2].startswith("0x")
        for _kind, _pid, _handle, text in runs:
            record = json.loads(text)
            assert prompts[worker] in record["prompt"]
            assert record["reply"] == replies[worker]
            assert record["status"] == "finished"
        assert len(mine) == len(counts) + len(runs)
    assert replies[first] == "two\nlines"
    assert {line.split(" ")[1] for line in lines} == {str(first.pid), str(second.pid)}
