"""RKLLMModel against the simulator library, through the real ctypes binding."""

from collections.abc import Callable, Generator
import ctypes
import json
from pathlib import Path
import re
import threading

import pytest

from custom_components.rockchip_llm.host.rkllm.errors import ModelInitError, RunError
from custom_components.rockchip_llm.host.rkllm.library import (
    RuntimeLibrary,
    load_library,
)
from custom_components.rockchip_llm.host.rkllm.runtime import (
    ModelParams,
    RKLLMModel,
    RunRequest,
    RunResult,
    Sampling,
)

from .conftest import ModelWriter

SYSTEM = " ".join(f"rule{i} keep answers short." for i in range(60))


@pytest.fixture
def runtime(sim_library: Path) -> RuntimeLibrary:
    """The simulator, loaded through the binding."""
    return load_library(sim_library)


@pytest.fixture
def open_model(runtime: RuntimeLibrary) -> Generator[Callable[..., RKLLMModel]]:
    """Open models that are closed (and their threads joined) after the test."""
    models: list[RKLLMModel] = []

    def open_(path: Path, **params: object) -> RKLLMModel:
        model = RKLLMModel(runtime, f"m{len(models)}")
        models.append(model)
        model.init(ModelParams(model_path=path, **params)).result()  # type: ignore[arg-type]
        return model

    yield open_
    for model in models:
        model.close()


def run(
    model: RKLLMModel, prompt: str, **kwargs: object
) -> tuple[list[str], RunResult]:
    """Run to the end and return the streamed pieces and the result."""
    pieces: list[str] = []
    result = model.run(RunRequest(prompt=prompt, **kwargs), pieces.append).result()  # type: ignore[arg-type]
    return pieces, result


def last_run(runtime: RuntimeLibrary, model: RKLLMModel) -> dict[str, object]:
    """The simulator's record of the model's last run."""
    function = runtime.cdll.rkllm_sim_last_run
    function.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
    buffer = ctypes.create_string_buffer(65536)
    function(model._handle, buffer, len(buffer))
    result: dict[str, object] = json.loads(buffer.value.decode())
    return result


def test_streams_reply_in_order(
    write_model: ModelWriter, open_model: Callable[..., RKLLMModel]
) -> None:
    """The reply arrives piece by piece, in order, with perf stats at the end."""
    reply = "The kitchen light is on and the door is locked."
    model = open_model(write_model(replies=(f"default => {reply}",)))
    pieces, result = run(model, "status?")
    assert len(pieces) > 5
    assert "".join(pieces) == reply
    assert result.perf is not None
    assert result.perf.prefill_tokens > 0
    assert result.perf.generate_tokens == len(pieces)
    assert model.last_perf == result.perf
    assert not result.aborted


def test_split_utf8_is_reassembled(
    write_model: ModelWriter, open_model: Callable[..., RKLLMModel]
) -> None:
    """Multi-byte characters split across callbacks (RKLLM_RUN_WAITING) come out whole."""
    reply = "Grüße aus der Küche 🙂 – 25 °C"
    model = open_model(write_model(replies=(f"default => {reply}",)))
    pieces, _ = run(model, "hallo")
    assert "".join(pieces) == reply
    assert all("\ufffd" not in piece for piece in pieces)


def test_null_text_is_ignored(
    write_model: ModelWriter, open_model: Callable[..., RKLLMModel]
) -> None:
    """A callback with a NULL text does not break the stream."""
    model = open_model(
        write_model(replies=("default => Fine.",), extra=("emit_null_text 1",))
    )
    pieces, _ = run(model, "hi")
    assert "".join(pieces) == "Fine."


