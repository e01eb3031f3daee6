"""RKLLMModel: one runtime handle, confined to one thread.

Every call on the handle runs on one thread, so the binding needs no locks around
the library; only ``abort`` is called from other threads. That thread is the
model's own worker thread, or (``own_thread=False``, a worker process that serves
one caller) the caller's. Methods return ``concurrent.futures.Future`` objects:
blocking code calls ``.result()``, asyncio code wraps them with
``asyncio.wrap_future``; without a thread of its own the call has run when its
future is returned.
"""

import codecs
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
import contextlib
import ctypes
from dataclasses import dataclass, field
import logging
import os
from pathlib import Path
import re
import sys
import tempfile
import threading
from typing import Any, Literal, TypeAlias, TypeVar

from .abi import (
    CallbackAction,
    CallState,
    InferMode,
    InputType,
    LLMHandle,
    LLMResultCallback,
    RKLLMCallback,
    RKLLMPromptCacheParam,
    RKLLMResult,
    RKLLMSamplingParam,
)
from .errors import ModelClosedError, ModelFileMissing, ModelInitError, RunError
from .library import RuntimeLibrary

_LOGGER = logging.getLogger(__name__)

_CONTEXT_LIMIT = re.compile(rb"max_context_limit\W{0,3}(\d+)")
"""The model's context limit in the runtime's load log (and its init error)."""
_STDERR_LOCK = threading.Lock()

Role = Literal["user", "tool"]
KVClear: TypeAlias = Literal["to_system", "all"]
_T = TypeVar("_T")
"""How much of the KV cache a clear removes: all but the system prompt, or all."""
TextSink = Callable[[str], None]
"""Receives decoded text on the worker thread; must return at once."""


@dataclass(frozen=True, slots=True)
class Sampling:
    """Sampling settings (init defaults, or per run on ABI family 1.3)."""

    top_k: int = 20
    top_p: float = 0.8
    temperature: float = 0.7
    repeat_penalty: float = 1.1
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0


@dataclass(frozen=True, slots=True)
class ModelParams:
    """Init parameters of a model handle."""

    model_path: Path
    max_context_len: int = 4096
    max_new_tokens: int = 512
    n_keep: int = -1
    sampling: Sampling = field(default_factory=Sampling)
    base_domain_id: int = 0
    embed_flash: bool = True
    enabled_cpus_num: int = 4
    enabled_cpus_mask: int = 0xF0
    skip_special_token: bool = True


@dataclass(frozen=True, slots=True)
class RunRequest:
    """One rkllm_run call."""

    prompt: str
    role: Role = "user"
    enable_thinking: bool = False
    keep_history: bool = False
    save_prompt_cache: Path | None = None
    sampling: Sampling | None = None
    max_new_tokens: int | None = None
    clear_kv_first: KVClear | None = None
    """Clear the KV cache before the run, in the same call (no round trip of its own)."""


@dataclass(frozen=True, slots=True)
class PerfStats:
    """The runtime's perf counters of one run."""

    prefill_time_ms: float
    prefill_tokens: int
    generate_time_ms: float
    generate_tokens: int
    memory_usage_mb: float


@dataclass(frozen=True, slots=True)
class RunResult:
    """How a run ended."""

    perf: PerfStats | None
    aborted: bool
    stopped_at_limit: bool
    kv_cache_size: int | None = None
    """KV positions in use after a run that kept history (read in the same job)."""


@dataclass(slots=True)
class _ActiveRun:
    """State of the run in progress, touched only on the model's thread."""

    sink: TextSink
    token_limit: int | None
    pause_at_limit: bool
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace")
    )
    tokens: int = 0
    perf: PerfStats | None = None
    error: bool = False
    stopped_at_limit: bool = False


