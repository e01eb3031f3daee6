"""Async facade over the binding: shared model handles, FIFO access, streaming, caches.

No Home Assistant imports. Each loaded model lives in a worker process of its own
(:class:`~.rkllm.worker.WorkerModel`); the event loop only awaits futures and
receives streamed text through ``call_soon_threadsafe``. Callers hold the model
with ``Engine.async_hold`` (FIFO, and a dead worker is started again) around
everything they do with it, so KV bookkeeping stays consistent.
"""

import asyncio
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import Future
import contextlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
import logging
from pathlib import Path
import time
from typing import Any, Literal

from .const import AUTO_CACHE_PREFIX
from .model_files import ModelInfo, model_fingerprint
from .prompt_cache import (
    CacheEntry,
    CacheExpectation,
    CacheMetadata,
    CacheTooLong,
    CacheWriteError,
    PromptCacheStore,
    prompt_sha256,
)
from .rkllm.abi import AbiFamily
from .rkllm.errors import PromptCacheNotSaved, RKLLMError, RunError, WorkerDiedError
from .rkllm.library import RuntimeInfo, RuntimeLibrary
from .rkllm.runtime import ModelParams, PerfStats, RunRequest, RunResult
from .rkllm.worker import WorkerModel
from .run_planner import KVState, SystemPrefix, chat_template, estimate_tokens
from .simulation import library_is_simulated

_LOGGER = logging.getLogger(__name__)

RECENT_RUNS = 20
RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0)
"""Pause before starting a died worker again, by its recent deaths."""
MAX_DEATHS = 5
DEATH_WINDOW_S = 600.0
"""A model whose worker died MAX_DEATHS times within this window is given up."""

type Listener = Callable[[], None]


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


DOMAIN_BYTES = 4 * 1024**3
"""About what one NPU memory domain holds (rknn-llm #314, #437)."""

MULTI_INSTANCE_VERSION = (1, 2, 2)
"""The first runtime that runs several model instances at once."""


def plan_domains(sizes: list[int]) -> list[int]:
    """Give each model (by file size) a base_domain_id of its own.

    A model larger than a domain spans the next ones too, so the following model
    starts after them.
    """
    domains: list[int] = []
    next_free = 0
    for size in sizes:
        domains.append(next_free)
        next_free += max(1, -(-size // DOMAIN_BYTES))
    return domains


def runs_concurrently(info: RuntimeInfo) -> bool:
    """Whether the runtime can run several handles at once (1.2.2 and later).

    A version known only as its family (1.2.x) counts as the older one.
    """
    if info.family is not AbiFamily.V1_2:
        return True
    parts = info.version.split(".")
    try:
        version = tuple(int(part) for part in parts[:3])
    except ValueError:
        return False
    return version >= MULTI_INSTANCE_VERSION


@dataclass(frozen=True, slots=True)
class RunStats:
    """Measurements of one generation, for diagnostics and benchmarks."""

    agent: str
    """The subentry id of the agent that asked."""
    prefill_tokens: int
    prefill_ms: float
    generate_tokens: int
    generate_ms: float
    ttft_ms: float | None
    reused_history: bool
    cache: str | None


@dataclass(slots=True)
class LoadedModel:
    """A model handle shared by every agent that uses the model."""

    info: ModelInfo
    params: ModelParams
    model: WorkerModel
    """The handle, in a worker process of its own; replaced when that process dies."""
    fingerprint: dict[str, int | str]
    lock: ObservedLock = field(init=False)
    """FIFO access to the handle; waiting, taking and releasing it notify listeners."""
    listeners: list[Listener] = field(default_factory=list)
    """Called (in the event loop) whenever what entities show may have changed."""
    building: str | None = None
    """The name of the cache being built now."""
    build_error: str | None = None
    """Why the last cache build failed; None after a success."""
    memory_mb: float | None = None
    """The runtime's memory use reported by the last run."""
    users: int = 0
    """How many agents share this handle."""
    prefix_key: str | None = None
    """The system prompt and tools currently set on the handle."""
    loaded_cache: CacheEntry | None = None
    caches: list[CacheEntry] | None = None
    """The store's listing for this model, read once and dropped on every change."""
    cache_unsupported: str | None = None
    """Why the runtime saves no prompt cache for this model (then none is built)."""
    kv: KVState | None = None
    kv_tokens: int = 0
    sent_tool_results: dict[str, str] = field(default_factory=dict)
    """Tool results as first sent to the model, by tool call id (see entity.py)."""
    recent: deque[RunStats] = field(default_factory=lambda: deque(maxlen=RECENT_RUNS))
    run_gate: asyncio.Lock | None = None
    """Held during every run when the runtime cannot run handles concurrently."""
    deaths: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_DEATHS))
    """When its worker processes died (monotonic seconds), most recent last."""
    failure: RKLLMError | None = None
    """Why the model is given up until the integration is reloaded."""
    last_runs: dict[str, RunStats] = field(default_factory=dict)
    """The most recent run of each agent, by subentry id."""

    def __post_init__(self) -> None:
        """Create the lock that reports to the listeners."""
        self.lock = ObservedLock(self.notify)

    @property
    def name(self) -> str:
        """The model's friendly name."""
        return self.info.name

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Call listener on every change; return a function that removes it."""
        self.listeners.append(listener)
        return lambda: self.listeners.remove(listener)

    def notify(self) -> None:
        """Tell the listeners that the model's state changed."""
        for listener in list(self.listeners):
            listener()


