"""One agent (a conversation subentry): its settings, model and system cache."""

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Self

from homeassistant.core import HomeAssistant
from homeassistant.helpers import issue_registry as ir
from homeassistant.helpers.debounce import Debouncer

from .agent_prefix import async_render_prefix
from .const import (
    AGENT_OPTION_DEFAULTS,
    AUTO_CACHE_PREFIX,
    CONF_ENABLE_THINKING,
    CONF_HISTORY_STRATEGY,
    CONF_MAX_CONTEXT_LEN,
    CONF_MAX_HISTORY,
    CONF_MAX_NEW_TOKENS,
    CONF_MODEL,
    CONF_REPEAT_PENALTY,
    CONF_TEMPERATURE,
    CONF_TOP_K,
    CONF_TOP_P,
    DOMAIN,
    LOGGER,
    MAX_AUTO_CACHES,
    REBUILD_DEBOUNCE_SECONDS,
    SYSTEM_CACHE_NAME,
    HistoryStrategy,
)
from .engine import Engine, LoadedModel
from .prompt_cache import CacheEntry, CacheWriteError
from .rkllm.runtime import Sampling
from .run_planner import SystemPrefix, expected_prefill, reuse_honoured

WARM_UP_PROMPT: Final = "Hi"
"""The turn of the check run made right after a cache is loaded."""

_FALLBACK: Final = {
    HistoryStrategy.AUTO: HistoryStrategy.PROMPT_CACHE_ONLY,
    HistoryStrategy.PROMPT_CACHE_ONLY: HistoryStrategy.OFF,
}
"""The next strategy to try when the runtime does not honour one."""

REUSE_CHECKS_KEPT: Final = 10


@dataclass(frozen=True, slots=True)
class AgentSettings:
    """The options of an agent, with defaults filled in."""

    model: str
    max_context_len: int
    max_new_tokens: int
    sampling: Sampling
    enable_thinking: bool
    max_history: int
    history_strategy: HistoryStrategy

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Self:
        """Read settings from subentry data, defaults filled in."""
        values = {**AGENT_OPTION_DEFAULTS, **options}
        return cls(
            model=values[CONF_MODEL],
            max_context_len=int(values[CONF_MAX_CONTEXT_LEN]),
            max_new_tokens=int(values[CONF_MAX_NEW_TOKENS]),
            sampling=Sampling(
                top_k=int(values[CONF_TOP_K]),
                top_p=float(values[CONF_TOP_P]),
                temperature=float(values[CONF_TEMPERATURE]),
                repeat_penalty=float(values[CONF_REPEAT_PENALTY]),
            ),
            enable_thinking=bool(values[CONF_ENABLE_THINKING]),
            max_history=int(values[CONF_MAX_HISTORY]),
            history_strategy=HistoryStrategy(values[CONF_HISTORY_STRATEGY]),
        )