class RKLLMModel:
    """One loaded model: a handle, the thread its calls run on, its callbacks."""

    def __init__(
        self,
        library: RuntimeLibrary,
        name: str,
        *,
        read_init_log: bool = True,
        own_thread: bool = True,
    ) -> None:
        """Create the worker thread (unless own_thread is False); call init() next.

        read_init_log: capture what the runtime prints while the model loads, to
        learn its context limit. A worker process leaves that to its parent, which
        reads all of its output (a capture would lose it if the load crashed).
        own_thread=False: every call runs on the calling thread, which must be the
        same one each time (a worker process's main thread).
        """
        self.library = library
        self._read_init_log = read_init_log
        self.name = name
        self.last_perf: PerfStats | None = None
        self.context_limit: int | None = None
        """The model's max_context_limit, as the runtime logged it at init."""
        self._lib: Any = library.cdll
        self._layout = library.layout
        self._executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"rkllm-{name}")
            if own_thread
            else None
        )
        self._handle = LLMHandle()
        self._handle_lock = threading.Lock()
        self._abort_requested = False
        self._closed = False
        self._active: _ActiveRun | None = None
        # The C side keeps pointers to these: they live as long as the model.
        self._c_callback = LLMResultCallback(self._on_result)
        self._c_callback_bundle = RKLLMCallback(result_callback=self._c_callback)
        self._c_param: ctypes.Structure | None = None
        self._c_strings: list[bytes] = []

    # Worker-thread plumbing

    def _submit(self, function: Callable[[], _T]) -> Future[_T]:
        if self._closed:
            raise ModelClosedError(f"model {self.name} is closed")
        if self._executor is not None:
            return self._executor.submit(function)
        future: Future[_T] = Future()
        try:
            future.set_result(function())
        except Exception as err:  # noqa: BLE001 - handed to the caller, as a thread does
            future.set_exception(err)
        return future

    def _require_handle(self) -> LLMHandle:
        if not self._handle:
            raise ModelClosedError(f"model {self.name} is not initialised")
        return self._handle

    def _check(self, function: str, code: int) -> None:
        if code != 0:
            raise RunError(f"{function} failed for {self.name} (code {code})", code)

    # Lifecycle

    def init(self, params: ModelParams) -> Future[None]:
        """Initialise the handle from params."""
        return self._submit(lambda: self._init(params))

    def _init(self, params: ModelParams) -> None:
        param: Any = self._lib.rkllm_createDefaultParam()
        model_path = str(params.model_path).encode()
        self._c_strings = [model_path]
        param.model_path = model_path
        param.max_context_len = params.max_context_len
        param.max_new_tokens = params.max_new_tokens
        param.n_keep = params.n_keep
        param.top_k = params.sampling.top_k
        param.top_p = params.sampling.top_p
        param.temperature = params.sampling.temperature
        param.repeat_penalty = params.sampling.repeat_penalty
        param.frequency_penalty = params.sampling.frequency_penalty
        param.presence_penalty = params.sampling.presence_penalty
        param.skip_special_token = params.skip_special_token
        param.is_async = False
        extend = param.extend_param
        extend.base_domain_id = params.base_domain_id
        extend.embed_flash = int(params.embed_flash)
        extend.enabled_cpus_num = params.enabled_cpus_num
        extend.enabled_cpus_mask = params.enabled_cpus_mask
        self._c_param = param
        callback: Any = (
            ctypes.byref(self._c_callback_bundle)
            if self._layout.has_sampling_params
            else self._c_callback
        )
        if self._read_init_log:
            with _stderr_of_c() as log:
                code = self._lib.rkllm_init(
                    ctypes.byref(self._handle), ctypes.byref(param), callback
                )
            self.context_limit = context_limit_in(b"".join(log))
        else:
            code = self._lib.rkllm_init(
                ctypes.byref(self._handle), ctypes.byref(param), callback
            )
        if code != 0 or not self._handle:
            self._handle = LLMHandle()
            raise init_failed(params, code, self.context_limit)

    def close(self) -> None:
        """Abort any run, destroy the handle on its thread and join the thread."""
        if self._closed:
            return
        self.abort()
        future = self._submit(self._destroy)
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        future.result()

    def _destroy(self) -> None:
        with self._handle_lock:
            handle, self._handle = self._handle, LLMHandle()
        if handle:
            self._lib.rkllm_destroy(handle)

    # Calls from any thread

    def abort(self) -> None:
        """Stop the running generation (safe from any thread)."""
        with self._handle_lock:
            if self._handle and self._active is not None:
                self._abort_requested = True
                self._lib.rkllm_abort(self._handle)

    @property
    def closed(self) -> bool:
        """Whether close() was called."""
        return self._closed

    # Calls confined to the worker thread

    def run(self, request: RunRequest, sink: TextSink) -> Future[RunResult]:
        """Run one input; decoded text goes to sink as it is generated."""
        return self._submit(lambda: self._run(request, sink))

    def _run(self, request: RunRequest, sink: TextSink) -> RunResult:
        handle = self._require_handle()
        if request.clear_kv_first is not None:
            self._clear_kv(keep_system_prompt=request.clear_kv_first == "to_system")
        keep: list[Any] = []
        c_input: Any = self._layout.input()
        role = request.role.encode()
        prompt = request.prompt.encode()
        keep += [role, prompt]
        c_input.role = role
        c_input.enable_thinking = request.enable_thinking
        c_input.input_type = InputType.PROMPT
        c_input.prompt_input = prompt
        infer: Any = self._layout.infer_param()
        infer.mode = InferMode.GENERATE
        infer.keep_history = int(request.keep_history)
        if request.save_prompt_cache is not None:
            path = str(request.save_prompt_cache).encode()
            cache_param = RKLLMPromptCacheParam(
                save_prompt_cache=1, prompt_cache_path=path
            )
            keep += [path, cache_param]
            infer.prompt_cache_params = ctypes.pointer(cache_param)
        if self._layout.has_sampling_params:
            if request.sampling is not None:
                sampling = _c_sampling(request.sampling)
                keep.append(sampling)
                infer.sampling_params = ctypes.pointer(sampling)
            infer.max_new_tokens = request.max_new_tokens or 0
        # On 1.3 the runtime stops at the per-run limit itself; on 1.2 the only way is
        # to pause the run from the callback (the KV is then unknown: callers reset it).
        active = _ActiveRun(
            sink=sink,
            token_limit=request.max_new_tokens,
            pause_at_limit=not self._layout.has_sampling_params,
        )
        self._abort_requested = False
        # Plain assignments: abort() holds _handle_lock while rkllm_abort runs, and a
        # runtime whose abort waits for the run to end must not find us waiting too.
        self._active = active
        try:
            code = self._lib.rkllm_run(
                handle, ctypes.byref(c_input), ctypes.byref(infer), None
            )
        finally:
            self._active = None
        tail = active.decoder.decode(b"", final=True)
        if tail:
            sink(tail)
        self.last_perf = active.perf
        if code != 0 or active.error:
            if self._abort_requested:
                return RunResult(active.perf, aborted=True, stopped_at_limit=False)
            raise RunError(
                f"the runtime reported an error while generating with {self.name} "
                f"(code {code})",
                code,
            )
        limit = request.max_new_tokens
        generated = active.perf.generate_tokens if active.perf else active.tokens
        return RunResult(
            perf=active.perf,
            aborted=self._abort_requested,
            stopped_at_limit=active.stopped_at_limit
            or (limit is not None and generated >= limit),
            kv_cache_size=self._kv_cache_size() if request.keep_history else None,
        )

    def _on_result(self, result: Any, _userdata: Any, state: int) -> int:
        """Receive one callback from the runtime (on the worker thread)."""
        active = self._active
        if active is None:
            return CallbackAction.CONTINUE
        if not result:
            # A NULL RKLLMResult*: nothing to read, but the state still counts.
            if state == CallState.ERROR:
                active.error = True
            return CallbackAction.CONTINUE
        try:
            return self._handle_result(active, result.contents, state)
        except Exception:
            _LOGGER.exception("Error in the RKLLM result callback of %s", self.name)
            return CallbackAction.PAUSE

    def _handle_result(
        self, active: _ActiveRun, result: RKLLMResult, state: int
    ) -> int:
        if state == CallState.FINISH:
            perf = result.perf
            active.perf = PerfStats(
                prefill_time_ms=perf.prefill_time_ms,
                prefill_tokens=perf.prefill_tokens,
                generate_time_ms=perf.generate_time_ms,
                generate_tokens=perf.generate_tokens,
                memory_usage_mb=perf.memory_usage_mb,
            )
            return CallbackAction.CONTINUE
        if state == CallState.ERROR:
            active.error = True
            return CallbackAction.CONTINUE
        if self._abort_requested:
            # Pausing is not stopping (it keeps the KV for a resume): rkllm_abort
            # ends the run; until it lands, text is no longer wanted.
            return CallbackAction.CONTINUE
        if state != CallState.NORMAL:
            # WAITING carries the first bytes of a character that the next NORMAL
            # callback delivers whole (as every upstream client assumes): skip it.
            return CallbackAction.CONTINUE
        if result.text:
            text = active.decoder.decode(result.text, final=False)
            if text:
                active.sink(text)
        active.tokens += 1
        if (
            active.pause_at_limit
            and active.token_limit is not None
            and active.tokens >= active.token_limit
        ):
            active.stopped_at_limit = True
            return CallbackAction.PAUSE
        return CallbackAction.CONTINUE

    def load_prompt_cache(self, path: Path) -> Future[None]:
        """Load a prompt cache file for later runs to reuse."""

        def load() -> None:
            code = self._lib.rkllm_load_prompt_cache(
                self._require_handle(), str(path).encode()
            )
            self._check("rkllm_load_prompt_cache", code)

        return self._submit(load)

    def release_prompt_cache(self) -> Future[None]:
        """Release the loaded prompt cache."""
        return self._submit(
            lambda: self._check(
                "rkllm_release_prompt_cache",
                self._lib.rkllm_release_prompt_cache(self._require_handle()),
            )
        )

    def clear_kv_cache(self, *, keep_system_prompt: bool) -> Future[None]:
        """Clear the KV cache, optionally keeping the system prompt."""
        return self._submit(
            lambda: self._clear_kv(keep_system_prompt=keep_system_prompt)
        )

    def _clear_kv(self, *, keep_system_prompt: bool) -> None:
        self._check(
            "rkllm_clear_kv_cache",
            self._lib.rkllm_clear_kv_cache(
                self._require_handle(), int(keep_system_prompt), None, None
            ),
        )

    def _kv_cache_size(self) -> int | None:
        """KV positions in use, or None when the runtime does not say.

        rkllm_get_kv_cache_size has no documented return value: any non-zero code
        or a negative size means "unknown", never a failed run.
        """
        sizes = (ctypes.c_int * 8)(*([-1] * 8))  # one entry per batch; we run one
        code = self._lib.rkllm_get_kv_cache_size(self._require_handle(), sizes)
        if code != 0 or sizes[0] < 0:
            _LOGGER.debug(
                "rkllm_get_kv_cache_size gave code %s for %s", code, self.name
            )
            return None
        return int(sizes[0])

    def set_chat_template(self, system: str, prefix: str, postfix: str) -> Future[None]:
        """Override the chat template (system prompt, user prefix and postfix)."""
        return self._submit(
            lambda: self._check(
                "rkllm_set_chat_template",
                self._lib.rkllm_set_chat_template(
                    self._require_handle(),
                    system.encode(),
                    prefix.encode(),
                    postfix.encode(),
                ),
            )
        )

    def set_function_tools(
        self, system: str, tools_json: str, tool_response_tag: str = "tool_response"
    ) -> Future[None]:
        """Set the system prompt and the tools (a JSON array) for tool calling."""
        return self._submit(
            lambda: self._check(
                "rkllm_set_function_tools",
                self._lib.rkllm_set_function_tools(
                    self._require_handle(),
                    system.encode(),
                    tools_json.encode(),
                    tool_response_tag.encode(),
                ),
            )
        )


