"""The entities on each agent's device, pushed by the model's handle."""

import asyncio
from collections.abc import Generator
from datetime import timedelta
from pathlib import Path
from typing import Any
from unittest.mock import PropertyMock, patch

import pytest
from pytest_homeassistant_custom_component.common import (
    MockConfigEntry,
    async_fire_time_changed,
    mock_restore_cache_with_extra_data,
)

from custom_components.rockchip_llm.binary_sensor import BusySensor
from custom_components.rockchip_llm.const import DOMAIN
from custom_components.rockchip_llm.host import board
from custom_components.rockchip_llm.sensor import AgentSensor
from custom_components.rockchip_llm.session import RECENT_RUNS, ModelSession
from custom_components.rockchip_llm.status import AgentStatusEntity
from homeassistant.components import conversation
from homeassistant.const import (
    EVENT_STATE_CHANGED,
    STATE_OFF,
    STATE_ON,
    STATE_UNAVAILABLE,
    STATE_UNKNOWN,
    EntityCategory,
)
from homeassistant.core import (
    Context,
    Event,
    EventStateChangedData,
    HomeAssistant,
    State,
    callback,
)
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers import entity_registry as er, translation
from homeassistant.util import dt as dt_util

from .conftest import EntryFactory

AGENT = "conversation.agent_0"
BUSY = "binary_sensor.agent_0_busy"


@pytest.fixture(autouse=True)
def no_npu_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel's NPU load file is absent unless a test writes it."""
    monkeypatch.setenv(board.NPU_DEBUGFS_ENV, str(tmp_path / "rknpu"))


@pytest.fixture
def all_entities_enabled() -> Generator[None]:
    """Entities disabled by default are enabled (as a user would)."""
    with patch(
        "homeassistant.helpers.entity.Entity.entity_registry_enabled_default",
        new_callable=PropertyMock,
        return_value=True,
    ):
        yield


def sensor_id(hass: HomeAssistant, key: str, agent: str = AGENT) -> str | None:
    """The entity id of an agent's sensor, found by its unique id."""
    registry = er.async_get(hass)
    agent_entry = registry.async_get(agent)
    assert agent_entry is not None
    return registry.async_get_entity_id(
        "sensor", DOMAIN, f"{agent_entry.unique_id}_{key}"
    )


def state(hass: HomeAssistant, key: str) -> str:
    """The state of one of the first agent's sensors."""
    entity_id = sensor_id(hass, key)
    assert entity_id is not None, key
    current = hass.states.get(entity_id)
    assert current is not None, key
    return current.state


def model_session(entry: MockConfigEntry) -> ModelSession:
    """The model of the entry's first agent."""
    loaded: ModelSession = next(iter(entry.runtime_data.agents.values())).session
    return loaded


async def converse(hass: HomeAssistant, text: str = "hello") -> Any:
    """Ask the first agent something; return once the device page followed."""
    result = await conversation.async_converse(
        hass, text, None, Context(), agent_id=AGENT
    )
    await hass.async_block_till_done()
    return result


async def call(hass: HomeAssistant, service: str, data: dict[str, Any]) -> Any:
    """Call one of our actions; return its response once the device page followed.

    (A script runs an action in a task of its own: the page has followed when
    its next step runs.)
    """
    response = await hass.services.async_call(
        DOMAIN, service, data, blocking=True, return_response=True
    )
    await hass.async_block_till_done()
    return response