class Generation:
    """One streaming run: iterate for text, then read ``result``."""

    def __init__(self, loaded: LoadedModel, request: RunRequest) -> None:
        """Prepare the run; it starts when iteration starts."""
        self._loaded = loaded
        self._request = request
        self.result: RunResult | None = None
        self.ttft_ms: float | None = None

    async def __aiter__(self) -> AsyncIterator[str]:
        """Start the run and yield decoded text as the runtime produces it.

        Runtimes before 1.2.2 run one handle at a time: there the run waits for
        the engine-wide gate first.
        """
        gate = self._loaded.run_gate
        if gate is not None:
            await gate.acquire()
        try:
            async with contextlib.aclosing(self._run()) as texts:
                async for text in texts:
                    yield text
        finally:
            if gate is not None:
                gate.release()

    async def _run(self) -> AsyncGenerator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | None] = asyncio.Queue()

        def push(item: str | None) -> None:
            # A closed loop means nobody is listening any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(queue.put_nowait, item)

        started = time.monotonic()
        future = self._loaded.model.run(self._request, push)
        future.add_done_callback(lambda _: push(None))
        try:
            while (text := await queue.get()) is not None:
                if self.ttft_ms is None:
                    self.ttft_ms = (time.monotonic() - started) * 1000
                yield text
            self.result = await asyncio.wrap_future(future)
            if self.result.perf is not None:
                self._loaded.memory_mb = self.result.perf.memory_usage_mb
        finally:
            if not future.done():
                # rkllm_abort may block until the prefill ends (rknn-llm #400):
                # never on the event loop.
                aborting = loop.run_in_executor(None, self._loaded.model.abort)
                await _wait_quietly(future)
                await _wait_quietly(aborting)

    async def collect(self) -> RunResult:
        """Run to the end, discarding the text, and return the result."""
        async for _text in self:
            pass
        assert self.result is not None
        return self.result


async def _wait_quietly(future: Future[Any] | asyncio.Future[Any]) -> None:
    """Wait for an aborted run (or the abort) to end, even while being cancelled."""
    try:
        await asyncio.shield(asyncio.wrap_future(future))
    except Exception:  # noqa: BLE001 - the run's own error is irrelevant after abort
        _LOGGER.debug("Aborted run ended with an error", exc_info=True)


async def call[T](future: Future[T]) -> T:
    """Await a future of the binding."""
    return await asyncio.wrap_future(future)


