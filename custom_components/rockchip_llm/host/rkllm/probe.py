"""Try a runtime library in a short-lived child process; copy it for the workers.

ctypes cannot catch a library that crashes while it is loaded: a constructor that
segfaults or aborts during dlopen takes its whole process down. Home Assistant
never loads the library: a child Python loads it first (ELF, version and symbol
checks, dlopen, one ``rkllm_createDefaultParam`` call that touches the ABI) and
prints a JSON verdict, and only then is a private copy made for the worker
processes (:mod:`.worker`) that run models. A library with no known release hash
and no version string (real builds carry only a format string) is identified
there by its behaviour: where ``rkllm_createDefaultParam`` puts the documented
defaults (see ``library.identify_family``); the user's ABI-family override counts
only when that is ambiguous. A refusal comes back as the same typed error; a
child that dies without a verdict (a signal, an exit, a hang) gives
:class:`LibraryCrashed`.

The child (see :mod:`.child`) is ``python -I -S -c <bootstrap> <folder> probe <library>``. The bootstrap
imports this folder as a package of a private name, so the child runs only the
binding modules (``library``, ``abi``, ``errors``, this one) and never
``custom_components/rockchip_llm/__init__.py``, which imports Home Assistant.

Verdicts are kept in this process, keyed by the file's fingerprint (resolved path,
device, inode, size, mtime), so a library is probed once per Home Assistant run
until the file changes. Only verdicts that depend on the file alone are kept: the
library's details, or a refusal for its format, architecture, version or symbols.
A loader error, a crash or a hang may come from the rest of the system (a missing
dependency, the NPU driver, a busy machine), so those are probed again on the next
attempt. Nothing is persisted: after a restart the first load probes again, which
costs a fraction of a second.

Everything here blocks: call it off the event loop.
"""

from collections.abc import Mapping
from dataclasses import dataclass, replace
import json
import logging
import os
from pathlib import Path
import shutil
import subprocess
import threading
from typing import Any, Final, Self, TypeAlias

from .abi import AbiFamily
from .aside import move_aside, prune
from .child import child_command, disable_core_dumps, exit_description
from .errors import (
    LibraryChanged,
    LibraryCopyFailed,
    LibraryCrashed,
    LibraryError,
    LibraryLoadError,
    LibraryNotFound,
    MissingSymbols,
    NotASharedLibrary,
    RKLLMError,
    UnknownRuntimeVersion,
    UnsupportedRuntime,
    WrongArchitecture,
)
from .library import (
    RuntimeInfo,
    RuntimeLibrary,
    VerifiedLibrary,
    check_elf,
    copy_damage,
    file_is_simulator,
    identify_family,
    info_from_wire,
    info_to_wire,
    load_library,
    open_runtime,
)

_LOGGER = logging.getLogger(__name__)

PROBE_TIMEOUT: Final = 20.0
"""Seconds the child may take to load the library."""

_ERRORS: Final[Mapping[str, type[LibraryError]]] = {
    cls.translation_key: cls
    for cls in (
        LibraryError,
        LibraryNotFound,
        NotASharedLibrary,
        WrongArchitecture,
        MissingSymbols,
        UnsupportedRuntime,
        UnknownRuntimeVersion,
        LibraryLoadError,
        LibraryCrashed,
    )
}
_FILE_VERDICTS: Final = (
    NotASharedLibrary,
    WrongArchitecture,
    MissingSymbols,
    UnsupportedRuntime,
    UnknownRuntimeVersion,
)
"""Refusals that depend on the file's bytes alone, so they are cached."""

_STDERR_LINES: Final = 20


@dataclass(frozen=True, slots=True)
class _Refusal:
    """A cached refusal; a fresh exception is raised from it every time."""

    translation_key: str
    message: str
    placeholders: Mapping[str, str]

    @classmethod
    def of(cls, err: LibraryError) -> Self:
        """Record an error."""
        placeholders = {k: v for k, v in err.placeholders.items() if k != "error"}
        return cls(err.translation_key, str(err), placeholders)

    def error(self) -> LibraryError:
        """Return the error as its own class (LibraryError for an unknown key)."""
        error_class = _ERRORS.get(self.translation_key, LibraryError)
        return error_class(self.message, **self.placeholders)


