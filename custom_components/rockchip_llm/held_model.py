"""A model's handle and what it holds, for whoever holds the model (no Home Assistant imports).

Only :class:`~.session.ModelSession` hands one out, while its lock is held; a new
worker process gets a new one (it holds nothing: no system prompt, cache or KV).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
import logging
from pathlib import Path
import re
import time
from typing import TYPE_CHECKING, Protocol

from .const import AUTO_CACHE_PREFIX, HistoryStrategy
from .generation import Generation, call
from .host.prompt_cache import (
    CacheEntry,
    CacheExpectation,
    CacheMetadata,
    CacheTooLong,
    CacheWriteError,
    CorruptCache,
    prompt_sha256,
)
from .host.rkllm.errors import PromptCacheNotSaved, RKLLMError, RunError
from .host.rkllm.runtime import ModelParams, PerfStats, RunRequest, RunResult
from .remote import RemoteWorker
from .run_planner import (
    TOOL_RESPONSE_TAG,
    KVState,
    SystemPrefix,
    chat_template,
    estimate_tokens,
    expected_prefill,
    reuse_honoured,
)

if TYPE_CHECKING:
    from .session import ModelSession, SessionServices

_LOGGER = logging.getLogger(__name__)

WARM_UP_PROMPT = "Hi"
"""The turn of the check run made right after a cache is loaded."""

_STALE_REASONS = {
    "no_content_hash": "built by an earlier version, its metadata has no content hash",
}
"""Why a cache is rebuilt, for the log, where the reason alone says too little."""


class ReuseGuard(Protocol):
    """The history strategy an agent runs with, and its check that reuse happened."""

    @property
    def strategy(self) -> HistoryStrategy:
        """The strategy in force (it can fall back after a failed check)."""

    def check_reuse(
        self, prefill_tokens: int, expected: int, prefix_tokens: int, source: str
    ) -> bool:
        """Judge a run that should have reused the prefix; False: it did not."""


def cache_context(
    params: ModelParams, prefix: SystemPrefix
) -> dict[str, int | float | bool | str]:
    """Return what, besides the prompt, a cache of prefix depends on."""
    context: dict[str, int | float | bool | str] = {
        "max_context_len": params.max_context_len,
        "tools_sha256": prefix.tools_sha256,
    }
    if not prefix.has_tools:
        # Set as a chat template, not as tools: other tokens than a cache made
        # through set_function_tools("[]") by earlier versions.
        context["system_template"] = "chatml"
    return context


def is_exact(entry: CacheEntry | None, prefix: SystemPrefix) -> bool:
    """Whether a cache found for prefix holds all of its prompt."""
    return (
        entry is not None
        and entry.metadata is not None
        and entry.metadata.prompt_length == len(prefix.prompt)
    )


def handle_key(prefix: SystemPrefix, *, thinking: bool) -> str:
    """Return what identifies prefix as set on a handle (with thinking, unless tools)."""
    return prefix.key if prefix.has_tools else f"{prefix.key}/template/{thinking}"


class HeldModel:
    """The handle of a held model: its prefix, loaded cache, KV and cache files."""

    def __init__(self, session: ModelSession, worker: RemoteWorker) -> None:
        """Wrap a worker process that holds nothing yet."""
        self.session = session
        self.services: SessionServices = session.services
        self.worker = worker
        self.prefix_key: str | None = None
        """The system prompt and tools currently set on the handle."""
        self.loaded_cache: CacheEntry | None = None
        self.kv: KVState | None = None
        """What the KV holds after the prefix; None: unknown (reset before reuse)."""
        self.kv_tokens = 0
        self.sent_tool_results: dict[str, str] = {}
        """Tool results as first sent to the model, by tool call id."""
        self.listing: list[CacheEntry] | None = None
        """The store's listing for this model, read once and dropped on every change."""
        self._found: tuple[SystemPrefix, list[CacheEntry], CacheEntry | None] | None = (
            None
        )
        """The last search: its prefix, the listing searched and what it found."""

    def generation(self, request: RunRequest) -> Generation:
        """Return a run of the handle (iterating it starts it)."""
        return Generation(
            self.worker,
            request,
            gate=self.services.run_gate,
            on_result=self._note_result,
        )

    def _note_result(self, result: RunResult) -> None:
        if result.perf is not None:
            self.session.memory_mb = result.perf.memory_usage_mb

    async def async_set_prefix(
        self, prefix: SystemPrefix, *, thinking: bool = False
    ) -> None:
        """Put prefix (system prompt and tools) on the handle if it is not there.

        A prefix without tools is set as a chat template, never as an empty tool
        list (rknn-llm #377); thinking then lives in the template. Upstream
        promises a KV clear only for set_chat_template: it is cleared here.
        """
        key = handle_key(prefix, thinking=thinking)
        if self.prefix_key == key:
            return
        if prefix.has_tools:
            await call(
                self.worker.set_function_tools(
                    prefix.prompt, prefix.tools_json, TOOL_RESPONSE_TAG
                )
            )
        else:
            template = chat_template(prefix.prompt, thinking=thinking)
            await call(
                self.worker.set_chat_template(
                    template.system, template.user_prefix, template.user_postfix
                )
            )
        self.prefix_key = key
        await self.async_reset_kv(keep_system=False)

    async def async_reset_kv(self, *, keep_system: bool = True) -> None:
        """Clear the KV back to the system prompt (or entirely)."""
        await call(self.worker.clear_kv_cache(keep_system_prompt=keep_system))
        self.kv_cleared()

    def kv_cleared(self) -> None:
        """Note that the KV was cleared (by a clear call or by a run that cleared it first)."""
        self.kv = None
        self.kv_tokens = 0
        self.sent_tool_results.clear()

    async def _async_listing(self) -> list[CacheEntry]:
        if self.listing is None:
            self.listing = await self.services.store.async_list(self.session.name)
        return self.listing

    async def async_find_cache(self, prefix: SystemPrefix) -> CacheEntry | None:
        """Return the valid cache with the longest prompt that prefix starts with.

        Requests carry the same prefix object while their prompt stays the same:
        the search is kept until the prefix or the listing changes.
        """
        listing = await self._async_listing()
        if (found := self._found) is not None and (
            found[0] is prefix and found[1] is listing
        ):
            return found[2]
        expected = self.session.expectation(prefix)
        best: CacheEntry | None = None
        for entry in listing:
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
        self._found = (prefix, listing, best)
        return best

    async def async_prune(self, name_prefix: str, keep: int) -> None:
        """Delete the oldest caches whose name starts with name_prefix beyond keep."""
        named = sorted(
            (
                entry
                for entry in await self._async_listing()
                if entry.name.startswith(name_prefix) and entry.metadata is not None
            ),
            key=lambda entry: entry.metadata.created_at if entry.metadata else "",
            reverse=True,
        )
        for entry in named[keep:]:
            await self.async_delete_cache(entry.name)

    async def async_use_cache(self, entry: CacheEntry | None) -> None:
        """Make entry the handle's loaded prompt cache (None releases it)."""
        current = self.loaded_cache
        if (
            current is not None
            and entry is not None
            and (current is entry or current.bin_path == entry.bin_path)
        ):
            return
        if current is not None:
            await call(self.worker.release_prompt_cache())
            self.loaded_cache = None
        if entry is not None:
            await call(self.worker.load_prompt_cache(entry))
            self.loaded_cache = entry
            await self.services.store.async_touch(entry)

    async def async_try_use_cache(self, entry: CacheEntry | None) -> bool:
        """Like async_use_cache, but a cache that cannot be loaded means none.

        Return whether entry is loaded now. A file that failed its content check
        is no longer ready: its keeper builds it again.
        """
        try:
            await self.async_use_cache(entry)
        except (RKLLMError, CorruptCache) as err:
            _LOGGER.warning(
                "Prompt cache %s cannot be loaded (%s); going without",
                entry and entry.name,
                err,
            )
            self.listing = None
            if entry is not None and isinstance(err, CorruptCache):
                self.session.forget_ready(entry.name)
            return False
        return entry is not None

    async def async_delete_cache(self, name: str) -> bool:
        """Delete a named cache of the model (released first if loaded)."""
        if self.loaded_cache is not None and self.loaded_cache.name == name:
            await self.async_use_cache(None)
        try:
            deleted = await self.services.store.async_delete(self.session.name, name)
        finally:
            self.listing = None
        return deleted

    async def async_load_or_build(
        self,
        prefix: SystemPrefix,
        name: str,
        source: str,
        shared: CacheEntry | None = None,
    ) -> tuple[CacheEntry | None, bool]:
        """Load the valid named cache of prefix, else shared, else build the named one.

        shared is a cache known to hold prefix under another name. Return the
        cache and whether it was built now. None: the runtime saves no prompt
        cache for this model (the prefix is set).
        """
        if self.session.cache_unsupported is not None:
            await self.async_set_prefix(prefix)
            return None, False
        entry = await self.services.store.async_get(self.session.name, name)
        if entry is not None and (
            reason := entry.invalid_reason(self.session.expectation(prefix))
        ):
            _LOGGER.info(
                "Prompt cache %s/%s is stale (%s); rebuilding it",
                self.session.name,
                name,
                _STALE_REASONS.get(reason, reason),
            )
            entry = None
        for candidate in (entry, shared):
            if candidate is None:
                continue
            await self.async_set_prefix(prefix)
            try:
                await self.async_use_cache(candidate)
            except CorruptCache as err:  # the host found the file not as described
                _LOGGER.info("%s; rebuilding it", err)  # (the host warned of it)
            except RKLLMError as err:  # a cache the runtime refuses is rebuilt
                _LOGGER.warning(
                    "The runtime refused prompt cache %s (%s); rebuilding it",
                    candidate.bin_path,
                    err,
                )
            else:
                return candidate, False
        try:
            return await self.async_build_cache(prefix, name, source), True
        except PromptCacheNotSaved:
            return None, False

    async def async_check_reuse(
        self,
        cache: CacheEntry,
        guard: ReuseGuard,
        rebuild: Callable[[], Awaitable[CacheEntry]] | None = None,
    ) -> CacheEntry:
        """Run a short turn on the cache just loaded until its reuse is honoured.

        rebuild, for a cache loaded from disk: when the first check fails, the
        file is suspected before the runtime (another prompt's KV under this
        name): it is rebuilt once and checked again; only a failure after that
        makes the guard fall back. Return the cache in use.
        """
        while guard.strategy is not HistoryStrategy.OFF:
            if (metadata := cache.metadata) is None:
                break
            result = await self._async_warm_up(
                keep_history=guard.strategy is HistoryStrategy.AUTO
            )
            if result.perf is None:
                break
            prefill, expected = (
                result.perf.prefill_tokens,
                expected_prefill(WARM_UP_PROMPT),
            )
            if rebuild is not None and not reuse_honoured(
                prefill, expected, metadata.tokens
            ):
                _LOGGER.warning(
                    "Right after prompt cache %s was loaded the runtime prefilled %d "
                    "tokens where about %d were expected: rebuilding the file before "
                    "doubting the runtime",
                    cache.bin_path,
                    prefill,
                    expected,
                )
                cache, rebuild = await rebuild(), None
                continue
            if guard.check_reuse(prefill, expected, metadata.tokens, "warm-up"):
                break
        return cache

    async def _async_warm_up(self, *, keep_history: bool) -> RunResult:
        """Run a one-token turn on an empty KV (only a loaded cache can help it)."""
        await self.async_reset_kv(keep_system=False)
        try:
            return await self.generation(
                RunRequest(
                    prompt=WARM_UP_PROMPT, keep_history=keep_history, max_new_tokens=1
                )
            ).collect()
        finally:
            await self.async_reset_kv(keep_system=False)

    async def async_build_cache(
        self, prefix: SystemPrefix, name: str, source: str
    ) -> CacheEntry:
        """Prefill prefix once and store it as the named cache, then load it.

        On failure the previous cache files are intact (atomic commit) and the
        handle gets back the cache it had loaded.
        """
        previous = self.loaded_cache
        self.session.building = name
        self.session.notify()
        try:
            entry, build_ms = await self._async_build(prefix, name, source)
        except PromptCacheNotSaved as err:
            if self.session.cache_unsupported is None:
                _LOGGER.warning(
                    "%s; its agents work without a prompt cache (slower first "
                    "answers) until the integration is reloaded",
                    err,
                )
                self.session.cache_unsupported = str(err)
            self.session.build_error = str(err)
            if previous is not None:
                await self.async_try_use_cache(previous)
            raise
        except Exception as err:
            if isinstance(err, CacheWriteError) and err.disk_problem is not None:
                self.services.on_cache_write(err)
            self.session.build_error = str(err) or type(err).__name__
            if previous is not None:
                await self.async_try_use_cache(previous)
            raise
        else:
            self.session.build_error = None
        finally:
            self.listing = None
            self.session.building = None
            self.session.notify()
        self.services.on_cache_write(None)
        metadata = entry.metadata
        assert metadata is not None
        _LOGGER.info(
            "Built prompt cache %s/%s: %d tokens in %.0f ms, %d bytes",
            self.session.name,
            name,
            metadata.tokens,
            build_ms,
            metadata.size_bytes,
        )
        await self.async_use_cache(entry)
        return entry

    async def _async_build(
        self, prefix: SystemPrefix, name: str, source: str
    ) -> tuple[CacheEntry, float]:
        store = self.services.store
        evicted = await store.async_make_room(
            self.session.name, name, len(prefix.prompt), AUTO_CACHE_PREFIX
        )
        if evicted:
            self.services.on_caches_evicted()
        await self.async_set_prefix(prefix)
        await self.async_use_cache(None)
        await self.async_reset_kv(keep_system=False)
        staging = await store.async_staging(self.session.name, name)
        started = time.monotonic()
        try:
            try:
                result = await self.generation(
                    RunRequest(
                        prompt="", save_prompt_cache=Path(staging), max_new_tokens=1
                    )
                ).collect()
            except RKLLMError as err:
                raise await self._build_error(prefix, staging, err) from err
            build_ms = (time.monotonic() - started) * 1000
            perf = _finished_perf(result, self.session.name, name)
            info = self.services.runtime
            metadata = CacheMetadata(
                name=name,
                model=self.session.name,
                created_at=datetime.now(UTC).isoformat(),
                prompt_sha256=prefix.prompt_sha256,
                prompt_length=len(prefix.prompt),
                tokens=perf.prefill_tokens,
                size_bytes=0,  # the commit measures the staged file
                build_ms=round(build_ms, 1),
                source=source,
                model_fingerprint=self.session.fingerprint,
                runtime_family=str(info.family),
                runtime_version=info.version,
                context=cache_context(self.session.params, prefix),
            )
            entry = await store.async_commit(staging, metadata)
        except BaseException:
            await store.async_discard(staging)
            raise
        return entry, build_ms

    async def _build_error(
        self, prefix: SystemPrefix, staging: str, err: RKLLMError
    ) -> Exception:
        """Say why the runtime failed to build a cache: the disk, the context, or err."""
        problem = await self.services.store.async_write_problem(staging)
        if problem is not None:
            return problem
        tokens = estimate_tokens(prefix.prompt) + estimate_tokens(prefix.tools_json)
        await self.worker.async_refresh_tail()
        counted = runtime_input_tokens(self.worker.output_tail())
        if counted is not None or tokens >= self.session.params.max_context_len:
            tokens = counted or tokens
            return CacheTooLong(
                f"{err}. The system prompt ({'' if counted else 'up to '}{tokens} "
                "tokens) may not fit the "
                f"context length of {self.session.params.max_context_len} tokens: raise "
                "the agent's context length or expose fewer entities",
                error=str(err),
                tokens=str(tokens),
                max_context_len=str(self.session.params.max_context_len),
                counted="runtime" if counted else "estimate",
            )
        return err


_INPUT_TOO_LONG = re.compile(
    r"input(?: tokens)?\s*\(\s*(\d+)(?: tokens)?\s*\)\s*(?:exceed|does not fit)"
)


def runtime_input_tokens(output: list[str]) -> int | None:
    """Return the token count the runtime printed for an input too long, if it did.

    The runtime logs "the input tokens(N) exceed max_context_len(M)"; the
    simulator "the input (N tokens) does not fit max_context_len M".
    """
    for line in reversed(output):
        if (match := _INPUT_TOO_LONG.search(line)) is not None:
            return int(match.group(1))
    return None


def _finished_perf(result: RunResult, model: str, name: str) -> PerfStats:
    """Return the perf of a cache build; refuse one whose FINISH did not arrive.

    Without FINISH and its perf nothing says what the file holds.
    """
    if result.perf is None or result.aborted:
        raise RunError(
            f"the runtime did not finish building prompt cache {name} of {model}", -1
        )
    return result.perf
