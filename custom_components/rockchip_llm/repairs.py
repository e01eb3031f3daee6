"""Fix flows of repair issues: a model folder that is gone, a prefix that is too long."""

from typing import Any

from homeassistant.components.repairs import RepairsFlow, RepairsFlowResult
from homeassistant.core import HomeAssistant
from homeassistant.helpers.selector import (
    NumberSelector,
    NumberSelectorConfig,
    NumberSelectorMode,
    SelectSelector,
    SelectSelectorConfig,
)

from .agent import Agent
from .agent_repair import AgentFailedRepairFlow
from .agent_state import AGENT_ISSUE_KIND
from .config_flow import async_scan_or_abort, model_selector
from .const import (
    AGENT_OPTION_DEFAULTS,
    CONF_MAX_CONTEXT_LEN,
    CONF_MODEL,
    CONF_TOOL_GROUPS,
    MAX_CONTEXT_FIELD,
)
from .fix_flow import AgentFixFlow
from .ha_compat import vol
from .prefix_report import (
    PREFIX_ISSUE_KIND,
    async_group_costs,
    costs_text,
    prefix_attributes,
)
from .tool_groups import ToolGroup


class ModelMissingRepairFlow(AgentFixFlow):
    """Let the user pick another model folder for an agent whose folder is gone."""

    async def async_step_init(
        self, user_input: dict[str, str] | None = None
    ) -> RepairsFlowResult:
        """Show the models found now; store the chosen one (the entry reloads)."""
        if (fixed := self._agent_subentry()) is None:
            return self.async_abort(reason="agent_removed")
        entry, subentry = fixed
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


class PrefixRepairFlow(AgentFixFlow):
    """An agent's prefix was trimmed or does not fit: change its tools or context.

    The form offers what can be changed here (the tool groups, the context up to
    the model's limit) and links to Voice assistants, Expose for the devices.
    """

    async def async_step_init(
        self, user_input: dict[str, Any] | None = None
    ) -> RepairsFlowResult:
        """Show the numbers and the choices; store them (the entry reloads)."""
        if (fixed := self._agent_subentry()) is None:
            return self.async_abort(reason="agent_removed")
        entry, subentry = fixed
        runtime = getattr(entry, "runtime_data", None)
        agent: Agent | None = (
            runtime.agents.get(self._subentry_id) if runtime is not None else None
        )
        limit = agent.session.worker.context_limit if agent is not None else None
        # The first call may carry {"issue_id": ...} (a compatibility shim of HA).
        # The form's number box refuses a context above the model's limit.
        if user_input is not None and CONF_MAX_CONTEXT_LEN in user_input:
            self.hass.config_entries.async_update_subentry(
                entry,
                subentry,
                data={
                    **subentry.data,
                    CONF_MAX_CONTEXT_LEN: int(user_input[CONF_MAX_CONTEXT_LEN]),
                    CONF_TOOL_GROUPS: list(user_input.get(CONF_TOOL_GROUPS, [])),
                },
            )
            return self.async_create_entry(data={})
        options = {**AGENT_OPTION_DEFAULTS, **subentry.data}
        attributes = prefix_attributes(agent) if agent is not None else {}
        placeholders = {
            "agent": subentry.title,
            "model": str(subentry.data.get(CONF_MODEL)),
            "tokens": str(
                attributes.get("full_prefix_tokens")
                or attributes.get("prefix_tokens", "?")
            ),
            "max_context_len": str(
                attributes.get("max_context_len", options[CONF_MAX_CONTEXT_LEN])
            ),
            "limit": str(limit or "unknown"),
            "tool_costs": costs_text(
                await async_group_costs(self.hass, options, agent)
            ),
            "expose_url": "/config/voice-assistants/expose",
        }
        groups = subentry.data.get(
            CONF_TOOL_GROUPS, [group.value for group in ToolGroup]
        )
        maximum = limit or MAX_CONTEXT_FIELD
        return self.async_show_form(
            step_id="init",
            data_schema=vol.Schema(
                {
                    vol.Required(
                        CONF_MAX_CONTEXT_LEN,
                        default=min(
                            maximum,
                            attributes.get("max_context_len")
                            or int(options[CONF_MAX_CONTEXT_LEN])
                            or maximum,
                        ),
                    ): vol.All(
                        NumberSelector(
                            NumberSelectorConfig(
                                min=128, max=maximum, mode=NumberSelectorMode.BOX
                            )
                        ),
                        vol.Coerce(int),
                    ),
                    vol.Optional(CONF_TOOL_GROUPS, default=groups): SelectSelector(
                        SelectSelectorConfig(
                            options=[group.value for group in ToolGroup],
                            translation_key=CONF_TOOL_GROUPS,
                            multiple=True,
                        )
                    ),
                }
            ),
            description_placeholders=placeholders,
        )


async def async_create_fix_flow(
    hass: HomeAssistant,
    issue_id: str,
    data: dict[str, str | int | float | None] | None,
) -> RepairsFlow:
    """Create the fix flow of a fixable issue: a missing model, an agent, a prefix."""
    assert data is not None
    if data.get("kind") == AGENT_ISSUE_KIND:
        return AgentFailedRepairFlow(str(data["entry_id"]), str(data["subentry_id"]))
    if data.get("kind") == PREFIX_ISSUE_KIND:
        return PrefixRepairFlow(str(data["entry_id"]), str(data["subentry_id"]))
    return ModelMissingRepairFlow(str(data["entry_id"]), str(data["subentry_id"]))
