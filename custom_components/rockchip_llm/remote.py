"""The runtime host as Home Assistant uses it (no Home Assistant imports).

:class:`RuntimeHost` wraps a link with what the integration asks of the NPU side:
the model scan, the board's facts, a model's fingerprint, workers
(:class:`RemoteWorker`, with the interface of the host's own ``WorkerModel``) and
the prompt cache store (:class:`RemoteStore`). Paths in the answers are the host's:
Home Assistant shows them and hands them back, but never opens them.
"""

import asyncio
from collections.abc import Callable
import contextlib
from typing import Any

from .host.model_files import ModelScan
from .host.prompt_cache import CacheEntry, CacheMetadata, CacheWriteError
from .host.rkllm.errors import ModelClosedError, WorkerDiedError
from .host.rkllm.library import RuntimeInfo, info_from_wire
from .host.rkllm.protocol import params_to_wire, request_to_wire, result_from_wire
from .host.rkllm.runtime import ModelParams, PerfStats, RunRequest, RunResult
from .host.wire import (
    HostLost,
    Message,
    entry_from_wire,
    error_from_wire,
    scan_from_wire,
)
from .link import HostLink, TextSink


class RemoteWorker:
    """A model loaded in a worker process of the host."""

    def __init__(
        self,
        link: HostLink,
        name: str,
        worker_id: int,
        context_limit: int | None,
        pid: int | None,
    ) -> None:
        """Wrap a started worker; RuntimeHost.async_open_worker makes one."""
        self._link = link
        self.name = name
        self.worker_id = worker_id
        self.context_limit = context_limit
        """The model's max_context_limit, as the runtime logged it at init."""
        self.pid = pid
        """The worker's process id on the host."""
        self.last_perf: PerfStats | None = None
        self._death: WorkerDiedError | None = None
        self._closed = False
        self._loop = asyncio.get_running_loop()
        self._output: list[str] = []

    @property
    def closed(self) -> bool:
        """Whether close was called."""
        return self._closed

    @property
    def death(self) -> WorkerDiedError | None:
        """Why the worker died (or the link to its host ended), if it did."""
        if self._death is None and self._link.lost is not None:
            self._death = self._link.lost
        return self._death

    def died(self, error: WorkerDiedError) -> None:
        """Note that the host reported the worker dead."""
        if self._death is None:
            self._death = error

    def output_tail(self) -> list[str]:
        """Return the runtime's last output lines, as last fetched (async_refresh_tail)."""
        return list(self._output)

    async def async_refresh_tail(self) -> None:
        """Fetch the runtime's last output lines from the host."""
        if self.death is None and not self._closed:
            tail = await self._link.request("worker.tail", {"worker": self.worker_id})
            self._output = [str(line) for line in tail["output"]]

    def _request(
        self, op: str, args: Message | None = None, sink: TextSink | None = None
    ) -> asyncio.Task[Any]:
        self._check_open()
        return self._loop.create_task(self._async_request(op, args, sink))

    def _check_open(self) -> None:
        """Raise why no request can be made, if one cannot."""
        if (death := self.death) is not None:
            raise death
        if self._closed:
            raise ModelClosedError(f"model {self.name} is closed")

    async def _async_request(
        self, op: str, args: Message | None, sink: TextSink | None
    ) -> Any:
        try:
            return await self._link.request(
                f"worker.{op}", {"worker": self.worker_id, **(args or {})}, sink=sink
            )
        except WorkerDiedError as err:
            self.died(err)
            raise

    def run(self, request: RunRequest, sink: TextSink) -> asyncio.Task[RunResult]:
        """Run one input; decoded text goes to sink (on the event loop).

        The task starts at once (eagerly): the request leaves before this returns.
        """
        self._check_open()
        return asyncio.Task(
            self._async_run(request, sink), loop=self._loop, eager_start=True
        )

    async def _async_run(self, request: RunRequest, sink: TextSink) -> RunResult:
        result = result_from_wire(
            await self._async_request(
                "run", {"request": request_to_wire(request)}, sink
            )
        )
        if result.perf is not None:
            self.last_perf = result.perf
        if result.aborted and self._closed:
            raise ModelClosedError(
                f"model {self.name} was unloaded while it was answering"
            )
        return result

    def abort(self) -> None:
        """Stop the running generation (safe from any thread)."""
        with contextlib.suppress(RuntimeError):  # a closed loop: nothing runs
            self._loop.call_soon_threadsafe(
                self._link.send, "worker.abort", {"worker": self.worker_id}
            )

    def load_prompt_cache(self, entry: CacheEntry) -> asyncio.Task[None]:
        """Load a prompt cache of the host's store for later runs to reuse."""
        return self._request("load_prompt_cache", {"path": str(entry.bin_path)})

    def release_prompt_cache(self) -> asyncio.Task[None]:
        """Release the loaded prompt cache."""
        return self._request("release_prompt_cache")

    def clear_kv_cache(self, *, keep_system_prompt: bool) -> asyncio.Task[None]:
        """Clear the KV cache, optionally keeping the system prompt."""
        return self._request(
            "clear_kv_cache", {"keep_system_prompt": keep_system_prompt}
        )

    def set_chat_template(
        self, system: str, prefix: str, postfix: str
    ) -> asyncio.Task[None]:
        """Override the chat template (system prompt, user prefix and postfix)."""
        return self._request(
            "set_chat_template",
            {"system": system, "prefix": prefix, "postfix": postfix},
        )

    def set_function_tools(
        self, system: str, tools_json: str, tool_response_tag: str = "tool_response"
    ) -> asyncio.Task[None]:
        """Set the system prompt and the tools (a JSON array) for tool calling."""
        return self._request(
            "set_function_tools",
            {
                "system": system,
                "tools_json": tools_json,
                "tool_response_tag": tool_response_tag,
            },
        )

    async def async_close(self) -> None:
        """Abort any run and stop the worker process on the host."""
        if self._closed:
            return
        self._closed = True
        if self._link.lost is None:
            with contextlib.suppress(HostLost):
                await self._link.request("worker.close", {"worker": self.worker_id})