@pytest.mark.usefixtures("all_entities_enabled")
async def test_sensors_after_setup_and_a_conversation(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """The cache is ready after setup; a conversation fills the last-answer sensors."""
    entry = await make_entry(
        {"max_context_len": 2048},
        model_kwargs={"extra": ("memory_usage_mb 812.5",), "decode_ms_per_token": 2},
    )
    agent = next(iter(entry.runtime_data.agents.values()))
    assert (
        agent.system_cache.cache is not None
        and agent.system_cache.cache.metadata is not None
    )
    tokens = agent.system_cache.cache.metadata.tokens
    assert tokens > 0
    assert state(hass, "prompt_cache") == "ready"
    assert int(state(hass, "system_prompt_tokens")) == tokens
    assert float(state(hass, "context_use")) == round(tokens * 100 / 2048, 1)
    assert float(state(hass, "prompt_cache_size")) == pytest.approx(
        agent.system_cache.cache.metadata.size_bytes / 1_000_000, abs=0.05
    )
    assert state(hass, "time_to_first_token") == STATE_UNKNOWN
    assert state(hass, "prefill_tokens") == STATE_UNKNOWN
    assert state(hass, "queue_length") == "0"
    assert hass.states.get(BUSY).state == STATE_OFF
    # The cache build ran on the model: the runtime reported its memory.
    assert float(state(hass, "memory")) == 812.5

    queue_states: list[str] = []
    queue_id = sensor_id(hass, "queue_length")

    @callback
    def record_queue(event: Event[EventStateChangedData]) -> None:
        if event.data["entity_id"] == queue_id and event.data["new_state"]:
            queue_states.append(event.data["new_state"].state)

    unsubscribe = hass.bus.async_listen(EVENT_STATE_CHANGED, record_queue)
    await converse(hass)
    unsubscribe()
    assert queue_states == []  # a request that did not wait was never counted
    run = model_session(entry).recent[-1]
    assert run.ttft_ms is not None and run.generate_tokens > 0
    assert int(state(hass, "prefill_tokens")) == run.prefill_tokens > 0
    assert float(state(hass, "time_to_first_token")) == round(run.ttft_ms, 1)
    assert float(state(hass, "tokens_per_second")) == round(
        run.generate_tokens * 1000 / run.generate_ms, 2
    )
    assert hass.states.get(BUSY).state == STATE_OFF


async def test_entity_metadata(hass: HomeAssistant, make_entry: EntryFactory) -> None:
    """Unique ids per agent and reading, diagnostics categorised, the rare one disabled."""
    entry = await make_entry()
    registry = er.async_get(hass)
    subentry_id = next(iter(entry.runtime_data.agents))
    cache = registry.async_get(sensor_id(hass, "prompt_cache"))
    assert cache is not None
    assert cache.unique_id == f"{subentry_id}_prompt_cache"
    assert cache.config_subentry_id == subentry_id
    assert cache.translation_key == "prompt_cache"
    size = registry.async_get(sensor_id(hass, "prompt_cache_size"))
    assert size is not None
    assert size.disabled_by is er.RegistryEntryDisabler.INTEGRATION
    assert size.entity_category is EntityCategory.DIAGNOSTIC
    conversation_entity = registry.async_get(AGENT)
    assert conversation_entity is not None
    assert cache.device_id == conversation_entity.device_id
    # Translated names and the enum's options.
    cache_state = hass.states.get(sensor_id(hass, "prompt_cache"))
    assert cache_state is not None
    assert cache_state.attributes["friendly_name"] == "Agent 0 Prompt cache"
    assert cache_state.attributes["options"] == ["ready", "building", "failed", "none"]


async def test_building_while_a_cache_build_runs(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """rebuild_cache shows "building" and busy while it runs, then the new cache."""
    entry = await make_entry(model_kwargs={"prefill_ms_per_token": 1.5})
    loaded = model_session(entry)
    seen: list[tuple[str, str]] = []

    @callback
    def record(*_args: object) -> None:
        seen.append((state(hass, "prompt_cache"), hass.states.get(BUSY).state))

    unsubscribe = hass.bus.async_listen("state_changed", record)
    task = hass.async_create_task(call(hass, "rebuild_cache", {"agent": AGENT}))
    while loaded.building is None:
        await asyncio.sleep(0.005)
    await asyncio.sleep(0)
    assert state(hass, "prompt_cache") == "building"
    assert hass.states.get(BUSY).state == STATE_ON
    result = await task
    unsubscribe()
    assert ("building", STATE_ON) in seen
    assert state(hass, "prompt_cache") == "ready"
    assert hass.states.get(BUSY).state == STATE_OFF
    assert int(state(hass, "system_prompt_tokens")) == result["caches"][0]["tokens"]


async def test_failed_build_is_shown(
    in_process_host: None, hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """A rebuild that fails leaves the old cache ready and says why the build failed."""
    await make_entry()
    with (
        patch(
            "custom_components.rockchip_llm.host.prompt_cache._write_synced",
            side_effect=OSError(28, "No space left on device"),
        ),
        pytest.raises(HomeAssistantError),
    ):
        await call(hass, "rebuild_cache", {"agent": AGENT})
    cache = hass.states.get(sensor_id(hass, "prompt_cache"))
    assert cache is not None
    assert cache.state == "ready"
    assert "No space left on device" in cache.attributes["last_build_error"]
    await call(hass, "rebuild_cache", {"agent": AGENT})
    cache = hass.states.get(sensor_id(hass, "prompt_cache"))
    assert cache is not None
    assert cache.attributes["last_build_error"] is None


async def test_deleted_system_cache_shows_none_then_failed(
    in_process_host: None, hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """Without a system cache the state is none, after a failed build failed."""
    entry = await make_entry()
    # (delete_cache refuses an agent's own cache: the session's own delete here)
    assert await model_session(entry).async_delete_cache("system")
    await hass.async_block_till_done()
    assert state(hass, "prompt_cache") == "none"
    assert state(hass, "system_prompt_tokens") == STATE_UNKNOWN
    assert state(hass, "context_use") == STATE_UNKNOWN
    with (
        patch(
            "custom_components.rockchip_llm.host.prompt_cache._write_synced",
            side_effect=OSError(28, "No space left on device"),
        ),
        pytest.raises(HomeAssistantError),
    ):
        await call(hass, "rebuild_cache", {"agent": AGENT})
    assert state(hass, "prompt_cache") == "failed"
    await call(hass, "rebuild_cache", {"agent": AGENT})
    assert state(hass, "prompt_cache") == "ready"


async def test_queue_length_and_busy(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """Requests waiting for the model are counted; busy follows the model's use."""
    entry = await make_entry()
    loaded = model_session(entry)
    async with loaded._lock:
        await asyncio.sleep(0)
        assert hass.states.get(BUSY).state == STATE_ON
        first, second = (
            hass.async_create_task(
                conversation.async_converse(
                    hass, "hello", None, Context(), agent_id=AGENT
                )
            )
            for _request in range(2)
        )
        while loaded.waiting < 2:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0)
        assert state(hass, "queue_length") == "2"
    await first
    await second
    await hass.async_block_till_done()
    assert state(hass, "queue_length") == "0"
    assert hass.states.get(BUSY).state == STATE_OFF


async def test_readings_follow_the_answer_once_the_loop_runs(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """The answer does not wait for the device page: its readings follow right after.

    Busy went on while the request waited for the host; the answer's readings and
    busy off are written together, in the loop's next iteration.
    """
    await make_entry()
    busy_states: list[str] = []

    @callback  # heard at once, in the loop (a plain function runs in the executor)
    def record_busy(event: Event[EventStateChangedData]) -> None:
        if event.data["entity_id"] == BUSY and event.data["new_state"]:
            busy_states.append(event.data["new_state"].state)

    unsubscribe = hass.bus.async_listen(EVENT_STATE_CHANGED, record_busy)
    await conversation.async_converse(hass, "hello", None, Context(), agent_id=AGENT)
    assert busy_states == [STATE_ON]
    assert state(hass, "time_to_first_token") == STATE_UNKNOWN
    await asyncio.sleep(0)
    unsubscribe()
    assert busy_states == [STATE_ON, STATE_OFF]
    assert state(hass, "time_to_first_token") != STATE_UNKNOWN


async def test_unavailable_while_the_model_is_not_loaded(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """When the model's handle is gone, its readings are unavailable."""
    entry = await make_entry()
    assert state(hass, "prompt_cache") == "ready"
    await entry.runtime_data.engine.async_close()
    await hass.async_block_till_done()
    for entity_id in (
        sensor_id(hass, "prompt_cache"),
        sensor_id(hass, "queue_length"),
        BUSY,
    ):
        assert hass.states.get(entity_id).state == STATE_UNAVAILABLE, entity_id


async def test_ai_task_agent_has_no_cache_sensors(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """An AI Task agent keeps no system prompt cache: only the model's readings."""
    await make_entry(ai_tasks=({},))
    task = "ai_task.task_0"
    assert sensor_id(hass, "time_to_first_token", task) is not None
    assert sensor_id(hass, "memory", task) is not None
    assert sensor_id(hass, "prompt_cache", task) is None
    assert sensor_id(hass, "context_use", task) is None
    assert hass.states.get("binary_sensor.task_0_busy") is not None


async def test_npu_load_hidden_without_the_kernel_file(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """No NPU load sensor where the kernel does not expose the load."""
    await make_entry()
    assert sensor_id(hass, "npu_load") is None
    assert sensor_id(hass, "prompt_cache") is not None


async def test_npu_load_from_the_kernel(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """With the kernel's load file, the sensor shows the mean core load and follows it."""
    load = board.npu_load_path()
    load.parent.mkdir()
    load.write_text("NPU load:  Core0: 30%, Core1: 10%, Core2:  5%,\n")
    await make_entry()
    assert float(state(hass, "npu_load")) == 15.0
    load.write_text("NPU load:  Core0:  0%, Core1:  0%, Core2:  0%,\n")
    async_fire_time_changed(hass, dt_util.utcnow() + timedelta(seconds=11))
    await hass.async_block_till_done(wait_background_tasks=True)
    assert float(state(hass, "npu_load")) == 0.0
    load.unlink()
    async_fire_time_changed(hass, dt_util.utcnow() + timedelta(seconds=22))
    await hass.async_block_till_done(wait_background_tasks=True)
    assert state(hass, "npu_load") == STATE_UNKNOWN


async def test_last_answer_is_per_agent(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """Agents sharing a model each show their own last answer, however busy the other."""
    entry = await make_entry({}, {"temperature": 0.1})
    loaded = model_session(entry)
    await converse(hass, "hello")
    first = loaded.recent[-1]
    for _turn in range(RECENT_RUNS):
        await conversation.async_converse(
            hass, "hello", None, Context(), agent_id="conversation.agent_1"
        )
    await hass.async_block_till_done()
    assert first not in loaded.recent  # the model's history moved on
    assert float(state(hass, "time_to_first_token")) == round(first.ttft_ms or 0, 1)
    other = loaded.recent[-1]
    other_id = sensor_id(hass, "time_to_first_token", "conversation.agent_1")
    assert other_id is not None
    assert float(hass.states.get(other_id).state) == round(other.ttft_ms or 0, 1)


LAST_ANSWER_KEYS = ("time_to_first_token", "tokens_per_second", "prefill_tokens")


async def test_last_answer_readings_come_back_after_a_restart(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """The "Last ..." readings survive a reload until the agent answers again.

    A reload removes and re-adds the entities through HA's restore-state store,
    as a restart does (whose states HA writes to disk at stop).
    """
    entry = await make_entry(model_kwargs={"decode_ms_per_token": 2})
    await converse(hass)
    before = {key: state(hass, key) for key in LAST_ANSWER_KEYS}
    assert STATE_UNKNOWN not in before.values()
    assert await hass.config_entries.async_reload(entry.entry_id)
    await hass.async_block_till_done()
    assert model_session(entry).last_runs == {}  # the new model knows no answer yet
    assert {key: state(hass, key) for key in LAST_ANSWER_KEYS} == before
    await converse(hass, "turn on the kitchen light")
    run = model_session(entry).last_runs[next(iter(entry.runtime_data.agents))]
    assert int(state(hass, "prefill_tokens")) == run.prefill_tokens


async def test_last_answer_readings_from_a_stored_restart(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """Readings HA stored at its last stop are shown on the next start."""
    entry = await make_entry(setup=False)
    subentry_id = next(iter(entry.subentries))
    registry = er.async_get(hass)
    entity_id = registry.async_get_or_create(
        "sensor",
        DOMAIN,
        f"{subentry_id}_prefill_tokens",
        suggested_object_id="agent_0_last_prefilled_tokens",
    ).entity_id
    mock_restore_cache_with_extra_data(
        hass,
        (
            (
                State(entity_id, "42"),
                {"native_value": 42, "native_unit_of_measurement": "tokens"},
            ),
        ),
    )
    await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    assert hass.states.get(entity_id).state == "42"


async def test_busy_reads_yes_or_no(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """Busy has no "running" device class: its translated states are Yes and No."""
    await make_entry()
    busy = hass.states.get(BUSY)
    assert busy.state == STATE_OFF
    assert "device_class" not in busy.attributes
    texts = await translation.async_get_translations(hass, "en", "entity", [DOMAIN])
    prefix = f"component.{DOMAIN}.entity.binary_sensor.busy"
    assert texts[f"{prefix}.name"] == "Busy"
    assert texts[f"{prefix}.state.on"] == "Yes"
    assert texts[f"{prefix}.state.off"] == "No"


@pytest.mark.usefixtures("all_entities_enabled")
async def test_readings_are_checked_only_after_changes_that_can_alter_them(
    hass: HomeAssistant, make_entry: EntryFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A recorded run re-reads the last answer's sensors; the model's queue the others."""
    entry = await make_entry()
    await converse(hass)
    loaded = model_session(entry)
    read: list[str] = []
    for cls in (AgentSensor, BusySensor):
        original = cls.reading

        def reading(self: AgentStatusEntity, original: Any = original) -> object:
            read.append(self.entity_description.key)
            return original(self)

        monkeypatch.setattr(cls, "reading", reading)
    last_answer = {"time_to_first_token", "tokens_per_second", "prefill_tokens"}
    always = {"memory"}  # every run sets it, recorded or not

    loaded.record(loaded.recent[-1])
    await asyncio.sleep(0)
    assert set(read) == last_answer | always
    read.clear()
    async with loaded._lock:
        await asyncio.sleep(0)
        assert (
            set(read)
            == {
                "busy",
                "queue_length",
                "prompt_cache",
                "system_prompt_tokens",
                "context_use",
                "prompt_cache_size",
            }
            | always
        )
    read.clear()
    loaded.notify()  # any other change: every reading
    await asyncio.sleep(0)
    assert last_answer <= set(read)
    assert "busy" in read
    assert hass.states.get(BUSY).state == STATE_OFF