_Fingerprint: TypeAlias = tuple[str, int, int, int, int, str]

_verdicts: dict[_Fingerprint, RuntimeInfo | _Refusal] = {}
_lock = threading.Lock()


def _fingerprint(path: Path, family_override: AbiFamily | None) -> _Fingerprint:
    """Return what identifies this version of the file (and the override)."""
    resolved = path.resolve()
    stat = resolved.stat()
    return (
        str(resolved),
        stat.st_dev,
        stat.st_ino,
        stat.st_size,
        stat.st_mtime_ns,
        str(family_override or ""),
    )


def _child_command(path: Path, family_override: AbiFamily | None = None) -> list[str]:
    """Return the command of the child that loads path."""
    return child_command("probe", str(path), str(family_override or ""))


def _stderr_tail(stderr: bytes | str | None) -> str:
    """Return the last lines the child wrote to stderr."""
    if isinstance(stderr, bytes):
        stderr = stderr.decode(errors="replace")
    lines = (stderr or "").strip().splitlines()[-_STDERR_LINES:]
    return "\n".join(lines) if lines else "(no output)"


def _parse_verdict(stdout: bytes) -> dict[str, Any] | None:
    """Return the child's verdict, or None if it printed none."""
    lines = stdout.decode(errors="replace").strip().splitlines()
    if not lines:
        return None
    try:
        verdict = json.loads(lines[-1])
    except ValueError:
        return None
    return verdict if isinstance(verdict, dict) else None


def _death(path: Path, returncode: int, stderr: str) -> LibraryCrashed:
    """Describe a child that ended without a verdict."""
    if returncode < 0:
        name = exit_description(returncode)
        return LibraryCrashed(
            f"loading {path} crashed the test process ({name}); "
            "it would have crashed Home Assistant",
            path=str(path),
            signal=name,
        )
    last = stderr.splitlines()[-1]
    return LibraryCrashed(
        f"loading {path} ended the test process with exit status {returncode} "
        f"({last}); it would have ended Home Assistant",
        path=str(path),
        status=str(returncode),
    )


def _runtime_info(path: Path, verdict: Mapping[str, Any]) -> RuntimeInfo:
    """Rebuild the RuntimeInfo the child found."""
    try:
        return info_from_wire({**verdict, "path": str(path)})
    except (KeyError, TypeError, ValueError) as err:
        raise LibraryError(
            f"the process that tested {path} gave an unreadable verdict: {verdict!r}",
            path=str(path),
        ) from err


