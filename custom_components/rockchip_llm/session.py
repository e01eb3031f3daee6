"""One loaded model, shared by the agents that use it (no Home Assistant imports).

A :class:`ModelSession` owns the model's worker process, its FIFO lock, what its
handle holds (system prefix, loaded prompt cache, KV history, tool results as first
sent: :class:`~.held_model.HeldModel`), its prompt caches and its recent runs.
Callers use a few coarse methods, each holding the model for its whole duration:

- ``async_prepare``: load (or build) a named cache of a prefix and check its reuse;
- ``async_conversation``: one turn of a conversation, ``reply`` once per run;
- ``async_build_cache``, ``async_keep_cache``, ``async_delete_cache``;
- ``async_benchmark``: the on-board benchmark.
"""

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
import contextlib
from dataclasses import dataclass
import functools
import logging
import time
from typing import Any, Final, Literal, Self

from .benchmark import async_measure_cold_and_cached
from .const import HistoryStrategy
from .held_model import HeldModel, ReuseGuard, cache_context, handle_key, is_exact
from .host.model_files import ModelInfo
from .host.prompt_cache import CacheEntry, CacheExpectation, CacheWriteError
from .host.rkllm.errors import LibraryChanged, ModelGivenUp, RKLLMError, WorkerDiedError
from .host.rkllm.library import RuntimeInfo
from .host.rkllm.runtime import ModelParams
from .host.wire import HostLost
from .remote import RemoteStore, RemoteWorker, RuntimeHost
from .run_planner import SystemPrefix
from .turn import Conversation, ReplyOptions, RunStats

_LOGGER = logging.getLogger(__name__)

RECENT_RUNS = 20
RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0)
"""Pause before starting a died worker again, by its recent deaths."""
MAX_DEATHS = 5
DEATH_WINDOW_S = 600.0
"""A model whose worker died MAX_DEATHS times within this window is given up."""

type Listener = Callable[[], None]

QUEUE: Final = "queue"
"""A change of who holds the model or waits for it (busy, waiting)."""
RUNS: Final = "runs"
"""A run was recorded (recent, last_runs, memory_mb)."""


class ObservedLock(asyncio.Lock):
    """A FIFO lock that reports when it is waited for, taken and released."""

    def __init__(self, changed: Listener) -> None:
        """Create the lock; changed is called on every change of its state."""
        super().__init__()
        self._changed = changed
        self.waiting = 0
        """How many callers wait for the lock."""

    async def acquire(self) -> Literal[True]:
        """Take the lock; a caller that has to wait is counted in ``waiting``."""
        if not self.locked():
            await super().acquire()
            self._changed()
            return True
        self.waiting += 1
        self._changed()
        try:
            await super().acquire()
        finally:
            self.waiting -= 1
            self._changed()
        return True

    def release(self) -> None:
        """Release the lock."""
        super().release()
        self._changed()


@dataclass(frozen=True, slots=True)
class SessionServices:
    """What every session of a runtime entry shares."""

    host: RuntimeHost
    runtime: RuntimeInfo
    """The runtime library the host checked."""
    store: RemoteStore
    """The host's prompt cache store (services.host.store)."""
    on_cache_write: Callable[[CacheWriteError | None], None]
    """Hears of every cache build: None when written, the error when the disk refused."""
    on_caches_evicted: Callable[[], None]
    """Called when a build deleted caches to stay within the disk budget."""
    on_model_down: Callable[[str, RKLLMError], None]
    """Hears of a model (by name) that stays down until a reload, and why.

    Its library changed (LibraryChanged) or it was given up (ModelGivenUp)."""
    run_gate: asyncio.Lock | None
    """Held during every run when the runtime cannot run handles concurrently."""


async def _async_start_worker(
    services: SessionServices, name: str, params: ModelParams
) -> RemoteWorker:
    """Start a worker process for a model on the host and load the model in it."""
    return await services.host.async_open_worker(name, params)


