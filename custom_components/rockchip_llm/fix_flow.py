"""What every fix flow of one agent shares: the entry and subentry it fixes."""

from homeassistant.components.repairs import RepairsFlow
from homeassistant.config_entries import ConfigEntry, ConfigSubentry


class AgentFixFlow(RepairsFlow):
    """A fix flow of one agent (a subentry of a runtime entry)."""

    def __init__(self, entry_id: str, subentry_id: str) -> None:
        """Fix the agent subentry_id of the config entry entry_id."""
        self._entry_id = entry_id
        self._subentry_id = subentry_id

    def _agent_subentry(self) -> tuple[ConfigEntry, ConfigSubentry] | None:
        """Return the entry and the agent's subentry (None: either was removed)."""
        entry = self.hass.config_entries.async_get_entry(self._entry_id)
        if entry is None or self._subentry_id not in entry.subentries:
            return None
        return entry, entry.subentries[self._subentry_id]
