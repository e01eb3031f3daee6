"""Sensors of an agent's model: prompt cache, context use, speed, queue, memory, NPU."""

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import Any, Final, cast

from homeassistant.components.sensor import (
    RestoreSensor,
    SensorDeviceClass,
    SensorEntity,
    SensorEntityDescription,
    SensorStateClass,
)
from homeassistant.config_entries import ConfigSubentry
from homeassistant.const import (
    PERCENTAGE,
    EntityCategory,
    UnitOfInformation,
    UnitOfTime,
)
from homeassistant.core import HomeAssistant
from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback
from homeassistant.helpers.typing import StateType

from . import RockchipConfigEntry
from .agent import Agent
from .const import SUBENTRY_AI_TASK, SUBENTRY_CONVERSATION
from .entity import agent_subentries
from .host.prompt_cache import CacheEntry
from .prefix_report import prefix_attributes
from .remote import RuntimeHost
from .session import QUEUE, RUNS
from .status import AgentStatusEntity, last_run

# Readings are pushed by the model's handle; nothing waits for an update.
PARALLEL_UPDATES = 0

TOKENS: Final = "tokens"
SCAN_INTERVAL = timedelta(seconds=10)
"""Only the NPU load is polled: it is a kernel file, not the model."""


class CacheState(StrEnum):
    """States of the prompt cache sensor."""

    READY = "ready"
    BUILDING = "building"
    FAILED = "failed"
    NONE = "none"


def _system_cache(agent: Agent) -> CacheEntry | None:
    return agent.system_cache.cache if agent.system_cache else None


def cache_state(agent: Agent) -> str:
    """Whether the agent's system prompt cache is ready, being built or missing."""
    session = agent.session
    if session.building is not None:
        return CacheState.BUILDING
    if _system_cache(agent) is not None:
        return CacheState.READY
    return CacheState.FAILED if session.build_error else CacheState.NONE


def _cache_attributes(agent: Agent) -> Mapping[str, Any]:
    return {"last_build_error": agent.session.build_error}


def _prompt_tokens(agent: Agent) -> int | None:
    """Tokens of the system prompt and tools, as counted by the cache build.

    Without a cache because the prefix does not fit: the count that says so.
    """
    cache = _system_cache(agent)
    if cache and cache.metadata:
        return cache.metadata.tokens
    fit = agent.system_cache.fit if agent.system_cache else None
    return fit.tokens if fit and not fit.fits else None


def _context_use(agent: Agent) -> float | None:
    tokens = _prompt_tokens(agent)
    if tokens is None:
        return None
    return round(tokens * 100 / agent.settings.max_context_len, 1)


def _cache_size(agent: Agent) -> int | None:
    cache = _system_cache(agent)
    return cache.metadata.size_bytes if cache and cache.metadata else None


def _ttft(agent: Agent) -> float | None:
    run = last_run(agent)
    return round(run.ttft_ms, 1) if run and run.ttft_ms is not None else None


def _tokens_per_second(agent: Agent) -> float | None:
    run = last_run(agent)
    if run is None or run.generate_ms <= 0:
        return None
    return round(run.generate_tokens * 1000 / run.generate_ms, 2)


def _prefill_tokens(agent: Agent) -> int | None:
    run = last_run(agent)
    return run.prefill_tokens if run else None


@dataclass(frozen=True, kw_only=True)
class AgentSensorDescription(SensorEntityDescription):
    """A reading of an agent's model."""

    value_fn: Callable[[Agent], StateType]
    attributes_fn: Callable[[Agent], Mapping[str, Any]] | None = None
    chat_only: bool = False
    """Only conversation agents have a system prompt cache."""
    restore: bool = False
    """A reading of the last answer: shown again after a restart until the next one."""
    follows: frozenset[str] | None = frozenset({QUEUE})
    """What, besides other changes, can alter the reading (AgentStatusEntity)."""


