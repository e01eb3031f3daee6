"""The system prompt cache a conversation agent keeps current.

Prepared at setup, rebuilt (debounced) when what the prompt is made of changes,
and extended by caches for other prefixes that requests carry (a satellite in an
area adds a line to the prompt).

A prefix that leaves no room for a turn (MIN_TURN_TOKENS) and an answer is
trimmed step by step (tool_groups.py: the device list, then tool groups); the
full prefix is tried again whenever what it is made of changes.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from homeassistant.core import HomeAssistant
from homeassistant.helpers.debounce import Debouncer

from .agent_prefix import async_render_prefix
from .compact_prefix import PrefixLayout
from .const import (
    AUTO_CACHE_PREFIX,
    LOGGER,
    MAX_AUTO_CACHES,
    REBUILD_DEBOUNCE_SECONDS,
    SYSTEM_CACHE_NAME,
)
from .held_model import ReuseGuard
from .host.prompt_cache import CacheEntry, CacheError, CacheTooLong, CacheWriteError
from .run_planner import SystemPrefix, estimate_tokens
from .session import ModelSession
from .tool_groups import MAX_TRIM


@dataclass(frozen=True, slots=True)
class PrefixFit:
    """How the agent's prefix fits its context."""

    tokens: int
    """Tokens of the prefix in use (or of the smallest tried, when none fits)."""
    counted_by: str
    """"runtime": the runtime's count; "estimate": ours (3 characters a token)."""
    max_context_len: int
    room: int
    """Tokens a turn and its answer need beside the prefix."""
    trim: int
    """Trim steps taken (0: the full prefix)."""
    full_tokens: int | None
    """Tokens of the full prefix, when it was trimmed."""

    @property
    def fits(self) -> bool:
        """Whether the prefix leaves the room a turn needs."""
        return self.tokens + self.room <= self.max_context_len


class PrefixDoesNotFit(CacheError):
    """Even trimmed as far as it goes, the prefix leaves no room for a turn."""

    translation_key = "prefix_does_not_fit"


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
        *,
        room: int = 0,
        max_context_len: int | None = None,
    ) -> None:
        """Keep the named cache of the prefix rendered from the agent's options.

        room: tokens a turn and its answer need beside the prefix in
        max_context_len (default: the model's context).
        """
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
        self._room = room
        self._max_context_len = max_context_len or session.params.max_context_len
        self.trim = 0
        """Trim steps the prefix in use takes (requests carry the same)."""
        self.layout: PrefixLayout | None = None
        """What the prefix in use is made of."""
        self.fit: PrefixFit | None = None
        """How the prefix fits (None until the first preparation)."""
        self._full_key: str | None = None
        self._checked: tuple[CacheEntry, SystemPrefix, bool] | None = None
        """The last validity check of the ready cache: its entry, prefix, result."""
        self.on_fit_changed: Callable[[], None] | None = None
        """Called after a preparation changed how the prefix fits."""
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
        """The system cache, while it holds the prepared prefix.

        Sensors read this on every change of the model: the check is kept for the
        entry and prefix it was made for (both immutable, the session's
        expectation fixed for its life).
        """
        entry = self._session.ready_cache(self._in_use)
        prefix = self.prefix
        if entry is None or prefix is None:
            return None
        checked = self._checked
        if checked is None or checked[0] is not entry or checked[1] is not prefix:
            valid = entry.invalid_reason(self._session.expectation(prefix)) is None
            checked = self._checked = (entry, prefix, valid)
        return entry if checked[2] else None

    async def async_prepare(
        self,
        source: str,
        rendered: tuple[SystemPrefix, PrefixLayout] | None = None,
    ) -> None:
        """Make the system cache of the full prefix ready, or of the least trimmed that fits.

        rendered: the full prefix, when already rendered. PrefixDoesNotFit: even
        the most trimmed prefix leaves no room (it is set up all the same).
        """
        fit: PrefixFit | None = None
        full_tokens: int | None = None
        tried: set[str] = set()
        for trim in range(MAX_TRIM + 1):
            if trim == 0 and rendered is not None:
                prefix, layout = rendered
            else:
                prefix, layout = await async_render_prefix(
                    self._hass, self._options, trim
                )
            if trim == 0:
                self._full_key = prefix.key
            if prefix.key in tried:
                continue  # this step leaves out nothing the prefix has
            tried.add(prefix.key)
            try:
                entry = await self._session.async_prepare(
                    prefix, self.name, source, self._guard
                )
            except CacheTooLong as err:
                tokens, counted_by = (
                    int(err.placeholders["tokens"]),
                    str(err.placeholders.get("counted", "estimate")),
                )
                entry = None
            else:
                self.prefix, self.layout, self.trim = prefix, layout, trim
                self._in_use = entry.name if entry is not None else self.name
                tokens, counted_by = (
                    (entry.metadata.tokens, "runtime")
                    if entry is not None and entry.metadata is not None
                    else (
                        estimate_tokens(prefix.prompt)
                        + estimate_tokens(prefix.tools_json),
                        "estimate",
                    )
                )
            full_tokens = tokens if trim == 0 else full_tokens
            fit = PrefixFit(
                tokens=tokens,
                counted_by=counted_by,
                max_context_len=self._max_context_len,
                room=self._room,
                trim=trim,
                full_tokens=full_tokens if trim else None,
            )
            if fit.fits and self.prefix is prefix:
                break
        self._set_fit(fit)
        if fit is not None and not fit.fits:
            raise PrefixDoesNotFit(
                f"the system prompt of {self._session.name} takes {fit.tokens} tokens "
                f"even trimmed, leaving less than {fit.room} of its context of "
                f"{fit.max_context_len} tokens for a turn and its answer",
                tokens=str(fit.tokens),
                max_context_len=str(fit.max_context_len),
                room=str(fit.room),
            )

    def _set_fit(self, fit: PrefixFit | None) -> None:
        changed = fit != self.fit
        self.fit = fit
        if changed and self.on_fit_changed is not None:
            self.on_fit_changed()

    async def async_rebuild(self, name: str, source: str) -> CacheEntry:
        """Build the named cache from the agent's current prefix (its trim kept)."""
        prefix, layout = await async_render_prefix(self._hass, self._options, self.trim)
        entry = await self._session.async_build_cache(prefix, name, source)
        if name == self.name:
            self.prefix, self.layout, self._in_use = prefix, layout, name
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
            or rendered[0].key != self._full_key
            or (requested is not None and requested.key == self.prefix.key)
        ):
            # (the last case: a request found no usable system cache for this prefix)
            try:
                await self.async_prepare("auto", rendered)
            except PrefixDoesNotFit as err:
                LOGGER.warning("%s", err)
                return
        if (
            requested is not None
            and self.prefix is not None
            and requested.key != self.prefix.key
        ):
            await self._session.async_keep_cache(
                requested, AUTO_CACHE_PREFIX, MAX_AUTO_CACHES
            )
