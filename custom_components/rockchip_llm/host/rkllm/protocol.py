"""Messages between Home Assistant and a runtime worker process: JSON lines.

Requests go down as ``{"id": n, "op": name, "args": {...}}``; the worker answers
``{"id": n, "ok": value}`` or ``{"id": n, "error": {...}}`` and streams a run's text
as ``{"id": n, "text": "..."}`` before its answer. JSON, not pickle: nothing a
crashed or confused worker writes can run code in Home Assistant.
"""

from collections.abc import Mapping
from dataclasses import is_dataclass
import json
from pathlib import Path
from typing import Any, Final, TypeAlias

from .errors import (
    ModelClosedError,
    ModelFileMissing,
    ModelInitError,
    RKLLMError,
    RunError,
)
from .runtime import ModelParams, PerfStats, RunRequest, RunResult, Sampling

Message: TypeAlias = dict[str, Any]


def encode(message: Message) -> bytes:
    """Serialise one message as a line (UTF-8; a lone surrogate as a JSON escape)."""
    text = json.dumps(message, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode() + b"\n"
    except UnicodeEncodeError:  # a lone surrogate (JSON allows it, UTF-8 does not)
        return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> Message:
    """Parse one line; raise ValueError when it is not a message object."""
    message = json.loads(line)
    if isinstance(message, dict):
        return message
    raise ValueError(f"not a message: {line[:200]!r}")


def _wire(value: Any) -> Any:
    """Return paths as strings and records as objects, for JSON."""
    if isinstance(value, Path):
        return str(value)
    if is_dataclass(value) and not isinstance(value, type):
        return _fields(value)
    return value


def _fields(record: Any) -> Message:
    """Return a record's fields as JSON data (dataclasses.asdict without its copying).

    The records hold numbers, text, paths and records: nothing to copy, and
    asdict's copying is most of a short run's conversion time.
    """
    return {name: _wire(getattr(record, name)) for name in record.__dataclass_fields__}


def params_to_wire(params: ModelParams) -> Message:
    """ModelParams as JSON data."""
    return _fields(params)


def params_from_wire(data: Mapping[str, Any]) -> ModelParams:
    """Rebuild ModelParams."""
    return ModelParams(
        **{
            **data,
            "model_path": Path(data["model_path"]),
            "sampling": Sampling(**data["sampling"]),
        }
    )


def request_to_wire(request: RunRequest) -> Message:
    """RunRequest as JSON data."""
    return _fields(request)


def request_from_wire(data: Mapping[str, Any]) -> RunRequest:
    """Rebuild a RunRequest."""
    cache = data.get("save_prompt_cache")
    sampling = data.get("sampling")
    return RunRequest(
        **{
            **data,
            "save_prompt_cache": Path(cache) if cache is not None else None,
            "sampling": Sampling(**sampling) if sampling is not None else None,
        }
    )


def result_to_wire(result: RunResult) -> Message:
    """RunResult as JSON data."""
    return _fields(result)


def result_from_wire(data: Mapping[str, Any]) -> RunResult:
    """Rebuild a RunResult."""
    perf = data.get("perf")
    return RunResult(
        **{**data, "perf": PerfStats(**perf) if perf is not None else None}
    )


_ERRORS: Final[Mapping[str, type[RKLLMError]]] = {
    cls.__name__: cls
    for cls in (RKLLMError, ModelInitError, ModelFileMissing, ModelClosedError)
}


def error_to_wire(err: BaseException) -> Message:
    """Describe an exception raised in the worker."""
    if isinstance(err, RunError):
        return {"kind": "RunError", "message": str(err), "code": err.code}
    if isinstance(err, RKLLMError):
        placeholders = {k: v for k, v in err.placeholders.items() if k != "error"}
        kind = type(err).__name__ if type(err).__name__ in _ERRORS else "RKLLMError"
        return {"kind": kind, "message": str(err), "placeholders": placeholders}
    return {"kind": "RKLLMError", "message": f"{type(err).__name__}: {err}"}


def error_from_wire(data: Mapping[str, Any]) -> RKLLMError:
    """Rebuild the exception the worker described."""
    message = str(data.get("message", "unknown error in the runtime process"))
    if data.get("kind") == "RunError":
        return RunError(message, int(data.get("code", -1)))
    placeholders = data.get("placeholders")
    error_class = _ERRORS.get(str(data.get("kind")), RKLLMError)
    return error_class(
        message,
        **(
            {str(k): str(v) for k, v in placeholders.items()}
            if isinstance(placeholders, dict)
            else {}
        ),
    )
