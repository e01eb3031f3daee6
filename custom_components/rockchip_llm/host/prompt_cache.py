"""The prompt-cache store: ``<root>/<model>/<name>.bin`` plus ``<name>.json``.

The RKLLM runtime writes a prompt cache (the ``.bin``) to a staging path given by
the store; ``commit`` installs it together with our JSON metadata. Pure Python,
no Home Assistant imports. Every method here blocks (file system I/O): call it
in an executor.
"""

from collections.abc import Iterator, Mapping
import contextlib
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta
import errno
import hashlib
import json
import logging
import math
import os
from pathlib import Path
import re
import secrets
import stat
import tempfile
import time
from typing import Any, Self, TypeAlias

from .rkllm.aside import move_aside, prune

_LOGGER = logging.getLogger(__name__)

CACHE_NAME_PATTERN = re.compile(r"^[a-z0-9_]{1,64}$")
METADATA_VERSION = 2
"""2 adds ``content_sha256``; metadata of version 1 is read, as a cache to rebuild."""
CONTENT_HASH = "sha256"
"""The hash of a ``.bin``'s content in its metadata (hardware-accelerated on ARMv8)."""

_BIN = ".bin"
_JSON = ".json"
_TEMP_PATTERN = re.compile(r"\.[a-z0-9_]{1,64}\.(?:bin|json)\.tmp-[0-9a-f]{16}")
_SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
_MAX_METADATA_BYTES = 1024 * 1024


class CacheError(Exception):
    """Base class of prompt-cache errors: a translation key and placeholders."""

    translation_key: str = "cache_error"

    def __init__(self, message: str, **placeholders: str) -> None:
        """Store the English message and the translation placeholders."""
        super().__init__(message)
        self.placeholders: dict[str, str] = placeholders


class InvalidCacheName(CacheError):
    """A cache name is not a slug, or its file resolves outside the root."""

    translation_key = "invalid_cache_name"


class InvalidModelName(CacheError):
    """A model name is not a single safe path component, or escapes the root."""

    translation_key = "invalid_model_name"


class CacheWriteError(CacheError):
    """Writing or deleting a cache failed; the previous pair is kept."""

    translation_key = "cache_write_failed"

    def __init__(self, message: str, err: OSError, folder: Path) -> None:
        """Keep the OS error number and describe the folder and its free space."""
        super().__init__(
            message, error=str(err), path=str(folder), free=_free_text(folder)
        )
        self.errno = err.errno

    @property
    def disk_problem(self) -> str | None:
        """Return the translation key of the disk's fault, None if not the disk's."""
        if self.errno in _FULL_ERRNOS:
            return "cache_disk_full"
        if self.errno in _READ_ONLY_ERRNOS:
            return "cache_dir_not_writable"
        return None


_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_READ_ONLY_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})
_PROBE_BYTES = 4096
_LOW_FREE_BYTES = 16 * 1024 * 1024
"""Less free space than this after a failed save counts as a full disk."""


def free_bytes(folder: Path) -> int | None:
    """Return the space left for unprivileged writes on folder's disk, if known."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _megabytes(size: int) -> str:
    """Return a size for people, e.g. "12.5 MB"."""
    return f"{size / 1_000_000:.1f} MB"


def _free_text(folder: Path) -> str:
    """Return folder's free space for people, e.g. "12.5 MB"."""
    free = free_bytes(folder)
    return "unknown" if free is None else _megabytes(free)


class CacheTooLong(CacheError):
    """The runtime failed to build a cache whose prompt may not fit the context."""

    translation_key = "cache_prompt_too_long"


class CacheBudgetExceeded(CacheWriteError):
    """A cache would not fit the folder's budget, even without automatic caches."""

    translation_key = "cache_budget_exceeded"

    def __init__(
        self, message: str, needed_bytes: int = 0, **placeholders: str
    ) -> None:
        """Store the message and placeholders (no OS error: nothing was written)."""
        CacheError.__init__(self, message, **placeholders)
        self.errno = None
        self.needed_bytes = needed_bytes
        """The bytes the refused cache needs (to check again later)."""

    @property
    def disk_problem(self) -> str | None:
        """The budget is full: a problem of its own, with its own repair."""
        return self.translation_key


class CorruptCache(CacheError):
    """Cache metadata is unreadable, malformed or foreign."""

    translation_key = "cache_corrupt"


class CacheContentMismatch(CorruptCache):
    """A ``.bin`` does not hold what its metadata describes (substituted, damaged)."""

    translation_key = "cache_content_mismatch"


