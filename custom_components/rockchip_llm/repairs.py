"""Fix flows of repair issues: an agent whose model folder is gone picks another."""

from homeassistant.components.repairs import RepairsFlow, RepairsFlowResult
from homeassistant.core import HomeAssistant

from .config_flow import async_scan_or_abort, model_selector
from .const import CONF_MODEL
from .ha_compat import vol


class ModelMissingRepairFlow(RepairsFlow):
    """Let the user pick another model folder for an agent whose folder is gone."""

    def __init__(self, entry_id: str, subentry_id: str) -> None:
        """Fix the agent subentry_id of the config entry entry_id."""
        self._entry_id = entry_id
        self._subentry_id = subentry_id

    async def async_step_init(
        self, user_input: dict[str, str] | None = None
    ) -> RepairsFlowResult:
        """Show the models found now; store the chosen one (the entry reloads)."""
        entry = self.hass.config_entries.async_get_entry(self._entry_id)
        if entry is None or self._subentry_id not in entry.subentries:
            return self.async_abort(reason="agent_removed")
        subentry = entry.subentries[self._subentry_id]
        placeholders = {"agent": subentry.title, CONF_MODEL: subentry.data[CONF_MODEL]}
        scan, simulated = await async_scan_or_abort(entry, placeholders)
        # The first call may carry {"issue_id": ...} (a compatibility shim of HA).
        picked = (user_input or {}).get(CONF_MODEL)
        if picked in scan.models:
            self.hass.config_entries.async_update_subentry(
                entry, subentry, data={**subentry.data, CONF_MODEL: picked}
            )
            return self.async_create_entry(data={})
        return self.async_show_form(
            step_id="init",
            data_schema=vol.Schema(
                {
                    vol.Required(
                        CONF_MODEL, default=next(iter(scan.models))
                    ): model_selector(scan.models, simulated)
                }
            ),
            errors={CONF_MODEL: "model_gone"} if picked is not None else None,
            description_placeholders=placeholders,
        )


async def async_create_fix_flow(
    hass: HomeAssistant,
    issue_id: str,
    data: dict[str, str | int | float | None] | None,
) -> RepairsFlow:
    """Create the fix flow of a fixable issue (only "model_missing" is fixable)."""
    assert data is not None
    return ModelMissingRepairFlow(str(data["entry_id"]), str(data["subentry_id"]))
