"""Base of the entities that show what an agent's model is doing.

They are pushed: the model's handle notifies its listeners when a run ends, a
cache build starts or ends, and requests wait for or take the model.
"""

from homeassistant.config_entries import ConfigSubentry
from homeassistant.helpers.entity import EntityDescription

from . import RockchipConfigEntry
from .agent import Agent
from .agent_state import AgentFailure
from .entity import AgentEntity
from .turn import RunStats


class AgentStatusEntity(AgentEntity):
    """A reading of an agent's model, on the agent's device."""

    def __init__(
        self,
        entry: RockchipConfigEntry,
        subentry: ConfigSubentry,
        description: EntityDescription,
    ) -> None:
        """Bind the entity to its agent."""
        super().__init__(entry, subentry)
        self.entity_description = description
        self._attr_unique_id = f"{subentry.subentry_id}_{description.key}"

    def explains(self, failure: AgentFailure) -> bool:
        """Whether this reading is one that explains the failure."""
        return self.entity_description.key in failure.explained_by

    def reading(self) -> object:
        """Return what the entity shows; its state is written when this changes."""
        raise NotImplementedError


def last_run(agent: Agent) -> RunStats | None:
    """Return the agent's most recent answer (others on the same model do not push it out)."""
    return agent.session.last_runs.get(agent.subentry_id)