class Agent:
    """Runtime state of one agent: its loaded model and its system cache."""

    def __init__(
        self,
        hass: HomeAssistant,
        engine: Engine,
        subentry_id: str,
        options: Mapping[str, Any],
        loaded: LoadedModel,
        *,
        chat: bool,
        title: str = "",
    ) -> None:
        """Bind an agent to its loaded model; chat agents keep a system cache."""
        self.hass = hass
        self.title = title or subentry_id
        self.chat = chat
        self.engine = engine
        self.subentry_id = subentry_id
        self.options = options
        self.settings = AgentSettings.from_options(options)
        self.loaded = loaded
        self.strategy = self.settings.history_strategy
        """The strategy in force: the setting, or a fallback the runtime honours."""
        self.reuse_failures: deque[dict[str, Any]] = deque(maxlen=REUSE_CHECKS_KEPT)
        # A reload tries the preferred strategy again.
        ir.async_delete_issue(hass, DOMAIN, self._issue_id)
        self.prefix: SystemPrefix | None = None
        self.cache: CacheEntry | None = None
        self._requested: SystemPrefix | None = None
        self._rebuild = Debouncer(
            hass,
            LOGGER,
            cooldown=REBUILD_DEBOUNCE_SECONDS,
            immediate=False,
            function=self._async_refresh_auto,
            background=True,
        )

    async def async_prepare(
        self, source: str, prefix: SystemPrefix | None = None
    ) -> None:
        """Make the system cache of prefix (default: freshly rendered) ready."""
        if prefix is None:
            prefix = await async_render_prefix(self.hass, self.options)
        async with self.engine.async_hold(self.loaded):
            self.cache = await self.engine.async_prepare(
                self.loaded, prefix, SYSTEM_CACHE_NAME, source
            )
            await self._async_check_cache(self.cache)
        self.prefix = prefix

    async def _async_check_cache(self, cache: CacheEntry | None) -> None:
        """Run a short turn on the cache just loaded; fall back until it is reused.

        So the first request after a restart is not the one that finds out the
        runtime ignores the cache in this strategy (callers hold the model: Engine.async_hold).
        """
        if cache is None or cache.metadata is None:
            return
        while self.strategy is not HistoryStrategy.OFF:
            result = await self.engine.async_warm_up(
                self.loaded,
                WARM_UP_PROMPT,
                keep_history=self.strategy is HistoryStrategy.AUTO,
            )
            if result.perf is None or self.check_reuse(
                result.perf.prefill_tokens,
                expected_prefill(WARM_UP_PROMPT),
                cache.metadata.tokens,
                "warm-up",
            ):
                return

    @property
    def _issue_id(self) -> str:
        return f"reuse_not_honoured_{self.subentry_id}"

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
        self.reuse_failures.append(
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
            self.title,
            prefill_tokens,
            expected,
            prefix_tokens,
            previous,
            fallback,
        )
        self.strategy = fallback
        ir.async_create_issue(
            self.hass,
            DOMAIN,
            self._issue_id,
            is_fixable=False,
            severity=ir.IssueSeverity.WARNING,
            translation_key="reuse_not_honoured",
            translation_placeholders={
                "agent": self.title,
                "strategy": str(previous),
                "fallback": str(fallback),
                "prefill_tokens": str(prefill_tokens),
                "expected_tokens": str(expected),
                "prefix_tokens": str(prefix_tokens),
            },
        )
        return False

    async def async_rebuild(self, name: str, source: str) -> CacheEntry:
        """Build the named cache from the agent's current prefix."""
        prefix = await async_render_prefix(self.hass, self.options)
        async with self.engine.async_hold(self.loaded):
            entry = await self.engine.async_build_cache(
                self.loaded, prefix, name, source
            )
        if name == SYSTEM_CACHE_NAME:
            self.prefix, self.cache = prefix, entry
            self.loaded.notify()
        return entry

    def schedule_refresh(self) -> None:
        """Re-render the prefix later (debounced) and rebuild the cache if it changed."""
        self._rebuild.async_schedule_call()

    def prefix_seen(self, prefix: SystemPrefix, *, cached: bool) -> None:
        """Note the prefix a request carried; one without a cache gets one, debounced."""
        if cached or self.loaded.cache_unsupported is not None:
            return
        LOGGER.debug("A request carried a prefix without a cache; scheduling a build")
        self._requested = prefix
        self.schedule_refresh()

    async def _async_refresh_auto(self) -> None:
        """Keep the system cache current and build one for the prefix requests carry.

        The system cache is for the prefix a request without an area carries; other
        prefixes (a satellite in an area adds a line to the prompt) get caches of their
        own, the most recent MAX_AUTO_CACHES of them kept. When the disk refuses
        a cache (its repair is raised), the agent goes on without it.
        """
        try:
            await self._async_refresh_caches()
        except CacheWriteError as err:
            if err.disk_problem is None:
                raise
            LOGGER.warning("Prompt cache of %s not written: %s", self.loaded.name, err)

    async def _async_refresh_caches(self) -> None:
        requested, self._requested = self._requested, None
        rendered = await async_render_prefix(self.hass, self.options)
        if (
            self.cache is None
            or self.prefix is None
            or rendered.key != self.prefix.key
            or (requested is not None and requested.key == rendered.key)
        ):
            # (the last case: a request found no usable system cache for this prefix)
            await self.async_prepare("auto", rendered)
        if requested is None or requested.key == rendered.key:
            return
        if self.loaded.cache_unsupported is not None:
            return
        async with self.engine.async_hold(self.loaded):
            found = await self.engine.async_find_cache(self.loaded, requested)
            if self.engine.is_exact(found, requested):
                return
            await self.engine.async_build_cache(
                self.loaded,
                requested,
                f"{AUTO_CACHE_PREFIX}{requested.key[:12]}",
                "auto",
            )
            await self.engine.async_prune(
                self.loaded, AUTO_CACHE_PREFIX, MAX_AUTO_CACHES
            )

    async def async_refresh_now(self) -> None:
        """Re-render the prefix now and rebuild the cache if it changed."""
        self._requested = None
        await self._async_refresh_auto()

    def shutdown(self) -> None:
        """Cancel a pending rebuild."""
        self._rebuild.async_shutdown()