class CacheDeleteError(CacheWriteError):
    """Deleting a cache's files failed; they are all still there or partly gone."""

    translation_key = "cache_delete_failed"

    def __init__(
        self, message: str, err: OSError, folder: Path, model: str, name: str
    ) -> None:
        """Keep the OS error, the folder and the cache it was about."""
        super().__init__(message, err, folder)
        self.placeholders |= {
            "model": model,
            "name": name,
            "reason": err.strerror or str(err),
        }


def _corrupt(message: str) -> CorruptCache:
    """Build a CorruptCache with the message as its placeholder."""
    return CorruptCache(message, error=message)


def _str(data: Mapping[str, Any], key: str) -> str:
    """Return a string field."""
    value = data.get(key)
    if not isinstance(value, str):
        raise _corrupt(f"field {key!r} must be a string")
    return value


def _int(data: Mapping[str, Any], key: str) -> int:
    """Return a non-negative integer field."""
    value = data.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _corrupt(f"field {key!r} must be a non-negative integer")
    return value


def _float(data: Mapping[str, Any], key: str) -> float:
    """Return a non-negative finite number field."""
    value = data.get(key)
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value < 0
    ):
        raise _corrupt(f"field {key!r} must be a non-negative number")
    return float(value)


def _dict(data: Mapping[str, Any], key: str, kinds: tuple[type, ...]) -> dict[str, Any]:
    """Return an object field whose values all have one of ``kinds``."""
    value = data.get(key)
    if not isinstance(value, dict) or not all(
        isinstance(item, kinds) and (bool in kinds or not isinstance(item, bool))
        for item in value.values()
    ):
        raise _corrupt(f"field {key!r} must be an object of {kinds}")
    return dict(value)


def _sha256(data: Mapping[str, Any], key: str) -> str:
    """Return a hex SHA-256 field."""
    value = _str(data, key)
    if not _SHA256_PATTERN.fullmatch(value):
        raise _corrupt(f"field {key!r} must be a hex SHA-256")
    return value


def _utc_timestamp(data: Mapping[str, Any], key: str) -> str:
    """Return an ISO 8601 UTC timestamp field."""
    value = _str(data, key)
    try:
        offset = datetime.fromisoformat(value).utcoffset()
    except ValueError:
        offset = None
    if offset != timedelta(0):
        raise _corrupt(f"field {key!r} must be an ISO 8601 UTC timestamp")
    return value


@dataclass(frozen=True, slots=True)
class CacheMetadata:
    """What a cache was built from; stored next to it as JSON."""

    name: str
    model: str
    created_at: str
    prompt_sha256: str
    prompt_length: int
    tokens: int
    size_bytes: int
    build_ms: float
    source: str
    model_fingerprint: dict[str, int | str]
    runtime_family: str
    runtime_version: str
    context: dict[str, int | float | bool | str]
    content_sha256: str | None = None
    """The SHA-256 of the ``.bin`` (the store sets it when it commits the file)."""
    version: int = METADATA_VERSION

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> Self:
        """Parse metadata strictly; raise CorruptCache on anything unexpected."""
        if not isinstance(data, dict):
            raise _corrupt("metadata must be a JSON object")
        version = _int(data, "version")
        if version not in (1, METADATA_VERSION):
            raise _corrupt(f"unsupported metadata version {version}")
        content = data.get("content_sha256")
        return cls(
            name=_str(data, "name"),
            model=_str(data, "model"),
            created_at=_utc_timestamp(data, "created_at"),
            prompt_sha256=_sha256(data, "prompt_sha256"),
            prompt_length=_int(data, "prompt_length"),
            tokens=_int(data, "tokens"),
            size_bytes=_int(data, "size_bytes"),
            build_ms=_float(data, "build_ms"),
            source=_str(data, "source"),
            model_fingerprint=_dict(data, "model_fingerprint", (int, str)),
            runtime_family=_str(data, "runtime_family"),
            runtime_version=_str(data, "runtime_version"),
            context=_dict(data, "context", (int, float, bool, str)),
            content_sha256=None if content is None else _sha256(data, "content_sha256"),
            version=version,
        )


