"""What crosses the link between Home Assistant and a runtime host: JSON lines.

A request is ``{"id": n, "op": name, "args": {...}}``; the host answers
``{"id": n, "ok": value}`` or ``{"id": n, "error": {...}}``, streams a run's text
as ``{"id": n, "text": "..."}`` before its answer, and tells of a worker that died
with ``{"event": "worker_died", "worker": w, "error": {...}}``. JSON, never
pickle; every line is bounded by MAX_MESSAGE_BYTES. Both sides use this module, so
an error raised on the host is raised again, with its class and placeholders, in
Home Assistant.
"""

from collections.abc import Mapping
import errno as errno_module
from pathlib import Path
from typing import Any, Final, TypeAlias

from .model_files import ModelInfo, ModelScan, ModelsDirError
from .prompt_cache import (
    CacheBudgetExceeded,
    CacheContentMismatch,
    CacheDeleteError,
    CacheEntry,
    CacheError,
    CacheMetadata,
    CacheTooLong,
    CacheWriteError,
    CorruptCache,
    InvalidCacheName,
    InvalidModelName,
)
from .rkllm import errors as rkllm_errors
from .rkllm.errors import LibraryCopyFailed, RKLLMError, RunError
from .rkllm.protocol import decode, encode

Message: TypeAlias = dict[str, Any]

MAX_MESSAGE_BYTES: Final = 8 * 1024 * 1024
"""The longest line either side accepts (a prompt of a large context fits)."""

__all__ = ["MAX_MESSAGE_BYTES", "decode", "encode"]


class HostError(RKLLMError):
    """The runtime host refused a request or cannot be used."""

    translation_key = "host_error"


class HostUnreachable(HostError):
    """No runtime host answers at the address."""

    translation_key = "host_unreachable"


class HostPairingRefused(HostError):
    """The host did not accept the pairing key (or did not prove it holds it)."""

    translation_key = "host_pairing_refused"


class HostIdentityChanged(HostError):
    """The host at the address shows another certificate than the one paired."""

    translation_key = "host_identity_changed"


class HostLost(rkllm_errors.WorkerDiedError):
    """The link to the runtime host ended while something waited for it."""

    translation_key = "host_lost"


class HostBusy(HostError):
    """The host serves another Home Assistant."""

    translation_key = "host_busy"


class HostVersionMismatch(HostError):
    """The host and the integration are of different versions."""

    translation_key = "host_version_mismatch"


class BadRequest(HostError):
    """A request the host does not understand or does not allow."""

    translation_key = "host_bad_request"


def _error_classes() -> dict[str, type[Exception]]:
    classes: list[type[Exception]] = [
        value
        for value in vars(rkllm_errors).values()
        if isinstance(value, type) and issubclass(value, RKLLMError)
    ]
    classes += [
        CacheError,
        CacheWriteError,
        CacheDeleteError,
        CacheBudgetExceeded,
        CacheTooLong,
        CorruptCache,
        CacheContentMismatch,
        InvalidCacheName,
        InvalidModelName,
        ModelsDirError,
        HostError,
        HostUnreachable,
        HostPairingRefused,
        HostIdentityChanged,
        HostLost,
        HostBusy,
        HostVersionMismatch,
        BadRequest,
    ]
    return {cls.__name__: cls for cls in classes}


_ERROR_CLASSES: Final = _error_classes()


def error_to_wire(err: BaseException) -> Message:
    """Describe an exception so that error_from_wire raises it again."""
    kind = type(err).__name__
    if kind not in _ERROR_CLASSES:
        return {"kind": "RKLLMError", "message": f"{kind}: {err}"}
    data: Message = {"kind": kind, "message": str(err)}
    if isinstance(err, RKLLMError):  # "error" is its message, added back
        data["placeholders"] = {
            key: value for key, value in err.placeholders.items() if key != "error"
        }
    if isinstance(err, CacheError):
        data["placeholders"] = dict(err.placeholders)
    if isinstance(err, RunError):
        data["code"] = err.code
    if isinstance(err, CacheWriteError):
        data["errno"] = err.errno
    if isinstance(err, CacheBudgetExceeded):
        data["needed_bytes"] = err.needed_bytes
    if isinstance(err, LibraryCopyFailed):
        data["errno"] = err.os_error.errno
    if isinstance(err, ModelsDirError):
        data["reason"] = err.reason
        data["path"] = str(err.path)
    return data


def error_from_wire(data: Any) -> Exception:
    """Rebuild the exception the other side described."""
    if not isinstance(data, Mapping):
        return RKLLMError(f"unreadable error from the runtime host: {data!r:.200}")
    message = str(data.get("message", "unknown error of the runtime host"))
    cls = _ERROR_CLASSES.get(str(data.get("kind")), RKLLMError)
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    raw = data.get("placeholders")
    placeholders = (
        {str(key): str(value) for key, value in raw.items()}
        if isinstance(raw, Mapping)
        else {}
    )
    number = data.get("errno")
    number = number if isinstance(number, int) else None
    if isinstance(err, RKLLMError):
        err.placeholders = {"error": message, **placeholders}
    if isinstance(err, CacheError):
        err.placeholders = placeholders
    if isinstance(err, RunError):
        err.code = int(data.get("code", -1))
    if isinstance(err, CacheWriteError):
        err.errno = number
    if isinstance(err, CacheBudgetExceeded):
        needed = data.get("needed_bytes")
        err.needed_bytes = needed if isinstance(needed, int) else 0
    if isinstance(err, LibraryCopyFailed):
        err.os_error = OSError(
            number or errno_module.EIO,
            placeholders.get("reason", message),
        )
    if isinstance(err, ModelsDirError):
        err.reason = str(data.get("reason", "models_dir_unreadable"))
        err.path = Path(str(data.get("path", "")))
    return err


def scan_to_wire(scan: ModelScan) -> Message:
    """Return a model scan as JSON data."""
    return {
        "models": [
            {
                "name": info.name,
                "path": str(info.path),
                "size_bytes": info.size_bytes,
                "ignored_files": list(info.ignored_files),
            }
            for info in scan.models.values()
        ],
        "loose_files": list(scan.loose_files),
        "unreadable": list(scan.unreadable),
    }


def scan_from_wire(data: Mapping[str, Any]) -> ModelScan:
    """Rebuild a model scan."""
    models = [
        ModelInfo(
            name=str(item["name"]),
            path=Path(str(item["path"])),
            size_bytes=int(item["size_bytes"]),
            ignored_files=tuple(str(name) for name in item["ignored_files"]),
        )
        for item in data["models"]
    ]
    return ModelScan(
        {info.name: info for info in models},
        tuple(str(name) for name in data["loose_files"]),
        tuple(str(name) for name in data["unreadable"]),
    )


def entry_to_wire(entry: CacheEntry) -> Message:
    """Return a cache entry as JSON data."""
    return {
        "metadata": entry.metadata.to_json() if entry.metadata is not None else None,
        "model": entry.model,
        "name": entry.name,
        "bin_path": str(entry.bin_path),
        "json_path": str(entry.json_path),
        "problem": entry.problem,
    }


def entry_from_wire(data: Mapping[str, Any]) -> CacheEntry:
    """Rebuild a cache entry (its metadata parsed as strictly as from disk)."""
    metadata = data.get("metadata")
    return CacheEntry(
        metadata=CacheMetadata.from_json(metadata) if metadata is not None else None,
        model=str(data["model"]),
        name=str(data["name"]),
        bin_path=Path(str(data["bin_path"])),
        json_path=Path(str(data["json_path"])),
        problem=None if data.get("problem") is None else str(data["problem"]),
    )
