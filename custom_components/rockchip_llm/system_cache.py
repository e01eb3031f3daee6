"""The system prompt cache a conversation agent keeps current.

Prepared at setup, rebuilt (debounced) when what the prompt is made of changes,
and extended by caches for other prefixes that requests carry (a satellite in an
area adds a line to the prompt).
"""

from collections.abc import Mapping
from typing import Any

from homeassistant.core import HomeAssistant
from homeassistant.helpers.debounce import Debouncer

from .agent_prefix import async_render_prefix
from .const import (
    AUTO_CACHE_PREFIX,
    LOGGER,
    MAX_AUTO_CACHES,
    REBUILD_DEBOUNCE_SECONDS,
    SYSTEM_CACHE_NAME,
)
from .held_model import ReuseGuard
from .host.prompt_cache import CacheEntry, CacheWriteError
from .run_planner import SystemPrefix
from .session import ModelSession


def system_cache_name(subentry_id: str, *, first_on_model: bool) -> str:
    """Name an agent's system cache: "system" for a model's first agent.

    Further agents on the same model get names of their own, so agents with
    different prompts never overwrite each other's cache.
    """
    if first_on_model:
        return SYSTEM_CACHE_NAME
    return f"{SYSTEM_CACHE_NAME}_{subentry_id.lower()}"


class SystemCacheKeeper:
    """Keeps an agent's system prompt cache ready on its model's session."""

    def __init__(
        self,
        hass: HomeAssistant,
        session: ModelSession,
        options: Mapping[str, Any],
        guard: ReuseGuard,
        name: str = SYSTEM_CACHE_NAME,
    ) -> None:
        """Keep the named cache of the prefix rendered from the agent's options."""
        self._hass = hass
        self._session = session
        self._options = options
        self._guard = guard
        self.name = name
        """The name of the agent's own system cache."""
        self._in_use = name
        """The cache the agent uses: its own, or another agent's of the same prefix."""
        self.prefix: SystemPrefix | None = None
        """The prefix last prepared (None until the first preparation)."""
        self._requested: SystemPrefix | None = None
        self._rebuild = Debouncer(
            hass,
            LOGGER,
            cooldown=REBUILD_DEBOUNCE_SECONDS,
            immediate=False,
            function=self._async_refresh,
            background=True,
        )

    @property
    def cache(self) -> CacheEntry | None:
        """The system cache, while it holds the prepared prefix."""
        entry = self._session.ready_cache(self._in_use)
        if entry is None or self.prefix is None:
            return None
        expected = self._session.expectation(self.prefix)
        return entry if entry.invalid_reason(expected) is None else None

    async def async_prepare(
        self, source: str, prefix: SystemPrefix | None = None
    ) -> None:
        """Make the system cache of prefix (default: freshly rendered) ready."""
        if prefix is None:
            prefix = await async_render_prefix(self._hass, self._options)
        entry = await self._session.async_prepare(
            prefix, self.name, source, self._guard
        )
        self.prefix = prefix
        self._in_use = entry.name if entry is not None else self.name

    async def async_rebuild(self, name: str, source: str) -> CacheEntry:
        """Build the named cache from the agent's current prefix."""
        prefix = await async_render_prefix(self._hass, self._options)
        entry = await self._session.async_build_cache(prefix, name, source)
        if name == self.name:
            self.prefix, self._in_use = prefix, name
        return entry

    def schedule_refresh(self) -> None:
        """Re-render the prefix later (debounced) and rebuild the cache if it changed."""
        self._rebuild.async_schedule_call()

    def prefix_seen(self, prefix: SystemPrefix, *, cached: bool) -> None:
        """Note the prefix a request carried; one without a cache gets one, debounced."""
        if cached or self._session.cache_unsupported is not None:
            return
        LOGGER.debug("A request carried a prefix without a cache; scheduling a build")
        self._requested = prefix
        self.schedule_refresh()

    async def async_refresh_now(self) -> None:
        """Re-render the prefix now and rebuild the cache if it changed."""
        self._requested = None
        await self._async_refresh()

    def shutdown(self) -> None:
        """Cancel a pending rebuild."""
        self._rebuild.async_shutdown()

    async def _async_refresh(self) -> None:
        """Keep the system cache current and build one for the prefix requests carry.

        The system cache is for the prefix a request without an area carries; other
        prefixes get caches of their own, the most recent MAX_AUTO_CACHES of them
        kept. When the disk refuses a cache (its repair is raised), the agent goes
        on without it.
        """
        try:
            await self._async_refresh_caches()
        except CacheWriteError as err:
            if err.disk_problem is None:
                raise
            LOGGER.warning(
                "Prompt cache of %s not written: %s", self._session.name, err
            )

    async def _async_refresh_caches(self) -> None:
        requested, self._requested = self._requested, None
        rendered = await async_render_prefix(self._hass, self._options)
        if (
            self.cache is None
            or self.prefix is None
            or rendered.key != self.prefix.key
            or (requested is not None and requested.key == rendered.key)
        ):
            # (the last case: a request found no usable system cache for this prefix)
            await self.async_prepare("auto", rendered)
        if requested is not None and requested.key != rendered.key:
            await self._session.async_keep_cache(
                requested, AUTO_CACHE_PREFIX, MAX_AUTO_CACHES
            )