class ModelSession:
    """A model loaded in a worker process, shared by every agent that uses it."""

    def __init__(
        self,
        services: SessionServices,
        info: ModelInfo,
        params: ModelParams,
        worker: RemoteWorker,
        fingerprint: dict[str, int | str],
    ) -> None:
        """Wrap a started worker; use ``async_start``."""
        self.services = services
        self.info = info
        self.params = params
        self.fingerprint = fingerprint
        self._held = HeldModel(self, worker)
        self._lock = ObservedLock(lambda: self.notify(QUEUE))
        self._listeners: list[tuple[Listener, frozenset[str] | None]] = []
        self._changes: set[str | None] = set()
        """The kinds of change the listeners have not heard of yet (None: any)."""
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self._ready: dict[str, CacheEntry] = {}
        self.users = 0
        """How many agents share this session."""
        self.building: str | None = None
        """The name of the cache being built now."""
        self.build_error: str | None = None
        """Why the last cache build failed; None after a success."""
        self.cache_unsupported: str | None = None
        """Why the runtime saves no prompt cache for this model (then none is built)."""
        self.memory_mb: float | None = None
        """The runtime's memory use reported by the last run."""
        self.recent: deque[RunStats] = deque(maxlen=RECENT_RUNS)
        self.last_runs: dict[str, RunStats] = {}
        """The most recent run of each agent, by subentry id."""
        self.deaths: deque[float] = deque(maxlen=MAX_DEATHS)
        """When its worker processes died (monotonic seconds), most recent last."""
        self.failure: RKLLMError | None = None
        """Why the model is given up until the integration is reloaded."""

    @classmethod
    async def async_start(
        cls, services: SessionServices, info: ModelInfo, params: ModelParams
    ) -> Self:
        """Start a worker process for the model and load the model in it."""
        worker = await _async_start_worker(services, info.name, params)
        try:
            fingerprint = await services.host.async_fingerprint(info.name)
        except BaseException:
            await worker.async_close()
            raise
        return cls(services, info, params, worker, fingerprint)

    # What entities and diagnostics read

    @property
    def name(self) -> str:
        """The model's friendly name."""
        return self.info.name

    @property
    def worker(self) -> RemoteWorker:
        """The worker process the model runs in now (another after a restart)."""
        return self._held.worker

    @property
    def busy(self) -> bool:
        """Whether a request, cache build or benchmark holds the model."""
        return self._lock.locked()

    def holds(self, prefix: SystemPrefix, *, thinking: bool) -> bool:
        """Whether the model is idle with prefix on its handle (a turn would keep it)."""
        return not self.busy and self._held.prefix_key == handle_key(
            prefix, thinking=thinking
        )

    @property
    def waiting(self) -> int:
        """How many callers wait for the model."""
        return self._lock.waiting

    @property
    def available(self) -> bool:
        """Whether the session is open (not closed by an unload)."""
        return not self._closed and not self.worker.closed

    @property
    def loaded_cache(self) -> CacheEntry | None:
        """The prompt cache loaded into the handle."""
        return self._held.loaded_cache

    @property
    def kv_tokens(self) -> int:
        """Tokens the KV cache holds after the last finished run (0: unknown)."""
        return self._held.kv_tokens

    @property
    def kv_messages(self) -> int | None:
        """Messages the KV cache holds after the system prefix (None: unknown)."""
        kv = self._held.kv
        return len(kv.messages) if kv is not None else None

    def ready_cache(self, name: str) -> CacheEntry | None:
        """Return the cache last prepared or built under name, unless deleted since."""
        return self._ready.get(name)

    def forget_ready(self, name: str) -> None:
        """Note that the named cache is not ready (its file failed to load)."""
        if self._ready.pop(name, None) is not None:
            self.notify()

    def expectation(self, prefix: SystemPrefix) -> CacheExpectation:
        """Return what a cache must match to serve prefix on this model and runtime."""
        info = self.services.runtime
        return CacheExpectation(
            prompt_sha256=prefix.prompt_sha256,
            model_fingerprint=self.fingerprint,
            runtime_family=str(info.family),
            runtime_version=info.version,
            context=cache_context(self.params, prefix),
        )

    def add_listener(
        self, listener: Listener, follows: frozenset[str] | None = None
    ) -> Callable[[], None]:
        """Call listener on every change; return a function that removes it.

        follows: the kinds of change (QUEUE, RUNS) it needs besides the others;
        None: every change.
        """
        entry = (listener, follows)
        self._listeners.append(entry)
        return lambda: self._listeners.remove(entry)

    def notify(self, kind: str | None = None) -> None:
        """Tell the listeners that the model's state changed (kind: what only).

        They hear of it in the next iteration of the event loop, once for all the
        changes made until then: a request's answer does not wait for the device
        page (the entities' state writes run while it waits for the host, or
        right after it answered).
        """
        if not self._changes:
            self._loop.call_soon(self._tell_listeners)
        self._changes.add(kind)

    def _tell_listeners(self) -> None:
        changes, self._changes = self._changes, set()
        for listener, follows in list(self._listeners):
            if None in changes or follows is None or not follows.isdisjoint(changes):
                listener()

    def record(self, stats: RunStats) -> None:
        """Remember a run's measurements."""
        self.recent.append(stats)
        self.last_runs[stats.agent] = stats
        self.notify(RUNS)

    def forget_listing(self) -> None:
        """Read the model's caches from disk again (another build evicted some)."""
        self._held.listing = None

    # Coarse operations: each holds the model while it runs

    async def async_prepare(
        self, prefix: SystemPrefix, name: str, source: str, guard: ReuseGuard
    ) -> CacheEntry | None:
        """Load the valid named cache for prefix, building it if needed, and check it.

        Another cache this session made ready for the very same prefix (another
        agent's with the same prompt) is used instead of building a copy, and
        returned. The check is a short turn right after loading: when the runtime
        does not reuse the cache in the guard's strategy, the guard falls back (so
        the first request after a restart is not the one that finds out). None:
        the runtime saves no prompt cache for this model; the prefix is set and
        requests run uncached.
        """
        expected = self.expectation(prefix)
        shared = next(
            (
                entry
                for entry in self._ready.values()
                if entry.name != name and entry.invalid_reason(expected) is None
            ),
            None,
        )
        async with self._hold() as held:
            entry, built = await held.async_load_or_build(prefix, name, source, shared)
            if entry is None:
                self._ready.pop(name, None)
                return None
            self._ready[entry.name] = entry
            rebuild = functools.partial(
                held.async_build_cache, prefix, entry.name, source
            )
            entry = await held.async_check_reuse(
                entry, guard, None if built else rebuild
            )
            self._ready[entry.name] = entry
        return entry

    async def async_build_cache(
        self, prefix: SystemPrefix, name: str, source: str
    ) -> CacheEntry:
        """Prefill prefix once and store it as the named prompt cache.

        On failure the previous cache files are intact (atomic commit) and the
        handle gets back the cache it had loaded.
        """
        async with self._hold() as held:
            entry = await held.async_build_cache(prefix, name, source)
            self._ready[name] = entry
        self.notify()
        return entry

    async def async_keep_cache(
        self, prefix: SystemPrefix, name_prefix: str, keep: int
    ) -> None:
        """Build a cache for prefix unless one holds all of it; keep the newest few.

        The cache is named name_prefix plus the start of the prefix's key; beyond
        keep, the oldest caches whose name starts with name_prefix are deleted.
        """
        if self.cache_unsupported is not None:
            return
        async with self._hold() as held:
            if is_exact(await held.async_find_cache(prefix), prefix):
                return
            await held.async_build_cache(
                prefix, f"{name_prefix}{prefix.key[:12]}", "auto"
            )
            await held.async_prune(name_prefix, keep)

    async def async_delete_cache(self, name: str) -> bool:
        """Delete a named cache of the model (released first if loaded)."""
        async with self._hold() as held:
            deleted = await held.async_delete_cache(name)
            forgotten = self._ready.pop(name, None) is not None
        if forgotten:
            self.notify()
        return deleted

    @contextlib.asynccontextmanager
    async def async_conversation(
        self, prefix: SystemPrefix, options: ReplyOptions, guard: ReuseGuard
    ) -> AsyncIterator[Conversation]:
        """Hold the model for one turn of a conversation; ``reply`` runs the model.

        The prefix is set and the best cache for it loaded (none with the "off"
        strategy). When the turn ends, what the KV holds is recorded for the next.
        """
        async with self._hold() as held:
            try:
                await held.async_set_prefix(prefix, thinking=options.enable_thinking)
                # Read under the lock: a warm-up check may just have changed it.
                if guard.strategy is HistoryStrategy.OFF:
                    await held.async_use_cache(None)
                    cached = False
                else:
                    cache = await held.async_find_cache(prefix)
                    loaded = await held.async_try_use_cache(
                        cache or options.fallback_cache
                    )
                    cached = loaded and is_exact(cache, prefix)
                conversation = Conversation(
                    held, prefix, options, guard, prefix_cached=cached
                )
                yield conversation
                conversation.finish()
            except BaseException:
                held.kv = None  # unknown after a failed or abandoned run
                raise

    async def async_benchmark(
        self,
        prefix: SystemPrefix,
        cache: CacheEntry,
        *,
        question: str,
        runs: int,
        max_new_tokens: int,
    ) -> dict[str, Any]:
        """Measure cold (no prompt cache, empty KV) against cached runs of question.

        Waits behind requests, never interrupts them.
        """
        async with self._hold() as held:
            await held.async_set_prefix(prefix)
            try:
                measured = await async_measure_cold_and_cached(
                    held,
                    cache,
                    question=question,
                    runs=runs,
                    max_new_tokens=max_new_tokens,
                )
            finally:
                await held.async_use_cache(cache)
                await held.async_reset_kv()
        return {
            "model": self.name,
            "runtime_version": self.services.runtime.version,
            "system_prompt_tokens": cache.metadata.tokens if cache.metadata else None,
            **measured,
        }

    async def async_close(self) -> None:
        """Abort the run in progress and stop the worker process."""
        self._closed = True
        await self.worker.async_close()
        self.notify()

    # Holding the model, with a live worker

    @contextlib.asynccontextmanager
    async def _hold(self) -> AsyncIterator[HeldModel]:
        """Hold the model (FIFO), with a live worker process.

        A worker that died is started again first, after a pause that grows with
        each recent death; a model whose worker keeps dying, or dies while the
        model loads, is given up until the integration is reloaded.
        """
        async with self._lock:
            await self._async_revive()
            yield self._held

    async def _async_revive(self) -> None:
        if self.failure is not None:
            raise self.failure
        if (death := self.worker.death) is None:
            return
        now = time.monotonic()
        self.deaths.append(now)
        recent = [t for t in self.deaths if now - t < DEATH_WINDOW_S]
        if len(recent) >= MAX_DEATHS:
            self.failure = ModelGivenUp(
                f"the runtime process of {self.name} died {len(recent)} times within "
                f"{DEATH_WINDOW_S // 60:.0f} minutes; reload the integration to try "
                f"again. Last: {death}",
                model=self.name,
                how=death.placeholders.get("how", ""),
            )
            self.notify()
            self.services.on_model_down(self.name, self.failure)
            raise self.failure
        await asyncio.sleep(RESTART_BACKOFF_S[len(recent) - 1])
        _LOGGER.warning("Restarting the runtime process of %s", self.name)
        await self.worker.async_close()
        try:
            worker = await _async_start_worker(self.services, self.name, self.params)
        except LibraryChanged as err:
            self.services.on_model_down(self.name, err)
            raise
        except HostLost:
            raise  # the entry is set up again
        except WorkerDiedError as err:
            # It dies while loading the model: retrying would only crash it again.
            self.failure = ModelGivenUp(
                f"the runtime process of {self.name} died while loading the model; "
                f"reload the integration to try again. {err}",
                model=self.name,
                how=err.placeholders.get("how", ""),
            )
            self.notify()
            self.services.on_model_down(self.name, self.failure)
            raise self.failure from err
        # A new process holds nothing: no system prompt, prompt cache or KV.
        self._held = HeldModel(self, worker)
        self.notify()
