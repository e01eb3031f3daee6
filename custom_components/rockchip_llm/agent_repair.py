"""The fix flow of an agent that did not start: another model or context, or try again."""

from typing import Any

from homeassistant.components.repairs import RepairsFlowResult
from homeassistant.helpers.selector import (
    NumberSelector,
    NumberSelectorConfig,
    NumberSelectorMode,
)

from .agent_state import AgentFailure
from .config_flow import async_scan_or_abort, model_selector
from .const import (
    AGENT_OPTION_DEFAULTS,
    CONF_MAX_CONTEXT_LEN,
    CONF_MODEL,
    MAX_CONTEXT_FIELD,
)
from .fix_flow import AgentFixFlow
from .ha_compat import vol
from .model_limits import async_get_model_limits


class AgentFailedRepairFlow(AgentFixFlow):
    """An agent's model did not load or its prompt could not be set up.

    The form shows the reason and offers what can change here: the model and the
    context length (up to the model's limit, where known). Submitting reloads the
    integration, which tries the agent again, also when nothing was changed (a
    model file replaced meanwhile).
    """

    async def async_step_init(
        self, user_input: dict[str, Any] | None = None
    ) -> RepairsFlowResult:
        """Show the reason and the agent's model and context; store them and reload."""
        if (fixed := self._agent_subentry()) is None:
            return self.async_abort(reason="agent_removed")
        entry, subentry = fixed
        runtime = getattr(entry, "runtime_data", None)
        failure: AgentFailure | None = (
            runtime.failure(self._subentry_id) if runtime is not None else None
        )
        placeholders = {
            "agent": subentry.title,
            CONF_MODEL: subentry.data[CONF_MODEL],
            "error": failure.error if failure is not None else "-",
        }
        scan, simulated = await async_scan_or_abort(entry, placeholders)
        limits = await async_get_model_limits(self.hass)

        def limit_of(model: str) -> int | None:
            if (info := scan.models.get(model)) is not None and (
                known := limits.get(info)
            ) is not None:
                return known
            if failure is not None and model == subentry.data[CONF_MODEL]:
                return failure.numbers.get("model_limit")
            return None

        errors: dict[str, str] = {}
        # The first call may carry {"issue_id": ...} (a compatibility shim of HA).
        if user_input is not None and CONF_MAX_CONTEXT_LEN in user_input:
            picked = user_input[CONF_MODEL]
            context = int(user_input[CONF_MAX_CONTEXT_LEN])
            if picked not in scan.models:
                errors[CONF_MODEL] = "model_gone"
            elif (limit := limit_of(picked)) is not None and context > limit:
                errors[CONF_MAX_CONTEXT_LEN] = "context_above_model_limit"
            else:
                data = {**subentry.data, CONF_MODEL: picked}
                data[CONF_MAX_CONTEXT_LEN] = context
                if not self.hass.config_entries.async_update_subentry(
                    entry, subentry, data=data
                ):
                    # Unchanged: the update listener does not reload; try again.
                    self.hass.config_entries.async_schedule_reload(entry.entry_id)
                return self.async_create_entry(data={})
        options = {**AGENT_OPTION_DEFAULTS, **subentry.data, **(user_input or {})}
        model = options[CONF_MODEL]
        if model not in scan.models:
            model = next(iter(scan.models))
        context = int(options[CONF_MAX_CONTEXT_LEN])
        limit = limit_of(model)
        if limit is not None and context > limit and not errors:
            context = limit  # the most the runtime said the model takes
        placeholders["limit"] = f"{limit:,}" if limit is not None else "unknown"
        return self.async_show_form(
            step_id="init",
            data_schema=vol.Schema(
                {
                    vol.Required(CONF_MODEL, default=model): model_selector(
                        scan.models, simulated
                    ),
                    vol.Required(CONF_MAX_CONTEXT_LEN, default=context): vol.All(
                        NumberSelector(
                            NumberSelectorConfig(
                                min=0,
                                max=MAX_CONTEXT_FIELD,
                                mode=NumberSelectorMode.BOX,
                            )
                        ),
                        vol.Coerce(int),
                    ),
                }
            ),
            errors=errors or None,
            description_placeholders=placeholders,
        )