class Engine:
    """Loads models on demand, shares them, and manages their prompt caches."""

    def __init__(
        self,
        library: RuntimeLibrary,
        store: PromptCacheStore,
        run_blocking: Callable[..., Any],
        on_cache_write: Callable[[CacheWriteError | None], None] | None = None,
        *,
        stall_timeout: float | None = None,
    ) -> None:
        """Create an engine; run_blocking runs a blocking function off the loop.

        on_cache_write hears of every cache build: None when it was written, the
        error when the disk refused it.
        """
        self.library = library
        self.store = store
        self._run_blocking = run_blocking
        self._on_cache_write = on_cache_write or (lambda _error: None)
        self.stall_timeout = stall_timeout
        """Seconds without new text before a run is stopped (None: the default)."""
        self._models: dict[str, LoadedModel] = {}
        self.simulated = library_is_simulated(library.cdll)
        """Whether the library is the development simulator, not Rockchip's runtime."""
        self._run_gate = None if runs_concurrently(library.info) else asyncio.Lock()

    @property
    def models(self) -> dict[str, LoadedModel]:
        """Loaded models by name."""
        return self._models

    async def async_acquire(self, info: ModelInfo, params: ModelParams) -> LoadedModel:
        """Return the loaded model for info, loading it on first use."""
        if (loaded := self._models.get(info.name)) is None:
            model = await self._async_start_worker(info.name, params)
            try:
                fingerprint = await self._run_blocking(model_fingerprint, info.path)
            except BaseException:
                await self._run_blocking(model.close)
                raise
            loaded = LoadedModel(
                info=info,
                params=params,
                model=model,
                fingerprint=fingerprint,
                run_gate=self._run_gate,
            )
            self._models[info.name] = loaded
        loaded.users += 1
        return loaded

    async def _async_start_worker(self, name: str, params: ModelParams) -> WorkerModel:
        """Start a worker process for a model and initialise the model in it."""
        model = WorkerModel(self.library, name, stall_timeout=self.stall_timeout)
        try:
            await call(model.init(params))
        except BaseException:
            await self._run_blocking(model.close)
            raise
        return model

    @contextlib.asynccontextmanager
    async def async_hold(self, loaded: LoadedModel) -> AsyncIterator[None]:
        """Hold the model (FIFO), with a live worker process.

        A worker that died is started again first, after a pause that grows with
        each recent death; a model whose worker keeps dying, or dies while the
        model loads, is given up until the integration is reloaded.
        """
        async with loaded.lock:
            await self._async_revive(loaded)
            yield

    async def _async_revive(self, loaded: LoadedModel) -> None:
        if loaded.failure is not None:
            raise loaded.failure
        if (death := loaded.model.death) is None:
            return
        now = time.monotonic()
        loaded.deaths.append(now)
        recent = [t for t in loaded.deaths if now - t < DEATH_WINDOW_S]
        if len(recent) >= MAX_DEATHS:
            loaded.failure = WorkerDiedError(
                f"the runtime process of {loaded.name} died {len(recent)} times within "
                f"{DEATH_WINDOW_S // 60:.0f} minutes; reload the integration to try "
                f"again. Last: {death}",
                model=loaded.name,
                how=death.placeholders.get("how", ""),
            )
            loaded.notify()
            raise loaded.failure
        await asyncio.sleep(RESTART_BACKOFF_S[len(recent) - 1])
        _LOGGER.warning("Restarting the runtime process of %s", loaded.name)
        await self._run_blocking(loaded.model.close)
        try:
            loaded.model = await self._async_start_worker(loaded.name, loaded.params)
        except WorkerDiedError as err:
            # It dies while loading the model: retrying would only crash it again.
            loaded.failure = err
            loaded.notify()
            raise
        # A new process holds nothing: no system prompt, prompt cache or KV.
        loaded.prefix_key = None
        loaded.loaded_cache = None
        loaded.kv = None
        loaded.kv_tokens = 0
        loaded.notify()

    async def async_close(self) -> None:
        """Abort every run, destroy every handle and join the worker threads."""
        models, self._models = list(self._models.values()), {}
        for loaded in models:
            await self._run_blocking(loaded.model.close)
            loaded.notify()

    # Prefix and prompt caches (callers hold the model: Engine.async_hold)

    def expectation(
        self, loaded: LoadedModel, prefix: SystemPrefix
    ) -> CacheExpectation:
        """Return what a cache must match to serve prefix on this model and runtime."""
        info = self.library.info
        return CacheExpectation(
            prompt_sha256=prompt_sha256(prefix.prompt),
            model_fingerprint=loaded.fingerprint,
            runtime_family=str(info.family),
            runtime_version=info.version,
            context=self._context(loaded, prefix),
        )

    @staticmethod
    def _context(
        loaded: LoadedModel, prefix: SystemPrefix
    ) -> dict[str, int | float | bool | str]:
        context: dict[str, int | float | bool | str] = {
            "max_context_len": loaded.params.max_context_len,
            "tools_sha256": prefix.tools_sha256,
        }
        if not prefix.has_tools:
            # Set as a chat template, not as tools: other tokens than a cache made
            # through set_function_tools("[]") by earlier versions.
            context["system_template"] = "chatml"
        return context

    async def async_set_prefix(
        self, loaded: LoadedModel, prefix: SystemPrefix, *, thinking: bool = False
    ) -> None:
        """Put prefix (system prompt and tools) on the handle if it is not there.

        A prefix without tools is set as a chat template, never as an empty tool
        list (rknn-llm #377); thinking then lives in the template. Upstream
        promises a KV clear only for set_chat_template: it is cleared here.
        """
        key = prefix.key if prefix.has_tools else f"{prefix.key}/template/{thinking}"
        if loaded.prefix_key == key:
            return
        if prefix.has_tools:
            await call(
                loaded.model.set_function_tools(prefix.prompt, prefix.tools_json)
            )
        else:
            template = chat_template(prefix.prompt, thinking=thinking)
            await call(
                loaded.model.set_chat_template(
                    template.system, template.user_prefix, template.user_postfix
                )
            )
        loaded.prefix_key = key
        await self.async_reset_kv(loaded, keep_system=False)

    async def async_find_cache(
        self, loaded: LoadedModel, prefix: SystemPrefix
    ) -> CacheEntry | None:
        """Return the valid cache with the longest prompt that prefix starts with."""
        if loaded.caches is None:
            loaded.caches = await self._run_blocking(self.store.list, loaded.name)
        entries = loaded.caches
        expected = self.expectation(loaded, prefix)
        best: CacheEntry | None = None
        for entry in entries:
            metadata = entry.metadata
            if metadata is None or entry.problem is not None:
                continue
            if len(prefix.prompt) < metadata.prompt_length:
                continue
            partial = CacheExpectation(
                prompt_sha256=prompt_sha256(prefix.prompt[: metadata.prompt_length]),
                model_fingerprint=expected.model_fingerprint,
                runtime_family=expected.runtime_family,
                runtime_version=expected.runtime_version,
                context=expected.context,
            )
            if entry.invalid_reason(partial) is None and (
                best is None
                or best.metadata is None
                or metadata.prompt_length > best.metadata.prompt_length
            ):
                best = entry
        return best

    @staticmethod
    def is_exact(entry: CacheEntry | None, prefix: SystemPrefix) -> bool:
        """Whether a cache found for prefix holds all of its prompt."""
        return (
            entry is not None
            and entry.metadata is not None
            and entry.metadata.prompt_length == len(prefix.prompt)
        )

    async def async_prune(
        self, loaded: LoadedModel, name_prefix: str, keep: int
    ) -> None:
        """Delete the oldest caches whose name starts with name_prefix beyond keep."""
        if loaded.caches is None:
            loaded.caches = await self._run_blocking(self.store.list, loaded.name)
        named = sorted(
            (
                entry
                for entry in loaded.caches
                if entry.name.startswith(name_prefix) and entry.metadata is not None
            ),
            key=lambda entry: entry.metadata.created_at if entry.metadata else "",
            reverse=True,
        )
        for entry in named[keep:]:
            await self.async_delete_cache(loaded, entry.name)

    async def async_use_cache(
        self, loaded: LoadedModel, entry: CacheEntry | None
    ) -> None:
        """Make entry the handle's loaded prompt cache (None releases it)."""
        current = loaded.loaded_cache
        if (
            current is not None
            and entry is not None
            and current.bin_path == entry.bin_path
        ):
            return
        if current is not None:
            await call(loaded.model.release_prompt_cache())
            loaded.loaded_cache = None
        if entry is not None:
            await call(loaded.model.load_prompt_cache(entry.bin_path))
            loaded.loaded_cache = entry
            await self._run_blocking(self.store.touch, entry)

    async def _async_build(
        self, loaded: LoadedModel, prefix: SystemPrefix, name: str, source: str
    ) -> tuple[CacheEntry, CacheMetadata, float]:
        evicted: list[CacheEntry] = await self._run_blocking(
            self.store.make_room,
            loaded.name,
            name,
            len(prefix.prompt),
            AUTO_CACHE_PREFIX,
        )
        if evicted:
            for other in self._models.values():
                other.caches = None
        await self.async_set_prefix(loaded, prefix)
        await self.async_use_cache(loaded, None)
        await call(loaded.model.clear_kv_cache(keep_system_prompt=False))
        loaded.kv = None
        staging: Path = await self._run_blocking(
            self.store.staging_bin_path, loaded.name, name
        )
        started = time.monotonic()
        try:
            try:
                result = await Generation(
                    loaded,
                    RunRequest(prompt="", save_prompt_cache=staging, max_new_tokens=1),
                ).collect()
            except RKLLMError as err:
                raise await self._build_error(loaded, prefix, staging, err) from err
            build_ms = (time.monotonic() - started) * 1000
            perf = _finished_perf(result, loaded.name, name)
            await self._run_blocking(_require_saved, staging, loaded.name)
            info = self.library.info
            metadata = CacheMetadata(
                name=name,
                model=loaded.name,
                created_at=datetime.now(UTC).isoformat(),
                prompt_sha256=prompt_sha256(prefix.prompt),
                prompt_length=len(prefix.prompt),
                tokens=perf.prefill_tokens,
                size_bytes=0,  # commit() measures the staged file
                build_ms=round(build_ms, 1),
                source=source,
                model_fingerprint=loaded.fingerprint,
                runtime_family=str(info.family),
                runtime_version=info.version,
                context=self._context(loaded, prefix),
            )
            entry: CacheEntry = await self._run_blocking(
                self.store.commit, staging, metadata
            )
        except BaseException:
            await self._run_blocking(self.store.discard, staging)
            raise
        return entry, metadata, build_ms

    async def _build_error(
        self,
        loaded: LoadedModel,
        prefix: SystemPrefix,
        staging: Path,
        err: RKLLMError,
    ) -> Exception:
        """Say why the runtime failed to build a cache: the disk, the context, or err."""
        problem: CacheWriteError | None = await self._run_blocking(
            self.store.write_problem, staging
        )
        if problem is not None:
            return problem
        tokens = estimate_tokens(prefix.prompt) + estimate_tokens(prefix.tools_json)
        if tokens >= loaded.params.max_context_len:
            return CacheTooLong(
                f"{err}. The system prompt (up to {tokens} tokens) may not fit the "
                f"context length of {loaded.params.max_context_len} tokens: raise "
                "the agent's context length or expose fewer entities",
                error=str(err),
                tokens=str(tokens),
                max_context_len=str(loaded.params.max_context_len),
            )
        return err

    async def async_build_cache(
        self, loaded: LoadedModel, prefix: SystemPrefix, name: str, source: str
    ) -> CacheEntry:
        """Prefill prefix once and store it as the named prompt cache.

        On failure the previous cache files are intact (atomic commit) and the
        handle gets back the cache it had loaded.
        """
        previous = loaded.loaded_cache
        loaded.building = name
        loaded.notify()
        try:
            entry, metadata, build_ms = await self._async_build(
                loaded, prefix, name, source
            )
        except PromptCacheNotSaved as err:
            if loaded.cache_unsupported is None:
                _LOGGER.warning(
                    "%s; its agents work without a prompt cache (slower first "
                    "answers) until the integration is reloaded",
                    err,
                )
                loaded.cache_unsupported = str(err)
            loaded.build_error = str(err)
            if previous is not None:
                await self.async_try_use_cache(loaded, previous)
            raise
        except Exception as err:
            if isinstance(err, CacheWriteError) and err.disk_problem is not None:
                self._on_cache_write(err)
            loaded.build_error = str(err) or type(err).__name__
            if previous is not None:
                await self.async_try_use_cache(loaded, previous)
            raise
        else:
            loaded.build_error = None
        finally:
            loaded.caches = None
            loaded.building = None
            loaded.notify()
        self._on_cache_write(None)
        _LOGGER.info(
            "Built prompt cache %s/%s: %d tokens in %.0f ms, %d bytes",
            loaded.name,
            name,
            metadata.tokens,
            build_ms,
            entry.metadata.size_bytes if entry.metadata else 0,
        )
        await self.async_use_cache(loaded, entry)
        return entry

    async def async_prepare(
        self, loaded: LoadedModel, prefix: SystemPrefix, name: str, source: str
    ) -> CacheEntry | None:
        """Load the valid named cache for prefix, building it if needed.

        None: the runtime saves no prompt cache for this model; the prefix is set
        and requests run uncached.
        """
        if loaded.cache_unsupported is not None:
            await self.async_set_prefix(loaded, prefix)
            return None
        entry: CacheEntry | None = await self._run_blocking(
            self.store.get, loaded.name, name
        )
        if entry is not None:
            reason = entry.invalid_reason(self.expectation(loaded, prefix))
            if reason is None:
                await self.async_set_prefix(loaded, prefix)
                try:
                    await self.async_use_cache(loaded, entry)
                except RKLLMError:  # a cache the runtime refuses is rebuilt
                    _LOGGER.warning(
                        "The runtime refused prompt cache %s; rebuilding it",
                        entry.bin_path,
                    )
                else:
                    return entry
            else:
                _LOGGER.info(
                    "Prompt cache %s/%s is stale (%s); rebuilding it",
                    loaded.name,
                    name,
                    reason,
                )
        try:
            return await self.async_build_cache(loaded, prefix, name, source)
        except PromptCacheNotSaved:
            return None

    async def async_try_use_cache(
        self, loaded: LoadedModel, entry: CacheEntry | None
    ) -> None:
        """Like async_use_cache, but a cache the runtime refuses means none."""
        try:
            await self.async_use_cache(loaded, entry)
        except RKLLMError as err:
            _LOGGER.warning(
                "Prompt cache %s cannot be loaded (%s); going without",
                entry and entry.name,
                err,
            )
            loaded.caches = None

    async def async_delete_cache(self, loaded: LoadedModel, name: str) -> bool:
        """Delete a named cache of the model (released first if loaded)."""
        if loaded.loaded_cache is not None and loaded.loaded_cache.name == name:
            await self.async_use_cache(loaded, None)
        try:
            deleted: bool = await self._run_blocking(
                self.store.delete, loaded.name, name
            )
        finally:
            loaded.caches = None
        return deleted

    async def async_warm_up(
        self, loaded: LoadedModel, prompt: str, *, keep_history: bool
    ) -> RunResult:
        """Run a one-token turn on an empty KV (only a loaded cache can help it).

        The KV is cleared again afterwards.
        """
        await self.async_reset_kv(loaded, keep_system=False)
        try:
            return await Generation(
                loaded,
                RunRequest(prompt=prompt, keep_history=keep_history, max_new_tokens=1),
            ).collect()
        finally:
            await self.async_reset_kv(loaded, keep_system=False)

    async def async_reset_kv(
        self, loaded: LoadedModel, *, keep_system: bool = True
    ) -> None:
        """Clear the KV back to the system prompt (or entirely)."""
        await call(loaded.model.clear_kv_cache(keep_system_prompt=keep_system))
        loaded.kv = None
        loaded.kv_tokens = 0
        loaded.sent_tool_results.clear()

    @staticmethod
    def note_kv(loaded: LoadedModel, state: KVState, result: RunResult | None) -> None:
        """Record what the KV holds after a run that kept history.

        Only a run that finished (FINISH with perf, no abort, under its token limit)
        leaves a KV we know; otherwise it is unknown and reset before the next turn.
        Without the runtime's count the KV cannot be budgeted either.
        """
        size = result.kv_cache_size if result else None
        finished = (
            result is not None
            and result.perf is not None
            and not result.aborted
            and not result.stopped_at_limit
        )
        loaded.kv = state if finished and size is not None else None
        loaded.kv_tokens = size if loaded.kv is not None and size is not None else 0

    def record(self, loaded: LoadedModel, stats: RunStats) -> None:
        """Remember a run's measurements."""
        loaded.recent.append(stats)
        loaded.last_runs[stats.agent] = stats
        loaded.notify()
        _LOGGER.debug(
            "%s: prefilled %d tokens in %.1f ms (history reused: %s, cache: %s), "
            "generated %d tokens in %.1f ms",
            loaded.name,
            stats.prefill_tokens,
            stats.prefill_ms,
            stats.reused_history,
            stats.cache,
            stats.generate_tokens,
            stats.generate_ms,
        )


def _require_saved(staging: Path, model: str) -> None:
    """Refuse a build after which the runtime wrote no file (blocking)."""
    if not staging.exists():
        raise PromptCacheNotSaved(
            f"the runtime wrote no prompt cache file for {model}; "
            "it may not support saving one for this model (rknn-llm #517)"
        )


def _finished_perf(result: RunResult, model: str, name: str) -> PerfStats:
    """Return the perf of a cache build; refuse one whose FINISH did not arrive.

    Without FINISH and its perf nothing says what the file holds.
    """
    if result.perf is None or result.aborted:
        raise RunError(
            f"the runtime did not finish building prompt cache {name} of {model}", -1
        )
    return result.perf


def perf_or_zero(perf: PerfStats | None) -> PerfStats:
    """Return perf, or zeros when the runtime gave none (aborted runs)."""
    return perf or PerfStats(0.0, 0, 0.0, 0, 0.0)