class RemoteStore:
    """The host's prompt cache store; each method is one request."""

    def __init__(self, link: HostLink, root: str, budget_bytes: int | None) -> None:
        """Use the store of the host behind link."""
        self._link = link
        self.root = root
        """The cache folder on the host."""
        self.budget_bytes = budget_bytes

    async def async_list(self, model: str | None = None) -> list[CacheEntry]:
        """Return the caches of one model or all."""
        return [entry for entry, _size in await self.async_list_sized(model)]

    async def async_list_sized(
        self, model: str | None = None
    ) -> list[tuple[CacheEntry, int]]:
        """Return the caches of one model or all, each with the bytes it takes."""
        listing = await self._link.request("cache.list", {"model": model})
        return [(entry_from_wire(item), int(item["disk_bytes"])) for item in listing]

    async def async_get(self, model: str, name: str) -> CacheEntry | None:
        """Return a cache entry, None when neither of its files exists."""
        data = await self._link.request("cache.get", {"model": model, "name": name})
        return entry_from_wire(data) if data is not None else None

    async def async_delete(self, model: str, name: str) -> bool:
        """Delete a cache's files; False when none existed."""
        return bool(
            await self._link.request("cache.delete", {"model": model, "name": name})
        )

    async def async_touch(self, entry: CacheEntry) -> None:
        """Record that a cache was just used."""
        await self._link.request(
            "cache.touch", {"model": entry.model, "name": entry.name}
        )

    async def async_make_room(
        self, model: str, name: str, prompt_length: int, evictable: str
    ) -> list[CacheEntry]:
        """Keep the budget for a new cache; return the evicted ones."""
        evicted = await self._link.request(
            "cache.make_room",
            {
                "model": model,
                "name": name,
                "prompt_length": prompt_length,
                "evictable": evictable,
            },
        )
        return [entry_from_wire(item) for item in evicted]

    async def async_staging(self, model: str, name: str) -> str:
        """Return a fresh staging path on the host for the runtime to write."""
        return str(
            await self._link.request("cache.staging", {"model": model, "name": name})
        )

    async def async_commit(self, staging: str, metadata: CacheMetadata) -> CacheEntry:
        """Install a staged cache with its metadata."""
        return entry_from_wire(
            await self._link.request(
                "cache.commit", {"staging": staging, "metadata": metadata.to_json()}
            )
        )

    async def async_discard(self, staging: str) -> None:
        """Remove a staging file."""
        await self._link.request("cache.discard", {"staging": staging})

    async def async_write_problem(self, staging: str) -> CacheWriteError | None:
        """Whether a failed save was the disk's fault."""
        problem = await self._link.request("cache.write_problem", {"staging": staging})
        if problem is None:
            return None
        error = error_from_wire(problem)
        return error if isinstance(error, CacheWriteError) else None

    async def async_disk_problem(
        self, model: str | None, name: str, needed_bytes: int, evictable: str
    ) -> CacheWriteError | None:
        """Return what would refuse a cache of needed_bytes now (disk, budget), if anything.

        model None: the cache folder itself is asked.
        """
        problem = await self._link.request(
            "cache.disk_problem",
            {
                "model": model,
                "name": name,
                "needed_bytes": needed_bytes,
                "evictable": evictable,
            },
        )
        if problem is None:
            return None
        error = error_from_wire(problem)
        return error if isinstance(error, CacheWriteError) else None

    async def async_usage(self) -> Message:
        """Return the cache folder's path, budget, used and free bytes."""
        usage: Message = await self._link.request("cache.usage")
        return usage


