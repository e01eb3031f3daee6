"""The repair of the prompt caches' disk, withdrawn as soon as its cause is gone.

A full or read-only disk, or a used-up budget, refuses a cache: the repair says
why, and the agents answer without that cache meanwhile. A cache written since
withdraws it at once; otherwise its cause is checked again (the host asks the
disk and the budget as a build would) every DISK_RECHECK_INTERVAL, at the next
list_caches and at a reload. Once it is gone, the agents' missing system caches
are built.
"""

from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import PurePath
from typing import Final

from homeassistant.core import CALLBACK_TYPE, HomeAssistant, callback
from homeassistant.helpers import issue_registry as ir
from homeassistant.helpers.event import async_track_time_interval

from .const import AUTO_CACHE_PREFIX, DOMAIN, LOGGER
from .host.prompt_cache import CacheBudgetExceeded, CacheError, CacheWriteError
from .host.rkllm.errors import RKLLMError
from .remote import RemoteStore

DISK_RECHECK_INTERVAL: Final = timedelta(minutes=5)
"""How often the cause of a raised disk repair is checked again."""


def cache_issue_id(entry_id: str) -> str:
    """Return the id of an entry's disk repair."""
    return f"cache_dir_{entry_id}"


@callback
def async_report_cache_write(
    hass: HomeAssistant, entry_id: str, error: CacheWriteError | None
) -> None:
    """Raise the disk repair when the disk refuses a cache; clear it once one is written."""
    if error is None or error.disk_problem is None:
        ir.async_delete_issue(hass, DOMAIN, cache_issue_id(entry_id))
        return
    ir.async_create_issue(
        hass,
        DOMAIN,
        cache_issue_id(entry_id),
        is_fixable=False,
        severity=ir.IssueSeverity.ERROR,
        translation_key=error.disk_problem,
        translation_placeholders=error.placeholders,
    )


class CacheDiskRepair:
    """An entry's disk repair: raised by refused writes, withdrawn when they would pass."""

    def __init__(self, hass: HomeAssistant, entry_id: str, store: RemoteStore) -> None:
        """Watch the disk repair of entry_id, whose caches are in store."""
        self._hass = hass
        self._entry_id = entry_id
        self._store = store
        self._needed = 0
        """The bytes of the cache the budget refused (0: a disk problem)."""
        self.on_cleared: Callable[[], None] | None = None
        """Called when a check found the cause gone (to build the missing caches)."""
        self._stopped = False

    @callback
    def report(self, error: CacheWriteError | None) -> None:
        """Hear of a cache write: None when written, the error when refused."""
        if isinstance(error, CacheBudgetExceeded):
            self._needed = error.needed_bytes
        elif error is None:
            self._needed = 0
        async_report_cache_write(self._hass, self._entry_id, error)

    @callback
    def async_start(self) -> CALLBACK_TYPE:
        """Check again on a timer; return the function that stops it (at unload)."""
        cancel = async_track_time_interval(
            self._hass,
            self._async_tick,
            DISK_RECHECK_INTERVAL,
            name="rockchip_llm disk repair check",
            cancel_on_shutdown=True,
        )

        @callback
        def stop() -> None:
            self._stopped = True  # a check under way touches nothing after it
            cancel()

        return stop

    async def _async_tick(self, _now: datetime) -> None:
        await self.async_check()

    async def async_check(self) -> None:
        """Withdraw the repair when a cache could be written now; else refresh it."""
        issue = ir.async_get(self._hass).async_get_issue(
            DOMAIN, cache_issue_id(self._entry_id)
        )
        if issue is None:
            return
        placeholders = issue.translation_placeholders or {}
        folder = PurePath(placeholders.get("path", self._store.root))
        model = (
            folder.name
            if folder.parent == PurePath(self._store.root)
            and not folder.name.startswith(".")
            else None
        )
        try:
            problem = await self._store.async_disk_problem(
                model, placeholders.get("name", ""), self._needed, AUTO_CACHE_PREFIX
            )
        except (CacheError, RKLLMError) as err:
            LOGGER.debug("Cannot check the disk of the prompt caches: %s", err)
            return
        if self._stopped:
            return
        if problem is not None:
            async_report_cache_write(self._hass, self._entry_id, problem)
            return
        LOGGER.info("The disk of the prompt caches takes caches again")
        self.report(None)
        if self.on_cleared is not None:
            self.on_cleared()
