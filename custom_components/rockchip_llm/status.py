"""Base of the entities that show what an agent's model is doing.

They are pushed: the model's handle notifies its listeners when a run ends, a
cache build starts or ends, and requests wait for or take the model.
"""

from homeassistant.config_entries import ConfigSubentry
from homeassistant.core import callback
from homeassistant.helpers.entity import Entity, EntityDescription

from . import RockchipConfigEntry
from .agent import Agent
from .entity import agent_device_info
from .turn import RunStats


class AgentStatusEntity(Entity):
    """A reading of an agent's model, on the agent's device."""

    _attr_has_entity_name = True
    _attr_should_poll = False
    follows: frozenset[str] | None = None
    """The kinds of change of the model (session.QUEUE, RUNS) that can alter the
    reading, besides the others; None: every one."""

    def __init__(
        self,
        entry: RockchipConfigEntry,
        subentry: ConfigSubentry,
        description: EntityDescription,
    ) -> None:
        """Bind the entity to its agent."""
        self.entity_description = description
        self._agent = entry.runtime_data.agents[subentry.subentry_id]
        self._attr_unique_id = f"{subentry.subentry_id}_{description.key}"
        self._attr_device_info = agent_device_info(entry, subentry)

    @property
    def agent(self) -> Agent:
        """The agent whose model this entity reads."""
        return self._agent

    @property
    def available(self) -> bool:
        """Available while the agent's model is loaded."""
        return self._agent.session.available

    def reading(self) -> object:
        """Return what the entity shows; its state is written when this changes."""
        raise NotImplementedError

    async def async_added_to_hass(self) -> None:
        """Follow the model's changes."""
        await super().async_added_to_hass()
        shown = (self.available, self.reading())

        @callback
        def changed() -> None:
            # The model notifies several times per request (queued, taken,
            # released, measured): only a reading that changed is written.
            nonlocal shown
            now = (self.available, self.reading())
            if now != shown:
                shown = now
                self.async_write_ha_state()

        self.async_on_remove(self._agent.session.add_listener(changed, self.follows))


def last_run(agent: Agent) -> RunStats | None:
    """Return the agent's most recent answer (others on the same model do not push it out)."""
    return agent.session.last_runs.get(agent.subentry_id)
