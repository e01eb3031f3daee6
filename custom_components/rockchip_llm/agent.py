"""One agent (a conversation subentry): its settings, model and system cache."""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self

from homeassistant.core import HomeAssistant
from homeassistant.helpers.debounce import Debouncer

from .agent_prefix import async_render_prefix
from .chat import SystemPrefix
from .const import (
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
    DEFAULT_ENABLE_THINKING,
    DEFAULT_HISTORY_STRATEGY,
    DEFAULT_MAX_CONTEXT_LEN,
    DEFAULT_MAX_HISTORY,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_REPEAT_PENALTY,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    LOGGER,
    REBUILD_DEBOUNCE_SECONDS,
    SYSTEM_CACHE_NAME,
    HistoryStrategy,
)
from .engine import Engine, LoadedModel
from .prompt_cache import CacheEntry
from .rkllm.runtime import Sampling


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
        """Read settings from subentry data."""
        return cls(
            model=options[CONF_MODEL],
            max_context_len=int(
                options.get(CONF_MAX_CONTEXT_LEN, DEFAULT_MAX_CONTEXT_LEN)
            ),
            max_new_tokens=int(
                options.get(CONF_MAX_NEW_TOKENS, DEFAULT_MAX_NEW_TOKENS)
            ),
            sampling=Sampling(
                top_k=int(options.get(CONF_TOP_K, DEFAULT_TOP_K)),
                top_p=float(options.get(CONF_TOP_P, DEFAULT_TOP_P)),
                temperature=float(options.get(CONF_TEMPERATURE, DEFAULT_TEMPERATURE)),
                repeat_penalty=float(
                    options.get(CONF_REPEAT_PENALTY, DEFAULT_REPEAT_PENALTY)
                ),
            ),
            enable_thinking=bool(
                options.get(CONF_ENABLE_THINKING, DEFAULT_ENABLE_THINKING)
            ),
            max_history=int(options.get(CONF_MAX_HISTORY, DEFAULT_MAX_HISTORY)),
            history_strategy=HistoryStrategy(
                options.get(CONF_HISTORY_STRATEGY, DEFAULT_HISTORY_STRATEGY)
            ),
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
    ) -> None:
        """Bind an agent to its loaded model; chat agents keep a system cache."""
        self.hass = hass
        self.chat = chat
        self.engine = engine
        self.subentry_id = subentry_id
        self.options = options
        self.settings = AgentSettings.from_options(options)
        self.loaded = loaded
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
    ) -> bool:
        """Make the system cache of prefix (default: freshly rendered) ready.

        Returns whether the cache was (re)built.
        """
        if prefix is None:
            prefix = await async_render_prefix(self.hass, self.options)
        async with self.loaded.lock:
            self.cache, built = await self.engine.async_prepare(
                self.loaded, prefix, SYSTEM_CACHE_NAME, source
            )
        self.prefix = prefix
        return built

    async def async_rebuild(self, name: str, source: str) -> CacheEntry:
        """Build the named cache from the agent's current prefix."""
        prefix = await async_render_prefix(self.hass, self.options)
        async with self.loaded.lock:
            entry = await self.engine.async_build_cache(
                self.loaded, prefix, name, source
            )
        if name == SYSTEM_CACHE_NAME:
            self.prefix, self.cache = prefix, entry
        return entry

    def schedule_refresh(self) -> None:
        """Re-render the prefix later (debounced) and rebuild the cache if it changed."""
        self._rebuild.async_schedule_call()

    def prefix_seen(self, prefix: SystemPrefix) -> None:
        """Note the prefix a request carried; a new one schedules a rebuild for it."""
        if self.cache is None or self.prefix is None or prefix.key != self.prefix.key:
            LOGGER.debug(
                "A request carried a new system prefix; scheduling a cache rebuild"
            )
            self._requested = prefix
            self.schedule_refresh()

    async def _async_refresh_auto(self) -> None:
        """Rebuild for the prefix requests carry (or the rendered one) if it changed."""
        prefix = self._requested or await async_render_prefix(self.hass, self.options)
        self._requested = None
        if (
            self.cache is not None
            and self.prefix is not None
            and prefix.key == self.prefix.key
        ):
            return
        await self.async_prepare("auto", prefix)

    async def async_refresh_now(self) -> None:
        """Re-render the prefix now and rebuild the cache if it changed."""
        self._requested = None
        await self._async_refresh_auto()

    def shutdown(self) -> None:
        """Cancel a pending rebuild."""
        self._rebuild.async_shutdown()
