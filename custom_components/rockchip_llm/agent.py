"""One agent (a conversation subentry): its settings, model and system cache."""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self

from homeassistant.core import HomeAssistant
from homeassistant.helpers.debounce import Debouncer

from .agent_prefix import async_render_prefix
from .chat import SystemPrefix
from .const import (
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
    MAX_AUTO_CACHES,
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
    ) -> None:
        """Make the system cache of prefix (default: freshly rendered) ready."""
        if prefix is None:
            prefix = await async_render_prefix(self.hass, self.options)
        async with self.loaded.lock:
            self.cache = await self.engine.async_prepare(
                self.loaded, prefix, SYSTEM_CACHE_NAME, source
            )
        self.prefix = prefix

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
        own, the most recent MAX_AUTO_CACHES of them kept.
        """
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
        async with self.loaded.lock:
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