@dataclass(frozen=True, slots=True)
class CacheExpectation:
    """What a usable cache must match now."""

    prompt_sha256: str
    model_fingerprint: dict[str, int | str]
    runtime_family: str
    runtime_version: str
    context: dict[str, int | float | bool | str]


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """A cache on disk; ``metadata`` is None when its JSON is missing or corrupt.

    ``problem`` says why the entry is unusable whatever is expected:
    "metadata_missing", "metadata_corrupt", "not_a_file" (a symlink, folder or
    other non-regular file in the place of one of its files), "name_mismatch",
    "bin_missing", "size_mismatch", "no_content_hash" (built by an earlier
    version) or "content_mismatch" (the ``.bin`` failed its content check).
    """

    metadata: CacheMetadata | None
    model: str
    name: str
    bin_path: Path
    json_path: Path
    problem: str | None

    def invalid_reason(self, expected: CacheExpectation) -> str | None:
        """Return why this cache cannot be used now, None when it can."""
        metadata = self.metadata
        if self.problem is not None or metadata is None:
            return self.problem or "metadata_missing"
        checks = (
            ("prompt_changed", metadata.prompt_sha256 == expected.prompt_sha256),
            ("model_changed", metadata.model_fingerprint == expected.model_fingerprint),
            (
                "runtime_changed",
                metadata.runtime_family == expected.runtime_family
                and metadata.runtime_version == expected.runtime_version,
            ),
            ("context_changed", metadata.context == expected.context),
        )
        return next((reason for reason, matches in checks if not matches), None)


def prompt_sha256(text: str) -> str:
    """Return the hex SHA-256 of a prompt's UTF-8 text."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _check_cache_name(name: str) -> None:
    """Raise InvalidCacheName unless ``name`` is a slug."""
    if not CACHE_NAME_PATTERN.fullmatch(name):
        raise InvalidCacheName(
            f"Invalid cache name {name!r}: use 1 to 64 of a-z, 0-9 and _", name=name
        )


def _check_model_name(model: str) -> None:
    """Raise InvalidModelName unless ``model`` is one visible path component."""
    if not model or model.startswith(".") or any(c in model for c in "/\\\0"):
        raise InvalidModelName(f"Invalid model name {model!r}", model=model)


def _temp_path(path: Path) -> Path:
    """Return a unique hidden temp path next to ``path``."""
    return path.with_name(f".{path.name}.tmp-{secrets.token_hex(8)}")


def _lstat_mode(path: Path) -> int | None:
    """Return the mode of ``path`` itself (symlinks not followed), None if absent."""
    try:
        return path.lstat().st_mode
    except FileNotFoundError:
        return None


def _is_not_a_file(path: Path) -> bool:
    """Return True when something other than a regular file is at ``path``."""
    try:
        mode = _lstat_mode(path)
    except OSError:
        return True
    return mode is not None and not stat.S_ISREG(mode)


def _file_size(path: Path) -> int | None:
    """Return the size of a regular file (not a symlink), None when there is none."""
    try:
        st = path.lstat()
    except OSError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def _open_regular(path: Path) -> int:
    """Open a regular file for reading: never through a symlink, never blocking.

    A FIFO opened this way does not wait for a writer; it and any other
    non-regular file are refused with OSError.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fd = os.open(path, flags)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    os.set_blocking(fd, True)
    return fd


def _synced_digest(path: Path) -> tuple[int, str]:
    """Flush a staged file to disk; return its size and content hash (empty: an error)."""
    with os.fdopen(_open_regular(path), "rb") as file:
        os.fsync(file.fileno())
        size = os.fstat(file.fileno()).st_size
        if size == 0:
            raise OSError(errno.ENODATA, "the runtime wrote an empty cache", str(path))
        return size, hashlib.file_digest(file, CONTENT_HASH).hexdigest()


def content_digest(path: Path) -> str:
    """Return the content hash of a regular file (never through a symlink)."""
    with os.fdopen(_open_regular(path), "rb") as file:
        return hashlib.file_digest(file, CONTENT_HASH).hexdigest()


_Identity: TypeAlias = tuple[int, int, int, int, int]


def _identity(path: Path) -> _Identity | None:
    """Return what changes with a regular file's content (None: no such file).

    Device, inode, size, modification and status change times: writing a file,
    renaming another over it or setting its times back all change one of them.
    """
    try:
        st = path.lstat()
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _write_synced(path: Path, text: str) -> None:
    """Create ``path`` with ``text`` and flush it to disk."""
    with path.open("x", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())