def test_null_result_is_harmless(
    write_model: ModelWriter,
    open_model: Callable[..., RKLLMModel],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A callback with a NULL RKLLMResult* neither raises nor stops the run."""
    model = open_model(
        write_model(replies=("default => Fine.",), extra=("emit_null_result 1",))
    )
    pieces, result = run(model, "hi")
    assert "".join(pieces) == "Fine."
    assert result.perf is not None
    assert "Error in the RKLLM result callback" not in caplog.text


def test_waiting_text_is_not_emitted(
    write_model: ModelWriter,
    open_model: Callable[..., RKLLMModel],
    runtime: RuntimeLibrary,
) -> None:
    """WAITING carries part of a character the next NORMAL repeats whole: said once."""
    model = open_model(write_model(replies=("default => é🙂",)))
    pieces, result = run(model, "hi")
    assert pieces == ["é", "🙂"]
    assert result.perf is not None
    assert result.perf.generate_tokens == 2
    assert last_run(runtime, model)["reply"] == "é🙂"


def test_kv_cache_size_failure_does_not_fail_the_run(
    write_model: ModelWriter, open_model: Callable[..., RKLLMModel]
) -> None:
    """rkllm_get_kv_cache_size has no documented return value: -1 means unknown."""
    model = open_model(write_model(extra=("kv_cache_size_error 1",)))
    pieces, result = run(model, "hello", keep_history=True)
    assert "".join(pieces) == "Hello from the simulator."
    assert result.kv_cache_size is None


def test_token_limit_is_not_a_pause_on_13(
    write_model: ModelWriter,
    open_model: Callable[..., RKLLMModel],
    runtime: RuntimeLibrary,
) -> None:
    """1.3 stops at the per-run limit itself; only 1.2 has to pause the run."""
    long_reply = " ".join(f"word{i}" for i in range(40))
    model = open_model(write_model(replies=(f"default => {long_reply}",)))
    pieces, result = run(model, "talk", max_new_tokens=3)
    assert len(pieces) == 3
    assert result.stopped_at_limit
    expected = "max_new_tokens" if runtime.layout.has_sampling_params else "paused"
    assert last_run(runtime, model)["status"] == expected


def test_context_limit_read_from_the_runtime_log(
    write_model: ModelWriter,
    open_model: Callable[..., RKLLMModel],
    runtime: RuntimeLibrary,
) -> None:
    """The model's limit is known after init; a context above it is named as such."""
    path = write_model(max_context_limit=2048)
    model = open_model(path, max_context_len=1024)
    assert model.context_limit == 2048
    too_long = RKLLMModel(runtime, "too_long")
    try:
        with pytest.raises(ModelInitError, match="above the model's limit of 2048"):
            too_long.init(ModelParams(model_path=path, max_context_len=4096)).result()
        assert too_long.context_limit == 2048
    finally:
        too_long.close()


def test_tool_call_and_thinking_intact(
    write_model: ModelWriter, open_model: Callable[..., RKLLMModel]
) -> None:
    """Tool-call and think markup reaches the consumer unchanged; thinking follows the flag."""
    call = '<tool_call>{"name": "HassTurnOn", "arguments": {"name": "kitchen"}}</tool_call>'
    model = open_model(
        write_model(
            replies=(
                "reply user turn on the {name} => <think>Light wanted.</think>"
                + call.replace("kitchen", "{name}"),
            )
        )
    )
    pieces, _ = run(model, "turn on the kitchen", enable_thinking=True)
    assert "".join(pieces) == "<think>Light wanted.</think>" + call
    pieces, _ = run(model, "turn on the kitchen", enable_thinking=False)
    assert "".join(pieces) == call


def test_runtime_error_raises(
    write_model: ModelWriter, open_model: Callable[..., RKLLMModel]
) -> None:
    """RKLLM_RUN_ERROR mid-stream raises RunError; the model stays usable."""
    model = open_model(
        write_model(
            replies=("default => one two three four five six",),
            extra=("error_at_token 2",),
        )
    )
    pieces: list[str] = []
    with pytest.raises(RunError, match="error while generating") as err:
        model.run(RunRequest(prompt="go"), pieces.append).result()
    assert err.value.code != 0
    assert 0 < len(pieces) <= 2
    with pytest.raises(RunError):
        run(model, "again")


def test_init_errors(
    write_model: ModelWriter, runtime: RuntimeLibrary, tmp_path: Path
) -> None:
    """Bad magic, missing file and a context above the model's limit fail init clearly."""
    bad = tmp_path / "bad.rkllm"
    bad.write_text("GGUF nonsense\n")
    missing = tmp_path / "missing.rkllm"
    cases = [
        (ModelParams(model_path=bad), "rkllm_init failed"),
        (ModelParams(model_path=missing), f"the model file {missing} is gone"),
        (
            ModelParams(
                model_path=write_model(max_context_limit=1024), max_context_len=4096
            ),
            "rkllm_init failed",
        ),
        (
            ModelParams(model_path=write_model("Broken", extra=("init_error 1",))),
            "rkllm_init failed",
        ),
    ]
    for params, message in cases:
        model = RKLLMModel(runtime, "broken")
        with pytest.raises(ModelInitError, match=re.escape(message)):
            model.init(params).result()
        model.close()


def test_abort_from_another_thread(
    write_model: ModelWriter, open_model: Callable[..., RKLLMModel]
) -> None:
    """Abort ends a long generation within a token; the model is usable at once."""
    long_reply = " ".join(f"word{i}" for i in range(400))
    model = open_model(
        write_model(replies=(f"default => {long_reply}",), decode_ms_per_token=5)
    )
    first = threading.Event()
    pieces: list[str] = []

    def sink(text: str) -> None:
        pieces.append(text)
        first.set()

    future = model.run(RunRequest(prompt="talk"), sink)
    assert first.wait(10)
    model.abort()
    result = future.result(timeout=10)
    assert result.aborted
    assert len(pieces) < 100
    model.abort()  # nothing running: harmless
    _, again = run(model, "talk", max_new_tokens=3)
    assert again.stopped_at_limit
    assert not again.aborted


def test_close_joins_worker_thread(
    write_model: ModelWriter, runtime: RuntimeLibrary
) -> None:
    """Close destroys the handle and no thread outlives the model."""
    model = RKLLMModel(runtime, "joined")
    model.init(ModelParams(model_path=write_model())).result()
    run(model, "hi")
    assert any(t.name.startswith("rkllm-joined") for t in threading.enumerate())
    model.close()
    assert not any(t.name.startswith("rkllm-joined") for t in threading.enumerate())
    assert model.closed
    model.close()  # idempotent


def test_prompt_cache_save_load_reuse(
    write_model: ModelWriter,
    open_model: Callable[..., RKLLMModel],
    runtime: RuntimeLibrary,
    tmp_path: Path,
) -> None:
    """A saved system-prefix cache, loaded in a new handle, skips the prefix prefill."""
    path = write_model()
    cache = tmp_path / "system.bin"
    builder = open_model(path)
    builder.set_function_tools(SYSTEM, "[]").result()
    _, built = run(builder, "", save_prompt_cache=cache, max_new_tokens=1)
    assert cache.stat().st_size > 0
    assert built.perf is not None

    cold = open_model(path)
    cold.set_function_tools(SYSTEM, "[]").result()
    _, cold_result = run(cold, "what time is it")

    warm = open_model(path)
    warm.set_function_tools(SYSTEM, "[]").result()
    warm.load_prompt_cache(cache).result()
    _, warm_result = run(warm, "what time is it")
    assert cold_result.perf is not None
    assert warm_result.perf is not None
    record = last_run(runtime, warm)
    assert (
        warm_result.perf.prefill_tokens
        == cold_result.perf.prefill_tokens - record["reused_tokens"]
    )
    # Everything up to the user's text was reused: only the turn itself is computed.
    assert warm_result.perf.prefill_tokens < 25 < built.perf.prefill_tokens

    warm.release_prompt_cache().result()
    _, released = run(warm, "what time is it")
    assert released.perf == cold_result.perf or (
        released.perf is not None
        and released.perf.prefill_tokens == cold_result.perf.prefill_tokens
    )


def test_bad_prompt_cache_file(
    open_model: Callable[..., RKLLMModel], write_model: ModelWriter, tmp_path: Path
) -> None:
    """A foreign or missing cache file is refused by the runtime."""
    model = open_model(write_model())
    foreign = tmp_path / "foreign.bin"
    foreign.write_bytes(b"\x00" * 64)
    for path in (foreign, tmp_path / "missing.bin"):
        with pytest.raises(RunError, match="rkllm_load_prompt_cache"):
            model.load_prompt_cache(path).result()


def test_keep_history_and_clear_kv(
    write_model: ModelWriter,
    open_model: Callable[..., RKLLMModel],
    runtime: RuntimeLibrary,
) -> None:
    """With keep_history only the new turn is prefilled; clearing the KV resets that."""
    model = open_model(write_model())
    model.set_function_tools(SYSTEM, "[]").result()
    _, first = run(model, "hello there", keep_history=True)
    kv_after_first = first.kv_cache_size
    assert kv_after_first is not None and kv_after_first > 0
    _, second = run(model, "hello there", keep_history=True)
    assert first.perf is not None
    assert second.perf is not None
    assert second.perf.prefill_tokens < first.perf.prefill_tokens / 4
    assert second.kv_cache_size is not None
    assert second.kv_cache_size > kv_after_first
    assert last_run(runtime, model)["reused_tokens"] == kv_after_first

    model.clear_kv_cache(keep_system_prompt=True).result()
    _, third = run(model, "hello there", keep_history=True)
    assert third.perf is not None
    assert third.perf.prefill_tokens == second.perf.prefill_tokens

    model.clear_kv_cache(keep_system_prompt=False).result()
    _, fourth = run(model, "hello there", keep_history=True)
    assert fourth.perf is not None
    assert fourth.perf.prefill_tokens == first.perf.prefill_tokens


def test_run_can_clear_the_kv_first(
    write_model: ModelWriter, open_model: Callable[..., RKLLMModel]
) -> None:
    """clear_kv_first clears in the same call, as clear_kv_cache would before it."""
    model = open_model(write_model())
    model.set_function_tools(SYSTEM, "[]").result()
    _, first = run(model, "hello there", keep_history=True)
    _, again = run(model, "hello there", keep_history=True, clear_kv_first="to_system")
    assert again.kv_cache_size == first.kv_cache_size
    _, fresh = run(model, "hello there", keep_history=True, clear_kv_first="all")
    assert first.perf is not None and fresh.perf is not None
    assert fresh.perf.prefill_tokens == first.perf.prefill_tokens


def test_per_run_sampling(
    write_model: ModelWriter,
    open_model: Callable[..., RKLLMModel],
    runtime: RuntimeLibrary,
) -> None:
    """Family 1.3 passes per-run sampling; 1.2 keeps the init sampling."""
    model = open_model(write_model(), sampling=Sampling(temperature=0.5))
    run(model, "hi", sampling=Sampling(temperature=0.2))
    temperature = last_run(runtime, model)["temperature"]
    assert isinstance(temperature, float)
    expected = 0.2 if runtime.layout.has_sampling_params else 0.5
    assert temperature == pytest.approx(expected)


def test_context_overflow_is_an_error(
    write_model: ModelWriter, open_model: Callable[..., RKLLMModel]
) -> None:
    """A prompt beyond max_context_len fails the run instead of crashing."""
    model = open_model(write_model(), max_context_len=64)
    with pytest.raises(RunError):
        run(model, " ".join(["word"] * 200))
    _, ok = run(model, "hi")
    assert ok.perf is not None
