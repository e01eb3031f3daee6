"""How an agent's system prefix fits its context: for the device page, diagnostics, repairs."""

from collections.abc import Mapping
import functools
from typing import Any

from homeassistant.core import HomeAssistant, callback
from homeassistant.helpers import issue_registry as ir

from .agent import Agent
from .agent_prefix import async_render_prefix
from .compact_prefix import PrefixLayout, split_tokens
from .const import CONF_TOOL_GROUPS, DOMAIN
from .run_planner import CHARS_PER_TOKEN
from .system_cache import PrefixFit
from .tool_groups import ToolGroup, tool_group, trim_device_list, trimmed_groups

PREFIX_ISSUE_KIND = "prefix"
"""The fix flow kind of the repairs of a prefix that was trimmed or does not fit."""


def left_out(trim: int) -> list[str]:
    """Return what a prefix trimmed trim steps leaves out, in that order."""
    parts = [] if trim_device_list(trim) else ["device_list"]
    return parts + [f"tools:{group.value}" for group in trimmed_groups(trim)]


def _left_out_text(trim: int) -> str:
    parts = [] if trim_device_list(trim) else ["the device list"]
    groups = [group.value.replace("_", " and ") for group in trimmed_groups(trim)]
    if groups:
        parts.append("the tools for " + ", ".join(groups))
    return "; ".join(parts)


def prefix_attributes(agent: Agent) -> dict[str, Any]:
    """Return the prefix in tokens, split, against the context (empty: unprepared)."""
    keeper = agent.system_cache
    if keeper is None or keeper.fit is None:
        return {}
    layout = keeper.layout if keeper.prefix is not None else None
    return dict(
        _prefix_attributes(keeper.fit, layout, agent.session.worker.context_limit)
    )


@functools.lru_cache(maxsize=16)
def _prefix_attributes(
    fit: PrefixFit, layout: PrefixLayout | None, context_limit: int | None
) -> dict[str, Any]:
    """Kept per fit and layout: a sensor reads them on every change of the model."""
    attributes: dict[str, Any] = {
        "prefix_tokens": fit.tokens,
        "counted_by": fit.counted_by,
        "max_context_len": fit.max_context_len,
        "model_context_limit": context_limit,
        "free_tokens": fit.max_context_len - fit.tokens,
        "needed_for_a_turn": fit.room,
        "fits": fit.fits,
        "left_out": left_out(fit.trim),
        "full_prefix_tokens": fit.full_tokens,
    }
    if layout is not None:
        attributes |= split_tokens(layout, fit.tokens)
    return attributes


def prefix_issue_id(entry_id: str, subentry_id: str) -> str:
    """Return the id of the repair of an agent's prefix (one per agent)."""
    return f"agent_failed_{entry_id}_prefix_{subentry_id}"


@callback
def async_report_fit(
    hass: HomeAssistant, entry_id: str, entry_title: str, agent: Agent
) -> None:
    """Raise the repair of a trimmed or unfitting prefix, or clear it."""
    keeper = agent.system_cache
    issue_id = prefix_issue_id(entry_id, agent.subentry_id)
    fit = keeper.fit if keeper is not None else None
    if fit is None or (fit.fits and fit.trim == 0):
        ir.async_delete_issue(hass, DOMAIN, issue_id)
        return
    ir.async_create_issue(
        hass,
        DOMAIN,
        issue_id,
        is_fixable=True,
        is_persistent=False,
        data={
            "kind": PREFIX_ISSUE_KIND,
            "entry_id": entry_id,
            "subentry_id": agent.subentry_id,
        },
        severity=ir.IssueSeverity.WARNING if fit.fits else ir.IssueSeverity.ERROR,
        translation_key="prefix_trimmed" if fit.fits else "prefix_does_not_fit",
        translation_placeholders={
            "agent": agent.title,
            "entry": entry_title,
            "model": agent.session.name,
            "tokens": str(fit.tokens),
            "full_tokens": str(fit.full_tokens or fit.tokens),
            "counted_by": fit.counted_by,
            "max_context_len": str(fit.max_context_len),
            "model_limit": str(agent.session.worker.context_limit or "unknown"),
            "room": str(fit.room),
            "left_out": _left_out_text(fit.trim) or "nothing",
        },
    )


async def async_group_costs(
    hass: HomeAssistant, options: Mapping[str, Any], agent: Agent | None
) -> dict[ToolGroup, tuple[int, int]]:
    """Tools and tokens of each tool group the agent's API offers now.

    Tokens are the tool's share of the full prefix: at the agent's own ratio of
    the runtime's count to characters when it has one, else our estimate.
    """
    options = {key: value for key, value in options.items() if key != CONF_TOOL_GROUPS}
    _prefix, layout = await async_render_prefix(hass, options)
    fit = agent.system_cache.fit if agent and agent.system_cache else None
    ratio = 1 / CHARS_PER_TOKEN
    if fit is not None and fit.counted_by == "runtime" and agent and agent.system_cache:
        if (used := agent.system_cache.layout) is not None and used.total_chars:
            ratio = fit.tokens / used.total_chars
    shared = layout.shared_chars / max(len(layout.tools_chars), 1)
    costs: dict[ToolGroup, tuple[int, int]] = {}
    for name, chars in layout.tools_chars:
        group = tool_group(name)
        tools, tokens = costs.get(group, (0, 0))
        costs[group] = (tools + 1, tokens + round((chars + shared) * ratio))
    return costs


def costs_text(costs: Mapping[ToolGroup, tuple[int, int]]) -> str:
    """Write the groups' costs for a form: "lights_switches: 3 tools, 420 tokens; …"."""
    if not costs:
        return "no tools"
    return "; ".join(
        f"{group.value}: {tools} tools, {tokens} tokens"
        for group, (tools, tokens) in sorted(costs.items(), key=lambda i: -i[1][1])
    )