def _fsync_dir(path: Path) -> None:
    """Persist the renames in a directory, best effort."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _move_out_of_the_way(path: Path) -> bool:
    """Rename a folder, FIFO or other non-file at ``path`` to a visible name.

    Symlinks and regular files are left alone (renaming over them is safe).
    Return True when something was moved; log where it went. Only the newest
    few moved-aside entries of the folder are kept (see rkllm.aside).
    """
    mode = _lstat_mode(path)
    if mode is None or stat.S_ISREG(mode) or stat.S_ISLNK(mode):
        return False
    target = move_aside(path)
    _LOGGER.warning("%s was not a file; moved it aside to %s", path, target)
    return True


def _move_aside(path: Path, backup: Path) -> bool:
    """Rename ``path`` to ``backup``; False when there was nothing to move."""
    try:
        path.replace(backup)
    except FileNotFoundError:
        return False
    return True


def _remove(path: Path) -> None:
    """Delete a file if present; log failures of one that exists.

    A read-only file system refuses to unlink even a name that is not there:
    that is not worth a warning.
    """
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as err:
        try:
            present = _lstat_mode(path) is not None
        except OSError:
            present = True
        if present:
            _LOGGER.warning("Cannot remove %s: %s", path, err)


def _unlink(path: Path) -> bool:
    """Delete a file; False when it did not exist. Other errors propagate."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def _write_probe(folder: Path) -> CacheWriteError | None:
    """Ask the OS whether folder takes a write: a small synced file, then free space."""
    probe = _temp_path(folder / "probe.bin")
    try:
        with probe.open("xb") as file:
            file.write(bytes(_PROBE_BYTES))
            file.flush()
            os.fsync(file.fileno())
    except OSError as err:
        return CacheWriteError(f"Cannot write to {folder}: {err}", err, folder)
    finally:
        _remove(probe)
    free = free_bytes(folder)
    if free is not None and free < _LOW_FREE_BYTES:
        low = OSError(errno.ENOSPC, "almost no space left on the device")
        return CacheWriteError(f"Cannot write to {folder}: {low}", low, folder)
    return None


def _parse_metadata(raw: bytes) -> CacheMetadata:
    """Parse the bytes of a metadata file or raise CorruptCache."""
    if len(raw) > _MAX_METADATA_BYTES:
        raise _corrupt("metadata file is too large")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise _corrupt(f"not JSON: {err}") from err
    return CacheMetadata.from_json(data)


def _read_metadata(path: Path) -> tuple[CacheMetadata | None, str | None]:
    """Return the metadata of a JSON file, or None and the problem."""
    if _is_not_a_file(path):
        _LOGGER.warning("Ignoring cache metadata %s: not a regular file", path)
        return None, "not_a_file"
    try:
        with os.fdopen(_open_regular(path), "rb") as file:
            raw = file.read(_MAX_METADATA_BYTES + 1)
    except FileNotFoundError:
        return None, "metadata_missing"
    except OSError as err:
        _LOGGER.warning("Cannot read cache metadata %s: %s", path, err)
        return None, "metadata_corrupt"
    try:
        metadata = _parse_metadata(raw)
    except CorruptCache as err:
        _LOGGER.warning("Ignoring corrupt cache metadata %s: %s", path, err)
        return None, "metadata_corrupt"
    return metadata, None


def _pair_problem(
    metadata: CacheMetadata, model: str, name: str, bin_size: int | None
) -> str | None:
    """Return what is wrong with valid metadata and its ``.bin``, if anything."""
    if (metadata.model, metadata.name) != (model, name):
        return "name_mismatch"
    if bin_size is None:
        return "bin_missing"
    if bin_size != metadata.size_bytes:
        return "size_mismatch"
    if metadata.content_sha256 is None:
        return "no_content_hash"
    return None


def _restore(backup: Path, path: Path) -> None:
    """Move the previous ``.bin`` back; log when that fails (the backup stays)."""
    try:
        backup.replace(path)
    except OSError:
        _LOGGER.exception("Cannot restore %s from %s", path, backup)


def _list_dir(path: Path) -> list[Path]:
    """Return the entries of a directory; log and return none on errors."""
    try:
        return sorted(path.iterdir())
    except FileNotFoundError:
        return []
    except OSError as err:
        _LOGGER.warning("Cannot list %s: %s", path, err)
        return []


def _visible_names(path: Path) -> list[str]:
    """Return the names in ``path`` that can be model names."""
    names = []
    for entry in _list_dir(path):
        try:
            _check_model_name(entry.name)
        except InvalidModelName:
            _LOGGER.debug("Skipping %s: not a model folder name", entry)
            continue
        names.append(entry.name)
    return names


