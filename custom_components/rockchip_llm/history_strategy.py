"""The history strategy an agent runs with, falling back when the runtime ignores it."""

from collections import deque
from datetime import UTC, datetime
from typing import Any, Final

from homeassistant.core import HomeAssistant
from homeassistant.helpers import issue_registry as ir

from .const import DOMAIN, LOGGER, HistoryStrategy
from .run_planner import reuse_honoured

_FALLBACK: Final = {
    HistoryStrategy.AUTO: HistoryStrategy.PROMPT_CACHE_ONLY,
    HistoryStrategy.PROMPT_CACHE_ONLY: HistoryStrategy.OFF,
}
"""The next strategy to try when the runtime does not honour one."""

REUSE_CHECKS_KEPT: Final = 10


class HistoryStrategyGuard:
    """An agent's history strategy in force, checked against what runs prefill.

    Serves as the session's ReuseGuard. A reload tries the preferred strategy again.
    """

    def __init__(
        self,
        hass: HomeAssistant,
        subentry_id: str,
        title: str,
        preferred: HistoryStrategy,
    ) -> None:
        """Start with the preferred strategy; clear an earlier fallback's repair."""
        self._hass = hass
        self._title = title
        self._issue_id = f"reuse_not_honoured_{subentry_id}"
        self.strategy = preferred
        """The strategy in force: the setting, or a fallback the runtime honours."""
        self.failures: deque[dict[str, Any]] = deque(maxlen=REUSE_CHECKS_KEPT)
        """The checks that failed, most recent last (for diagnostics)."""
        ir.async_delete_issue(hass, DOMAIN, self._issue_id)

    def check_reuse(
        self, prefill_tokens: int, expected: int, prefix_tokens: int, source: str
    ) -> bool:
        """Compare a run that should have reused the prefix with what it prefilled.

        When the runtime prefilled far more (cache or KV not honoured), the agent
        falls back to the next strategy, logs and raises a repair issue with the
        numbers. Returns whether the reuse was honoured.
        """
        if reuse_honoured(prefill_tokens, expected, prefix_tokens):
            return True
        previous = self.strategy
        fallback = _FALLBACK[previous]  # "off" reuses nothing, so is never checked
        self.failures.append(
            {
                "at": datetime.now(UTC).isoformat(),
                "source": source,
                "strategy": previous.value,
                "prefill_tokens": prefill_tokens,
                "expected_tokens": expected,
                "prefix_tokens": prefix_tokens,
                "switched_to": fallback.value,
            }
        )
        LOGGER.warning(
            "Agent %s: the runtime prefilled %d tokens where about %d were expected "
            "(the %d-token prefix was not reused in %s mode); switching to %s",
            self._title,
            prefill_tokens,
            expected,
            prefix_tokens,
            previous,
            fallback,
        )
        self.strategy = fallback
        ir.async_create_issue(
            self._hass,
            DOMAIN,
            self._issue_id,
            is_fixable=False,
            severity=ir.IssueSeverity.WARNING,
            translation_key="reuse_not_honoured",
            translation_placeholders={
                "agent": self._title,
                "strategy": str(previous),
                "fallback": str(fallback),
                "prefill_tokens": str(prefill_tokens),
                "expected_tokens": str(expected),
                "prefix_tokens": str(prefix_tokens),
            },
        )
        return False
