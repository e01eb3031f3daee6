"""Whether an agent's model is busy answering or building a cache."""

from typing import Final

from homeassistant.components.binary_sensor import (
    BinarySensorEntity,
    BinarySensorEntityDescription,
)
from homeassistant.core import HomeAssistant
from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback

from . import RockchipConfigEntry
from .const import SUBENTRY_AI_TASK, SUBENTRY_CONVERSATION
from .entity import agent_subentries
from .session import QUEUE
from .status import AgentStatusEntity

# Pushed by the model's handle; nothing waits for an update.
PARALLEL_UPDATES = 0

BUSY: Final = BinarySensorEntityDescription(key="busy", translation_key="busy")
"""No device class: its states read "Yes" and "No" (translated), not "Running"."""


async def async_setup_entry(
    hass: HomeAssistant,
    entry: RockchipConfigEntry,
    async_add_entities: AddConfigEntryEntitiesCallback,
) -> None:
    """Add a busy sensor to every agent."""
    for subentry_type in (SUBENTRY_CONVERSATION, SUBENTRY_AI_TASK):
        for subentry in agent_subentries(entry, subentry_type):
            async_add_entities(
                [BusySensor(entry, subentry, BUSY)],
                config_subentry_id=subentry.subentry_id,
            )


class BusySensor(AgentStatusEntity, BinarySensorEntity):
    """On while the model runs a request or builds a cache (agents share models)."""

    follows = frozenset({QUEUE})

    def reading(self) -> object:
        """Return whether the model is in use."""
        return self.is_on

    @property
    def is_on(self) -> bool:
        """Whether the model is in use."""
        return self.agent.session.busy