SENSORS: Final = (
    AgentSensorDescription(
        key="prompt_cache",
        translation_key="prompt_cache",
        device_class=SensorDeviceClass.ENUM,
        options=[state.value for state in CacheState],
        value_fn=cache_state,
        attributes_fn=_cache_attributes,
        chat_only=True,
    ),
    AgentSensorDescription(
        key="system_prompt_tokens",
        translation_key="system_prompt_tokens",
        native_unit_of_measurement=TOKENS,
        state_class=SensorStateClass.MEASUREMENT,
        value_fn=_prompt_tokens,
        chat_only=True,
    ),
    AgentSensorDescription(
        key="context_use",
        translation_key="context_use",
        native_unit_of_measurement=PERCENTAGE,
        state_class=SensorStateClass.MEASUREMENT,
        suggested_display_precision=0,
        value_fn=_context_use,
        attributes_fn=prefix_attributes,
        chat_only=True,
    ),
    AgentSensorDescription(
        key="prompt_cache_size",
        translation_key="prompt_cache_size",
        device_class=SensorDeviceClass.DATA_SIZE,
        native_unit_of_measurement=UnitOfInformation.BYTES,
        suggested_unit_of_measurement=UnitOfInformation.MEGABYTES,
        suggested_display_precision=1,
        entity_category=EntityCategory.DIAGNOSTIC,
        entity_registry_enabled_default=False,
        value_fn=_cache_size,
        chat_only=True,
    ),
    AgentSensorDescription(
        key="time_to_first_token",
        translation_key="time_to_first_token",
        device_class=SensorDeviceClass.DURATION,
        native_unit_of_measurement=UnitOfTime.MILLISECONDS,
        state_class=SensorStateClass.MEASUREMENT,
        suggested_display_precision=0,
        value_fn=_ttft,
        restore=True,
        follows=frozenset({RUNS}),
    ),
    AgentSensorDescription(
        key="tokens_per_second",
        translation_key="tokens_per_second",
        native_unit_of_measurement="tokens/s",
        state_class=SensorStateClass.MEASUREMENT,
        suggested_display_precision=1,
        value_fn=_tokens_per_second,
        restore=True,
        follows=frozenset({RUNS}),
    ),
    AgentSensorDescription(
        key="prefill_tokens",
        translation_key="prefill_tokens",
        native_unit_of_measurement=TOKENS,
        state_class=SensorStateClass.MEASUREMENT,
        value_fn=_prefill_tokens,
        restore=True,
        follows=frozenset({RUNS}),
    ),
    AgentSensorDescription(
        key="queue_length",
        translation_key="queue_length",
        state_class=SensorStateClass.MEASUREMENT,
        value_fn=lambda agent: agent.session.waiting,
    ),
    AgentSensorDescription(
        key="memory",
        translation_key="memory",
        device_class=SensorDeviceClass.DATA_SIZE,
        native_unit_of_measurement=UnitOfInformation.MEGABYTES,
        state_class=SensorStateClass.MEASUREMENT,
        suggested_display_precision=0,
        entity_category=EntityCategory.DIAGNOSTIC,
        value_fn=lambda agent: agent.session.memory_mb,
        follows=None,  # set by every run, also those not recorded (warm-ups)
    ),
)

NPU_LOAD: Final = SensorEntityDescription(
    key="npu_load",
    translation_key="npu_load",
    native_unit_of_measurement=PERCENTAGE,
    state_class=SensorStateClass.MEASUREMENT,
    suggested_display_precision=0,
    entity_category=EntityCategory.DIAGNOSTIC,
)


async def async_setup_entry(
    hass: HomeAssistant,
    entry: RockchipConfigEntry,
    async_add_entities: AddConfigEntryEntitiesCallback,
) -> None:
    """Add the sensors of every agent; NPU load only where the kernel shows it."""
    host = entry.runtime_data.engine.host
    npu_load = await host.async_npu_load()
    for subentry_type in (SUBENTRY_CONVERSATION, SUBENTRY_AI_TASK):
        chat = subentry_type == SUBENTRY_CONVERSATION
        for subentry in agent_subentries(entry, subentry_type):
            entities: list[SensorEntity] = [
                (LastAnswerSensor if description.restore else AgentSensor)(
                    entry, subentry, description
                )
                for description in SENSORS
                if chat or not description.chat_only
            ]
            if npu_load is not None:
                entities.append(NPULoadSensor(entry, subentry, host, npu_load))
            async_add_entities(entities, config_subentry_id=subentry.subentry_id)


class AgentSensor(AgentStatusEntity, SensorEntity):
    """A pushed reading of an agent's model."""

    entity_description: AgentSensorDescription

    def __init__(
        self,
        entry: RockchipConfigEntry,
        subentry: ConfigSubentry,
        description: AgentSensorDescription,
    ) -> None:
        """Bind the sensor to its agent; it follows what its description says."""
        super().__init__(entry, subentry, description)
        self.follows = description.follows

    def reading(self) -> object:
        """Return the value and its attributes."""
        return (self.native_value, self.extra_state_attributes)

    @property
    def native_value(self) -> StateType:
        """The reading (none for an agent that was not set up)."""
        if (agent := self.set_up_agent) is None:
            return None
        return self.entity_description.value_fn(agent)

    @property
    def extra_state_attributes(self) -> Mapping[str, Any] | None:
        """Extra details of the reading, where it has them."""
        if (attributes := self.entity_description.attributes_fn) is None:
            return None
        return attributes(self.agent)


class LastAnswerSensor(AgentSensor, RestoreSensor):
    """A reading of the agent's last answer, restored after a restart.

    Until the agent answers again, the reading from before the restart is shown.
    """

    _restored: StateType = None

    async def async_added_to_hass(self) -> None:
        """Take the last reading from before the restart, then follow the model."""
        if (data := await self.async_get_last_sensor_data()) is not None:
            self._restored = cast("StateType", data.native_value)
        await super().async_added_to_hass()

    @property
    def native_value(self) -> StateType:
        """The last answer's reading; the restored one before the first answer."""
        value = super().native_value
        return self._restored if value is None else value


class NPULoadSensor(AgentStatusEntity, SensorEntity):
    """The load of the NPU cores, as the host reads it from the kernel's debug file."""

    _attr_should_poll = True
    follows = frozenset[str]()  # polled: the model's changes never alter it

    def __init__(
        self,
        entry: RockchipConfigEntry,
        subentry: ConfigSubentry,
        host: RuntimeHost,
        load: float,
    ) -> None:
        """Ask host for the load; load is its first reading."""
        super().__init__(entry, subentry, NPU_LOAD)
        self._host = host
        self._attr_native_value = load

    def reading(self) -> object:
        """Return the last load read (polled, so the model's changes rarely alter it)."""
        return self._attr_native_value

    async def async_update(self) -> None:
        """Ask the host for the NPU load."""
        self._attr_native_value = await self._host.async_npu_load()