def probe_library(
    path: Path,
    *,
    family_override: AbiFamily | None = None,
    timeout: float = PROBE_TIMEOUT,
) -> RuntimeInfo:
    """Load path in a child process; return what it found or raise its error.

    Raises the child's LibraryError subclass when it refused the library, and
    LibraryCrashed when the child died (signal, exit) or hung past timeout.
    """
    try:
        done = subprocess.run(
            _child_command(path, family_override),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        _LOGGER.warning(
            "Loading %s took longer than %g s; its output:\n%s",
            path,
            timeout,
            _stderr_tail(err.stderr),
        )
        raise LibraryCrashed(
            f"{path} did not finish loading within {timeout:g} s; "
            "it would have hung Home Assistant",
            path=str(path),
        ) from None
    except OSError as err:
        raise LibraryError(
            f"cannot start a process to test {path}: {err}", path=str(path)
        ) from err
    stderr = _stderr_tail(done.stderr)
    verdict = _parse_verdict(done.stdout)
    if verdict is None:
        _LOGGER.error(
            "Loading %s killed the test process (status %s); its output:\n%s",
            path,
            done.returncode,
            stderr,
        )
        raise _death(path, done.returncode, stderr)
    if done.returncode != 0:
        _LOGGER.warning(
            "The process that tested %s gave a verdict, then ended with status %s:\n%s",
            path,
            done.returncode,
            stderr,
        )
    if "error" in verdict:
        placeholders = verdict.get("placeholders")
        raise _Refusal(
            str(verdict["error"]),
            str(verdict.get("message", verdict["error"])),
            {str(k): str(v) for k, v in placeholders.items()}
            if isinstance(placeholders, dict)
            else {},
        ).error()
    return _runtime_info(path, verdict)


def verify_library(
    path: Path,
    *,
    family_override: AbiFamily | None = None,
    timeout: float = PROBE_TIMEOUT,
) -> RuntimeInfo:
    """Probe path in a child process, once per version of the file.

    Returns the cached RuntimeInfo (with ``path`` as given) or raises the error
    probe_library raised; see the module docstring for what is cached.
    """
    try:
        key = _fingerprint(path, family_override)
    except OSError as err:
        check_elf(path)  # raises the precise error: missing, unreadable
        raise LibraryLoadError(
            f"cannot read {path}: {err.strerror}", path=str(path)
        ) from err
    with _lock:
        verdict = _verdicts.get(key)
        if verdict is None:
            try:
                verdict = probe_library(
                    path, family_override=family_override, timeout=timeout
                )
            except _FILE_VERDICTS as err:
                verdict = _Refusal.of(err)
            for old in [old for old in _verdicts if old[0] == key[0]]:
                del _verdicts[old]
            _verdicts[key] = verdict
    if isinstance(verdict, _Refusal):
        raise verdict.error()
    return replace(verdict, path=path)


def verify_and_copy_library(
    path: Path, private_dir: Path, family_override: AbiFamily | None = None
) -> VerifiedLibrary:
    """Check path in a child process (see verify_library), then copy it privately.

    Nothing is loaded in this process. The copy, named by content in private_dir,
    is what the worker processes load: a user who later overwrites the original
    in place (cp, not a rename) would otherwise change code under a running model.
    """
    info = verify_library(path, family_override=family_override)
    copy = _private_copy(path, info, private_dir)
    return VerifiedLibrary(info=info, copy=copy, simulated=file_is_simulator(copy))


def checked_copy(library: VerifiedLibrary) -> VerifiedLibrary:
    """Return library with an intact private copy, made again when it is damaged.

    A worker about to start loads the copy; one damaged since it was checked
    (overwritten, truncated) is copied again from the original, as long as the
    original still holds the very library that was checked. When it does not
    (replaced by another version, damaged too) nothing is copied: raise
    LibraryChanged, for a reload checks the new one.
    """
    try:
        damage = copy_damage(library.copy, library.info)
    except OSError as err:
        damage = err.strerror or str(err)
    if damage is None:
        return library
    path = library.info.path
    try:
        changed = copy_damage(path, library.info)
    except OSError as err:
        changed = err.strerror or str(err)
    if changed is not None:
        raise LibraryChanged(
            f"the private copy {library.copy} of the runtime library is damaged "
            f"({damage}), and {path} is no longer the library that was checked "
            f"({changed}); reload the integration to check the library now there",
            path=str(path),
            copy=str(library.copy),
        )
    copy = _private_copy(path, library.info, library.copy.parent)
    return replace(library, copy=copy)


def _private_copy(path: Path, info: RuntimeInfo, private_dir: Path) -> Path:
    """Return an intact copy of path named by its content, made atomically once.

    A copy already there is kept only if its size and hash are the verdict's:
    a damaged one (truncated by a power cut, overwritten) is logged and replaced.
    A new copy is flushed to disk before it is renamed into place.
    """
    copy = private_dir / f"librkllmrt-{info.blob_sha1}.so"
    try:
        _real_directory(private_dir)
        for leftover in private_dir.glob(".librkllmrt-*.so.tmp-*"):
            _LOGGER.debug("Removing leftover %s", leftover)
            leftover.unlink()
        if copy.is_symlink() or (copy.exists() and not copy.is_file()):
            _LOGGER.warning("Replacing %s: not a regular file", copy)
            _discard(copy)
        if copy.exists() and (problem := copy_damage(copy, info)) is not None:
            _LOGGER.warning("Replacing the damaged library copy %s: %s", copy, problem)
            _remove(copy)
        if not copy.exists():
            _write_copy(path, info, copy)
        for old in private_dir.glob("librkllmrt-*.so"):
            if old != copy:
                old.unlink(missing_ok=True)  # a worker's mapping of it stays valid
        prune(private_dir)
    except OSError as err:
        raise LibraryCopyFailed(
            f"cannot copy {path} to {private_dir}: {err.strerror}",
            err,
            path=str(private_dir),
        ) from err
    return copy


def _write_copy(path: Path, info: RuntimeInfo, copy: Path) -> None:
    """Copy path to a temporary file, flush and check it, then rename it to copy."""
    staging = copy.with_name(f".{copy.name}.tmp-{os.getpid()}")
    try:
        shutil.copyfile(path, staging)
        fd = os.open(staging, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        staging.unlink(missing_ok=True)  # a partial copy fills the disk
        raise
    if copy_damage(staging, info) is not None:
        staging.unlink()
        raise LibraryLoadError(
            f"{path} changed while it was being loaded; try again", path=str(path)
        )
    staging.replace(copy)
    _fsync_directory(copy.parent)


def _fsync_directory(path: Path) -> None:
    """Persist a rename in path, best effort (a lost rename only costs a copy)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:
        _LOGGER.debug("Cannot flush %s: %s", path, err.strerror)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Delete path, or move it aside when it cannot be deleted."""
    try:
        path.unlink()
    except OSError:
        _move_aside(path)


def _real_directory(path: Path) -> None:
    """Make path a real directory (a symlink there could lead anywhere)."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        _LOGGER.warning("Replacing %s with a directory", path)
        _discard(path)
    path.mkdir(parents=True, exist_ok=True)


def _discard(path: Path) -> None:
    """Remove a symlink (only the link), or move anything else aside."""
    if path.is_symlink():
        path.unlink()
    else:
        _move_aside(path)


def _move_aside(path: Path) -> None:
    """Rename path out of the way, next to where it was (the newest few stay)."""
    _LOGGER.warning("Moved %s aside to %s", path, move_aside(path))


def _child_load(path: Path, override: AbiFamily | None) -> RuntimeLibrary:
    """Load path by its hash or version string, else by its behaviour, else override."""
    try:
        return load_library(path)
    except UnknownRuntimeVersion:
        pass
    cdll = open_runtime(path)
    try:
        family = identify_family(cdll, path)
    except UnknownRuntimeVersion:
        if override is None:
            raise
        return load_library(path, family_override=override)
    return load_library(path, identified=family)


def _child_main(argv: list[str]) -> int:
    """Run in the child: load the library, touch its ABI, print the verdict."""
    verdict_fd = os.dup(1)
    os.dup2(2, 1)  # whatever the library prints goes to stderr, not into the verdict
    disable_core_dumps()
    path = Path(argv[0])
    override = AbiFamily(argv[1]) if len(argv) > 1 and argv[1] else None
    verdict: dict[str, Any]
    try:
        loaded = _child_load(path, override)
        loaded.cdll.rkllm_createDefaultParam()
    except RKLLMError as err:
        verdict = {
            "error": err.translation_key,
            "message": str(err),
            "placeholders": {k: v for k, v in err.placeholders.items() if k != "error"},
        }
    else:
        verdict = info_to_wire(loaded.info)
    with os.fdopen(verdict_fd, "w", encoding="utf-8") as out:
        out.write(json.dumps(verdict) + "\n")
    return 0