def _stamp(path: Path) -> None:
    """Set a file's times to now, finer than the file system's own clock."""
    now = time.time_ns()
    try:
        os.utime(path, ns=(now, now), follow_symlinks=False)
    except OSError as err:
        _LOGGER.debug("Cannot set the times of %s: %s", path, err)


def _last_used(entry: CacheEntry) -> int:
    """When a cache was last used or built (its ``.bin``'s mtime), 0 if unknown."""
    try:
        return entry.bin_path.lstat().st_mtime_ns
    except OSError:
        return 0


def _is_cache_file(path: Path) -> bool:
    """Return True for ``<cache name>.bin`` or ``.json``; log the others."""
    if path.suffix in (_BIN, _JSON) and CACHE_NAME_PATTERN.fullmatch(path.stem):
        return True
    _LOGGER.debug("Skipping %s: not a cache file name", path)
    return False


class PromptCacheStore:
    """Prompt caches and their metadata under one root directory."""

    def __init__(self, root: Path, budget_bytes: int | None = None) -> None:
        """Use ``root`` (created on demand) as the cache root.

        ``budget_bytes`` limits the total size of the caches of every model in it.
        """
        self.root = root
        self.budget_bytes = budget_bytes
        self._verified: dict[Path, tuple[_Identity, str]] = {}
        """``.bin`` files whose content was hashed: their identity then and hash."""
        self._mismatched: dict[Path, _Identity] = {}
        """``.bin`` files that failed their content check, as they were then."""

    def writable(self) -> bool:
        """Create the root if needed; return True when a file can be written there."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.root):
                pass
        except OSError:
            return False
        return True

    def disk_bytes(self, entry: CacheEntry) -> int:
        """Return the bytes a cache's files take (what counts against the budget)."""
        return sum(_file_size(path) or 0 for path in (entry.bin_path, entry.json_path))

    def expected_bytes(self, model: str, prompt_length: int) -> int:
        """Estimate the size of a model's cache of a prompt from its existing caches.

        Tokens × bytes per token, both measured per prompt character on the
        model's caches (the largest ratio, to be safe); 0 with none to measure.
        """
        ratios = [
            entry.metadata.size_bytes / entry.metadata.prompt_length
            for entry in self.list(model)
            if entry.metadata is not None
            and entry.problem is None
            and entry.metadata.prompt_length > 0
        ]
        return math.ceil(prompt_length * max(ratios, default=0))

    def make_room(
        self, model: str, name: str, prompt_length: int, evictable: str
    ) -> list[CacheEntry]:
        """Keep the budget for a new cache: evict least recently used caches.

        Only caches whose name starts with ``evictable`` (automatic ones) go, the
        least recently used first (see touch), and only as many as needed. Return
        the evicted entries. When the cache would not fit even without all of
        them, raise CacheBudgetExceeded and evict nothing.
        """
        if self.budget_bytes is None:
            return []
        expected = self.expected_bytes(model, prompt_length)
        candidates, sizes = self._budget_check(model, name, expected, evictable)
        used = sum(sizes.values())
        evicted: list[CacheEntry] = []
        for entry in candidates:
            if used + expected <= self.budget_bytes:
                break
            _LOGGER.info(
                "Evicting prompt cache %s/%s (budget)", entry.model, entry.name
            )
            self.delete(entry.model, entry.name)
            used -= sizes[entry.model, entry.name]
            evicted.append(entry)
        return evicted

    def _budget_check(
        self, model: str, name: str, expected: int, evictable: str
    ) -> tuple[list[CacheEntry], dict[tuple[str, str], int]]:
        """Return the evictable caches (least recently used first) and every other's size.

        Raise CacheBudgetExceeded when expected bytes do not fit the budget even
        without the evictable caches.
        """
        assert self.budget_bytes is not None
        others = [e for e in self.list() if (e.model, e.name) != (model, name)]
        sizes = {(e.model, e.name): self.disk_bytes(e) for e in others}
        candidates = sorted(
            (e for e in others if e.name.startswith(evictable)), key=_last_used
        )
        kept = sum(sizes.values()) - sum(sizes[e.model, e.name] for e in candidates)
        if kept + expected > self.budget_bytes:
            raise CacheBudgetExceeded(
                f"Cache {model}/{name} needs about {_megabytes(expected)}; the other "
                f"caches use {_megabytes(kept)} of {_megabytes(self.budget_bytes)}",
                needed_bytes=expected,
                model=model,
                name=name,
                expected=_megabytes(expected),
                used=_megabytes(kept),
                budget=_megabytes(self.budget_bytes),
                path=str(self.root),
            )
        return candidates, sizes

    def disk_problem(
        self, model: str | None, name: str, needed_bytes: int, evictable: str
    ) -> CacheWriteError | None:
        """Tell whether a cache of needed_bytes could be written now, and if not why.

        The disk is asked as write_problem asks it (a small synced write in the
        model's folder; in the root for model None or while the folder is
        missing), then the budget is checked as make_room checks it. None:
        nothing stands in the way.
        """
        folder = self._readable_model_dir(model) if model is not None else None
        if folder is None or not folder.is_dir():
            folder = self.root
        if (problem := _write_probe(folder)) is not None:
            return problem
        if self.budget_bytes is None:
            return None
        try:
            self._budget_check(model or "", name, needed_bytes, evictable)
        except CacheBudgetExceeded as err:
            return err
        return None

    def touch(self, entry: CacheEntry) -> None:
        """Record that a cache was just used (its ``.bin``'s times), best effort."""
        self._stamp_bin(entry.bin_path)

    def touch_named(self, model: str, name: str) -> None:
        """Record that the named cache was just used."""
        _check_cache_name(name)
        if self._readable_model_dir(model) is not None:
            self._stamp_bin(self.bin_path(model, name))

    def _stamp_bin(self, path: Path) -> None:
        """Stamp a ``.bin`` as used; a content check it passed still holds after."""
        before = _identity(path)
        _stamp(path)
        verified = self._verified.get(path)
        if verified is not None and verified[0] == before and before is not None:
            if (after := _identity(path)) is not None:
                self._verified[path] = (after, verified[1])

    def verify(self, model: str, name: str) -> CacheEntry:
        """Return the named cache when its ``.bin`` holds what its metadata describes.

        The content is hashed once per version of the file (see _identity); a
        ``.bin`` that fails is remembered, so that listings show it as
        "content_mismatch" until it is rebuilt. Raise CacheContentMismatch when
        the cache is missing, unusable or fails the check.
        """
        entry = self.get(model, name)
        if entry is None or entry.problem is not None or entry.metadata is None:
            problem = "missing" if entry is None else entry.problem
            raise CacheContentMismatch(
                f"prompt cache {model}/{name} cannot be loaded ({problem})",
                error=str(problem),
                model=model,
                name=name,
            )
        path, expected = entry.bin_path, entry.metadata.content_sha256
        identity = _identity(path)
        if identity is not None and self._verified.get(path) == (identity, expected):
            return entry
        try:
            digest = content_digest(path)
        except OSError as err:
            digest = f"unreadable ({err.strerror})"
        if digest != expected:
            if identity is not None:
                self._mismatched[path] = identity
            message = (
                f"prompt cache {path} does not hold what {entry.json_path.name} "
                "describes: its content changed after it was built"
            )
            _LOGGER.warning("%s; it is rebuilt", message)
            raise CacheContentMismatch(message, error=message, model=model, name=name)
        if identity is not None:
            self._verified[path] = (identity, digest)
        return entry

    def check_staging(self, staging_bin: Path) -> None:
        """Raise ValueError unless ``staging_bin`` came from staging_bin_path."""
        self._check_staging(staging_bin, None)

    def used_bytes(self) -> int:
        """Return the bytes all caches in the root take."""
        return sum(self.disk_bytes(entry) for entry in self.list())

    def bin_path(self, model: str, name: str) -> Path:
        """Return the cache file path; raise InvalidModelName / InvalidCacheName."""
        return self._path(model, name, _BIN)

    def json_path(self, model: str, name: str) -> Path:
        """Return the metadata file path; raise InvalidModelName / InvalidCacheName."""
        return self._path(model, name, _JSON)

    def staging_bin_path(self, model: str, name: str) -> Path:
        """Create the model folder and return a fresh temp path for the runtime to write.

        A link that leads out of the root in the folder's place is replaced by a
        real folder (only the link goes), anything else that is not a folder is
        moved aside.
        """
        _check_cache_name(name)
        _check_model_name(model)
        folder = self.root / model
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            mode = _lstat_mode(folder)
            if mode is not None and stat.S_ISLNK(mode):
                if not self._inside(folder) or not folder.is_dir():
                    _LOGGER.warning(
                        "Replacing %s, a link that leads out of %s, with a folder",
                        folder,
                        self.root,
                    )
                    folder.unlink()
            elif mode is not None and not stat.S_ISDIR(mode):
                target = move_aside(folder)
                _LOGGER.warning(
                    "%s was not a folder; moved it aside to %s", folder, target
                )
            folder.mkdir(exist_ok=True)
        except OSError as err:
            raise CacheWriteError(
                f"Cannot create {folder}: {err}", err, folder
            ) from err
        return _temp_path(self.bin_path(model, name))

    def commit(self, staging_bin: Path, metadata: CacheMetadata) -> CacheEntry:
        """Install a staged cache and its metadata as one pair.

        ``metadata.size_bytes`` is set from the staged file. The JSON is written
        to a temp file and synced, the old ``.bin`` is moved aside, then the new
        ``.bin`` and the JSON are renamed into place. On any OSError the previous
        state is restored, the temp files are removed and CacheWriteError is raised.
        """
        bin_path = self.bin_path(metadata.model, metadata.name)
        json_path = self.json_path(metadata.model, metadata.name)
        self._check_staging(staging_bin, bin_path)
        json_tmp = _temp_path(json_path)
        backup = _temp_path(bin_path)
        moved_aside = installed = False
        try:
            size, digest = _synced_digest(staging_bin)
            metadata = replace(
                metadata,
                size_bytes=size,
                content_sha256=digest,
                version=METADATA_VERSION,
            )
            _move_out_of_the_way(bin_path)
            _move_out_of_the_way(json_path)
            text = json.dumps(metadata.to_json(), indent=2, sort_keys=True)
            _write_synced(json_tmp, text + "\n")
            moved_aside = _move_aside(bin_path, backup)
            staging_bin.replace(bin_path)
            installed = True
            json_tmp.replace(json_path)
        except OSError as err:
            if moved_aside:
                _restore(backup, bin_path)
            elif installed:
                _remove(bin_path)
            _remove(staging_bin)
            _remove(json_tmp)
            raise CacheWriteError(
                f"Cannot write cache {bin_path}: {err}", err, bin_path.parent
            ) from err
        _remove(backup)
        _stamp(bin_path)  # built counts as used, on the same clock as touch
        _fsync_dir(bin_path.parent)
        self._mismatched.pop(bin_path, None)
        if (identity := _identity(bin_path)) is not None:
            self._verified[bin_path] = (identity, digest)
        return CacheEntry(
            metadata, metadata.model, metadata.name, bin_path, json_path, None
        )

    def discard(self, staging_bin: Path) -> None:
        """Remove a staging file; a missing one is fine."""
        self._check_staging(staging_bin, None)
        _remove(staging_bin)

    def get(self, model: str, name: str) -> CacheEntry | None:
        """Return a cache entry, None when neither of its files exists."""
        _check_cache_name(name)
        if self._readable_model_dir(model) is None:
            return None
        return self._load(model, name)

    def delete(self, model: str, name: str) -> bool:
        """Delete a cache's files (a link: only the link); False when none existed."""
        _check_cache_name(name)
        if self._readable_model_dir(model) is None:
            return False
        paths = (self.json_path(model, name), self.bin_path(model, name))
        self._verified.pop(paths[1], None)
        self._mismatched.pop(paths[1], None)
        try:
            removed = [_move_out_of_the_way(path) or _unlink(path) for path in paths]
        except OSError as err:
            raise CacheDeleteError(
                f"Cannot delete cache {model}/{name}: {err}",
                err,
                paths[0].parent,
                model,
                name,
            ) from err
        return any(removed)

    def write_problem(self, staging_bin: Path) -> CacheWriteError | None:
        """Tell whether a failed save was the disk's fault: full, read-only, denied.

        The runtime only prints why it could not save; a small synced probe write
        next to ``staging_bin`` gets the same answer from the OS.
        """
        self._check_staging(staging_bin, None)
        return _write_probe(staging_bin.parent)

    def clean_staging(self) -> None:
        """Remove temp files left by a crash; call only while nothing is being built.

        Of what was moved aside earlier, only the newest few per folder stay.
        """
        for model_dir in self._model_dirs(None):
            prune(model_dir)
            for path in _list_dir(model_dir):
                if _TEMP_PATTERN.fullmatch(path.name):
                    _LOGGER.debug("Removing leftover %s", path)
                    try:
                        _move_out_of_the_way(path)
                    except OSError as err:
                        _LOGGER.warning("Cannot move %s aside: %s", path, err)
                    _remove(path)

    def _path(self, model: str, name: str, suffix: str) -> Path:
        """Return a validated path of a cache file inside the root.

        The file itself is not resolved: whatever is at that path (a link that
        leads anywhere) is the store's to read as "not_a_file" and to replace.
        """
        _check_cache_name(name)
        return self._model_dir(model) / f"{name}{suffix}"

    def _model_dir(self, model: str) -> Path:
        """Return a validated model folder inside the root."""
        _check_model_name(model)
        path = self.root / model
        if not self._inside(path):
            raise InvalidModelName(
                f"Cache folder {path} resolves outside {self.root}", model=model
            )
        return path

    def _readable_model_dir(self, model: str) -> Path | None:
        """Return a model's folder to read, None when it is a link out of the root."""
        _check_model_name(model)
        path = self.root / model
        if not self._inside(path):
            _LOGGER.warning(
                "Ignoring %s: it leads out of %s (the next build replaces it)",
                path,
                self.root,
            )
            return None
        return path

    def _inside(self, path: Path) -> bool:
        """Return True when ``path``, symlinks resolved, stays inside the root."""
        return path.resolve().is_relative_to(self.root.resolve())

    def _check_staging(self, staging_bin: Path, bin_path: Path | None) -> None:
        """Raise ValueError unless ``staging_bin`` came from staging_bin_path.

        That is a staging name directly in a model folder of the root (not the
        root itself, nor a hidden folder such as the library's private copy).
        """
        try:
            in_model_dir = staging_bin.parent == self._model_dir(
                staging_bin.parent.name
            )
        except InvalidModelName:
            in_model_dir = False
        valid = (
            _TEMP_PATTERN.fullmatch(staging_bin.name) is not None
            and in_model_dir
            and self._inside(staging_bin)
            and (
                bin_path is None
                or (
                    staging_bin.parent == bin_path.parent
                    and staging_bin.name.startswith(f".{bin_path.name}.tmp-")
                )
            )
        )
        if not valid:
            raise ValueError(f"{staging_bin} is not a staging path of this store")

    def _load(self, model: str, name: str) -> CacheEntry | None:
        """Read one cache entry; None when neither file exists."""
        bin_path = self.bin_path(model, name)
        json_path = self.json_path(model, name)
        bin_size = _file_size(bin_path)
        metadata, problem = _read_metadata(json_path)
        if problem == "metadata_missing" and bin_size is None:
            if not _is_not_a_file(bin_path):
                return None
        if metadata is not None:
            problem = _pair_problem(metadata, model, name, bin_size)
        if _is_not_a_file(bin_path):
            problem = "not_a_file"
        mismatched = self._mismatched.get(bin_path)
        if problem is None and mismatched is not None:
            if mismatched == _identity(bin_path):
                problem = "content_mismatch"
            else:
                del self._mismatched[bin_path]  # changed again: to be checked again
        if problem == "no_content_hash":
            _LOGGER.debug("Prompt cache %s/%s has no content hash", model, name)
        elif problem not in (None, "metadata_corrupt"):
            _LOGGER.warning("Prompt cache %s/%s is unusable: %s", model, name, problem)
        return CacheEntry(metadata, model, name, bin_path, json_path, problem)

    def _model_dirs(self, model: str | None) -> Iterator[Path]:
        """Yield the model folders (one or all) that exist and stay inside the root."""
        models = [model] if model is not None else _visible_names(self.root)
        for name in models:
            try:
                path = self._model_dir(name)
            except InvalidModelName as err:
                _LOGGER.warning("Skipping cache folder: %s", err)
                continue
            if path.is_dir():
                yield path

    def _model_entries(self, model_dir: Path) -> Iterator[CacheEntry]:
        """Yield the entries of one model folder."""
        names = {path.stem for path in _list_dir(model_dir) if _is_cache_file(path)}
        for name in names:
            try:
                entry = self._load(model_dir.name, name)
            except CacheError as err:
                _LOGGER.warning("Skipping prompt cache: %s", err)
                continue
            if entry is not None:
                yield entry

    def list(self, model: str | None = None) -> list[CacheEntry]:
        """Return the entries of one model or all, sorted by (model, name)."""
        if model is not None:
            _check_model_name(model)
        entries = [
            entry
            for model_dir in self._model_dirs(model)
            for entry in self._model_entries(model_dir)
        ]
        return sorted(entries, key=lambda entry: (entry.model, entry.name))
