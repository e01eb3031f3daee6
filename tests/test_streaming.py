"""Streamed text on its way to Home Assistant: joined when the consumer is behind, never reordered."""

from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
import threading

import pytest

from custom_components.rockchip_llm.generation import Generation
from custom_components.rockchip_llm.host.rkllm.runtime import (
    RunRequest,
    RunResult,
    TextSink,
)
from custom_components.rockchip_llm.host.server import merge_text

from .host_process import (
    HostProcess,
    allow_host_sockets,
    start_host,
    stop_host,
    write_sim_model,
)

REPLY = " ".join(f"w{i}" for i in range(150))


def test_merge_text_joins_only_consecutive_text_of_one_request() -> None:
    """Texts of one request in a row become one message; anything between splits them."""
    log = {"event": "log", "level": 20, "logger": "", "message": "x"}
    merged = merge_text(
        [
            {"id": 1, "text": "a"},
            {"id": 1, "text": "b"},
            {"id": 2, "text": "c"},
            {"id": 1, "text": "d"},
            log,
            {"id": 1, "text": "e"},
            {"id": 1, "text": "f"},
            {"id": 1, "ok": None},
        ]
    )
    assert merged == [
        {"id": 1, "text": "ab"},
        {"id": 2, "text": "c"},
        {"id": 1, "text": "d"},
        log,
        {"id": 1, "text": "ef"},
        {"id": 1, "ok": None},
    ]


@pytest.fixture
def fast_host(socket_enabled: None, tmp_path: Path) -> Iterator[HostProcess]:
    """A host whose model answers with a long reply, without delays."""
    allow_host_sockets()
    write_sim_model(tmp_path / "models", replies=(f"default => {REPLY}",))
    host = start_host(tmp_path)
    try:
        yield host
    finally:
        stop_host(host)


def test_a_run_streams_all_its_text_before_its_answer(fast_host: HostProcess) -> None:
    """However the host joins it, the text arrives whole, in order, before the answer."""
    with fast_host.client() as raw:
        fast_host.open_worker(raw)
        for request_id in (7, 8):
            raw.send(
                {
                    "id": request_id,
                    "op": "worker.run",
                    "args": {"worker": 1, "request": {"prompt": "talk"}},
                }
            )
            texts: list[str] = []
            while (message := raw.read()) is not None and "text" in message:
                assert set(message) == {"id", "text"}
                assert message["id"] == request_id
                texts.append(message["text"])
            assert message is not None
            assert message["id"] == request_id
            assert message["ok"]["stopped_at_limit"] is False
            assert "".join(texts) == REPLY
            assert len(texts) <= message["ok"]["perf"]["generate_tokens"]


class _Handle:
    """A model handle that produces its whole reply before the consumer first reads."""

    def __init__(self, pieces: list[str], *, from_thread: bool) -> None:
        self.pieces = pieces
        self.from_thread = from_thread

    def run(self, request: RunRequest, sink: TextSink) -> Future[RunResult]:
        future: Future[RunResult] = Future()

        def produce() -> None:
            for piece in self.pieces:
                sink(piece)
            future.set_result(
                RunResult(perf=None, aborted=False, stopped_at_limit=False)
            )

        if self.from_thread:
            thread = threading.Thread(target=produce)
            thread.start()
            thread.join()
        else:
            produce()
        return future

    def abort(self) -> None:
        """Nothing runs."""


@pytest.mark.parametrize("from_thread", [False, True], ids=["loop", "thread"])
async def test_text_that_arrived_meanwhile_is_read_in_one_piece(
    from_thread: bool,
) -> None:
    """A consumer that falls behind reads the text that arrived meanwhile at once."""
    generation = Generation(
        _Handle(["The ", "light ", "is ", "on."], from_thread=from_thread),
        RunRequest(prompt="hi"),
    )
    assert [text async for text in generation] == ["The light is on."]
    assert generation.result is not None
    assert generation.ttft_ms is not None


async def test_text_keeps_its_order_across_reads() -> None:
    """Pieces pushed while the consumer works on one text come next, joined, in order."""
    sinks: list[TextSink] = []
    done: Future[RunResult] = Future()

    class Handle:
        def run(self, request: RunRequest, sink: TextSink) -> Future[RunResult]:
            sinks.append(sink)
            sink("a")
            return done

        def abort(self) -> None:
            """Nothing runs."""

    seen: list[str] = []
    async for text in Generation(Handle(), RunRequest(prompt="hi")):
        seen.append(text)
        if text == "a":
            sinks[0]("b")
            sinks[0]("c")
        else:
            done.set_result(RunResult(perf=None, aborted=False, stopped_at_limit=False))
    assert seen == ["a", "bc"]