def context_limit_in(log: bytes) -> int | None:
    """Return the max_context_limit the runtime printed while loading a model."""
    found = _CONTEXT_LIMIT.search(log)
    return int(found.group(1)) if found is not None else None


def init_failed(
    params: ModelParams, code: int, limit: int | None, output: Sequence[str] = ()
) -> ModelInitError:
    """Describe a failed rkllm_init: a missing file, a context above the model's limit.

    output: the runtime's log of the load; its error lines say what it refused.
    """
    if not params.model_path.is_file():
        return ModelFileMissing(
            f"the model file {params.model_path} is gone (removed or renamed while "
            "it was in use); put it back, or pick another model for its agents, "
            "and reload the integration",
            model=str(params.model_path),
        )
    said = [line for line in output if line.startswith("E ")]
    if limit is not None and params.max_context_len > limit:
        return ModelInitError(
            f"rkllm_init failed for {params.model_path}: context length "
            f"{params.max_context_len} is above the model's limit of {limit} "
            "tokens; lower the agents' context length",
            model=str(params.model_path),
            limit=str(limit),
            max_context_len=str(params.max_context_len),
        )
    return ModelInitError(
        f"rkllm_init failed for {params.model_path} (code {code}); "
        + (f"the runtime said: {' '.join(said)}; " if said else "")
        + "check the model file, the runtime version and the context length",
        model=str(params.model_path),
        code=str(code),
        max_context_len=str(params.max_context_len),
    )


@contextlib.contextmanager
def _stderr_of_c() -> Iterator[list[bytes]]:
    """Read what is written to file descriptor 2 meanwhile (the runtime's log).

    It is written through to the real stderr afterwards. One capture at a time.
    """
    captured: list[bytes] = []
    with _STDERR_LOCK, tempfile.TemporaryFile() as file:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(file.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            file.seek(0)
            captured.append(file.read())
            data = memoryview(captured[0])
            while data:
                data = data[os.write(2, data) :]


def _c_sampling(sampling: Sampling) -> RKLLMSamplingParam:
    return RKLLMSamplingParam(
        top_k=sampling.top_k,
        top_p=sampling.top_p,
        temperature=sampling.temperature,
        repeat_penalty=sampling.repeat_penalty,
        frequency_penalty=sampling.frequency_penalty,
        presence_penalty=sampling.presence_penalty,
        mirostat=0,
        mirostat_tau=5.0,
        mirostat_eta=0.1,
    )