class RuntimeHost:
    """A connected runtime host: what Home Assistant asks of the NPU side."""

    def __init__(self, link: HostLink, hello: Message) -> None:
        """Wrap a greeted link."""
        self.link = link
        self.hello = hello
        self.store = RemoteStore(
            link, str(hello["cache_dir"]), hello.get("cache_budget_bytes")
        )
        self._workers: dict[int, RemoteWorker] = {}
        link.on_event("worker_died", self._worker_died)
        link.on_lost(self._lost)

    @property
    def where(self) -> str:
        """Where the host runs, for messages ("this machine", an address)."""
        return self.link.where

    @property
    def identity(self) -> str | None:
        """A TCP host's identity (sha256:<hex> of its certificate), else None."""
        return self.link.identity

    @property
    def runtime(self) -> RuntimeInfo | None:
        """The checked runtime library, None when the host cannot use its library."""
        data = self.hello.get("runtime")
        return info_from_wire(data) if data is not None else None

    @property
    def simulated(self) -> bool:
        """Whether the host's library is the development simulator."""
        data = self.hello.get("runtime")
        return bool(data and data.get("simulated"))

    def library_error(self) -> Exception | None:
        """Why the host cannot use its library, None when it can."""
        data = self.hello.get("library_error")
        return error_from_wire(data) if data is not None else None

    def library_copy_problem(self) -> CacheWriteError | None:
        """Return the disk's refusal of the library's private copy, if that was it."""
        data = self.hello.get("library_disk_error")
        error = error_from_wire(data) if data is not None else None
        return error if isinstance(error, CacheWriteError) else None

    @property
    def board(self) -> Message:
        """The board's facts from the hello (NPU driver version, SoC)."""
        board: Message = self.hello.get("board") or {}
        return board

    async def async_scan(self) -> ModelScan:
        """Scan the host's models folder."""
        return scan_from_wire(await self.link.request("models.scan"))

    async def async_board_info(self) -> Message:
        """Read the board's facts again."""
        info: Message = await self.link.request("board.info")
        return info

    async def async_npu_load(self) -> float | None:
        """Return the NPU's mean load in percent, None where the kernel does not say."""
        load = await self.link.request("board.npu_load")
        return None if load is None else float(load)

    async def async_fingerprint(self, model: str) -> dict[str, int | str]:
        """Return the fingerprint of a model's file."""
        fingerprint: dict[str, int | str] = await self.link.request(
            "models.fingerprint", {"model": model}
        )
        return fingerprint

    async def async_open_worker(self, name: str, params: ModelParams) -> RemoteWorker:
        """Start a worker for a model on the host and load the model in it."""
        opened = await self.link.request(
            "worker.open", {"model": name, "params": params_to_wire(params)}
        )
        worker = RemoteWorker(
            self.link,
            name,
            int(opened["worker"]),
            opened.get("context_limit"),
            opened.get("pid"),
        )
        self._workers[worker.worker_id] = worker
        return worker

    def _worker_died(self, event: Message) -> None:
        worker = self._workers.pop(int(event.get("worker", 0)), None)
        error = error_from_wire(event.get("error"))
        if worker is not None:
            worker.died(
                error
                if isinstance(error, WorkerDiedError)
                else WorkerDiedError(str(error), model=worker.name, how="")
            )

    def _lost(self, error: HostLost) -> None:
        for worker in self._workers.values():
            worker.died(error)

    def on_lost(self, listener: Callable[[HostLost], None]) -> Callable[[], None]:
        """Call listener once when the link ends unexpectedly."""
        return self.link.on_lost(listener)

    async def async_close(self) -> None:
        """Close the link (the host stops this client's workers)."""
        await self.link.async_close()
