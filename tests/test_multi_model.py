"""Several models: a memory domain each, and runs one at a time on old runtimes."""

import asyncio
from pathlib import Path
import threading
import time

import pytest

from custom_components.rockchip_llm.const import CONF_LIBRARY_PATH, CONF_MODEL
from custom_components.rockchip_llm.engine import DOMAIN_BYTES, plan_domains
from custom_components.rockchip_llm.host.rkllm.abi import AbiFamily
from custom_components.rockchip_llm.host.rkllm.runtime import (
    RunRequest,
    RunResult,
    TextSink,
)
from custom_components.rockchip_llm.remote import RemoteWorker
from homeassistant.core import HomeAssistant

from .conftest import SIM_LIBRARIES, EntryFactory, ModelWriter
from .test_conversation import converse, speech

LONG_REPLY = " ".join(f"w{i}" for i in range(40))
"""40 tokens at 10 ms: a run takes at least 0.39 s."""

type Span = list[float]
"""When a run was sent to its worker and when its answer came back."""


@pytest.fixture
def run_spans(monkeypatch: pytest.MonkeyPatch) -> list[Span]:
    """The span of every run sent to a worker (through its host), in the order sent."""
    spans: list[Span] = []
    lock = threading.Lock()
    run = RemoteWorker.run

    def timed_run(
        worker: RemoteWorker, request: RunRequest, sink: TextSink
    ) -> asyncio.Task[RunResult]:
        span = [time.monotonic()]
        with lock:
            spans.append(span)
        future = run(worker, request, sink)
        future.add_done_callback(lambda _: span.append(time.monotonic()))
        return future

    monkeypatch.setattr(RemoteWorker, "run", timed_run)
    return spans


def test_plan_domains() -> None:
    """A model larger than a domain spans the next one too."""
    assert plan_domains([DOMAIN_BYTES + 1, 100, 2 * DOMAIN_BYTES]) == [0, 2, 3]
    assert plan_domains([]) == []


async def _two_models(make_entry: EntryFactory, write_model: ModelWriter) -> list[int]:
    for name in ("Qwen3 Sim", "Other Sim"):
        write_model(name, replies=(f"default => {LONG_REPLY}",), decode_ms_per_token=10)
    entry = await make_entry({}, {CONF_MODEL: "Other Sim"})
    return sorted(
        loaded.params.base_domain_id
        for loaded in entry.runtime_data.engine.sessions.values()
    )


async def _both_answer(hass: HomeAssistant, run_spans: list[Span]) -> bool:
    """Ask both agents at once; return whether their runs overlapped."""
    run_spans.clear()
    results = await asyncio.gather(
        converse(hass, "one", agent="conversation.agent_0"),
        converse(hass, "two", agent="conversation.agent_1"),
    )
    assert all(speech(result).startswith("w0 w1") for result in results)
    first, second = run_spans
    return second[0] < first[1]


async def test_models_get_their_own_domains_and_run_together(
    hass: HomeAssistant,
    make_entry: EntryFactory,
    write_model: ModelWriter,
    run_spans: list[Span],
) -> None:
    """On 1.2.3 and 1.3.0 two models have distinct domains and generate at once."""
    assert await _two_models(make_entry, write_model) == [0, 1]
    assert await _both_answer(hass, run_spans)


async def test_old_runtime_runs_one_model_at_a_time(
    hass: HomeAssistant,
    make_entry: EntryFactory,
    write_model: ModelWriter,
    run_spans: list[Span],
    tmp_path: Path,
) -> None:
    """Runtime 1.2.1 cannot run two instances at once: their runs take turns."""
    path = tmp_path / "librkllmrt.so"
    # The simulator says 1.2.3; this copy says 1.2.1 (to the child that checks it).
    simulator = SIM_LIBRARIES[AbiFamily.V1_2].read_bytes()
    version = b"rkllm-runtime version: 1.2.3"
    assert simulator.count(version) == 1
    path.write_bytes(simulator.replace(version, b"rkllm-runtime version: 1.2.1"))
    for name in ("Qwen3 Sim", "Other Sim"):
        write_model(name, replies=(f"default => {LONG_REPLY}",), decode_ms_per_token=10)
    entry = await make_entry({}, {CONF_MODEL: "Other Sim"}, setup=False)
    hass.config_entries.async_update_entry(
        entry, data={**entry.data, CONF_LIBRARY_PATH: str(path)}
    )
    await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    assert entry.runtime_data.engine.runtime.version == "1.2.1"
    assert not await _both_answer(hass, run_spans)
