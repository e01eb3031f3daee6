"""Discover .rkllm models from the folder layout ``<models_dir>/<folder>/<file>.rkllm``.

The folder name is the model's friendly name. Pure Python, no Home Assistant
imports. Every function here blocks (file system I/O): call it in an executor.
"""

from dataclasses import dataclass
import hashlib
import logging
import os
from pathlib import Path
import stat

_LOGGER = logging.getLogger(__name__)

MODEL_SUFFIX = ".rkllm"
FINGERPRINT_CHUNK = 1024 * 1024


class ModelsDirError(Exception):
    """The models directory is unusable; ``reason`` is a translation key.

    Reasons: "models_dir_missing", "models_dir_not_dir", "models_dir_unreadable".
    """

    def __init__(self, reason: str, path: Path) -> None:
        """Store the reason and the path."""
        super().__init__(f"{reason}: {path}")
        self.reason = reason
        self.path = path


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A discovered model."""

    name: str
    path: Path
    size_bytes: int
    ignored_files: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ModelScan:
    """The result of scanning the models directory."""

    models: dict[str, ModelInfo]
    loose_files: tuple[str, ...]
    unreadable: tuple[str, ...]


def _sort_key(name: str) -> tuple[str, str]:
    """Sort names case-insensitively, ties by exact name."""
    return (name.casefold(), name)


def _is_candidate(name: str) -> bool:
    """Return True for a visible name with the model suffix (any case)."""
    return not name.startswith(".") and name.casefold().endswith(MODEL_SUFFIX)


def _regular_file_size(path: Path) -> int | None:
    """Return the size of a regular file (following symlinks), None otherwise.

    A broken symlink or a file that vanished counts as no file. Permission
    errors propagate: they make the whole folder unreadable.
    """
    try:
        st = path.stat()
    except PermissionError:
        raise
    except OSError as err:
        _LOGGER.debug("Skipping %s: %s", path, err)
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def _list_dir(path: Path) -> list[Path]:
    """Return the entries of a directory, sorted by name."""
    return sorted(path.iterdir(), key=lambda entry: _sort_key(entry.name))


def _list_models_dir(models_dir: Path) -> list[Path]:
    """List the models directory or raise ModelsDirError."""
    try:
        st = models_dir.stat()
    except (FileNotFoundError, NotADirectoryError) as err:
        raise ModelsDirError("models_dir_missing", models_dir) from err
    except OSError as err:
        raise ModelsDirError("models_dir_unreadable", models_dir) from err
    if not stat.S_ISDIR(st.st_mode):
        raise ModelsDirError("models_dir_not_dir", models_dir)
    try:
        return _list_dir(models_dir)
    except OSError as err:
        raise ModelsDirError("models_dir_unreadable", models_dir) from err


def _scan_folder(folder: Path) -> ModelInfo | None:
    """Return the model of one folder, None if it holds no model file."""
    files = [
        (entry, size)
        for entry in _list_dir(folder)
        if _is_candidate(entry.name) and (size := _regular_file_size(entry)) is not None
    ]
    if not files:
        return None
    (used, size), *rest = files
    ignored = tuple(entry.name for entry, _ in rest)
    if ignored:
        _LOGGER.warning(
            "Model folder %s holds several %s files; using %s, ignoring %s",
            folder,
            MODEL_SUFFIX,
            used.name,
            ", ".join(ignored),
        )
    return ModelInfo(folder.name, used, size, ignored)


def scan_models(models_dir: Path) -> ModelScan:
    """Find the models in ``models_dir``: one per folder, the first file by name.

    Raises ModelsDirError when ``models_dir`` itself cannot be used.
    """
    models: dict[str, ModelInfo] = {}
    loose: list[str] = []
    unreadable: list[str] = []
    for entry in _list_models_dir(models_dir):
        if entry.name.startswith("."):
            continue
        try:
            if _is_candidate(entry.name) and _regular_file_size(entry) is not None:
                loose.append(entry.name)
            elif entry.is_dir() and (model := _scan_folder(entry)) is not None:
                models[model.name] = model
        except (FileNotFoundError, NotADirectoryError):
            _LOGGER.debug("Model folder %s vanished during the scan", entry)
        except OSError as err:
            _LOGGER.warning("Cannot read model folder %s: %s", entry, err)
            unreadable.append(entry.name)
    if loose:
        _LOGGER.warning(
            "Ignoring model files directly in %s (%s); move each into its own folder: %s/<name>/<file>",
            models_dir,
            ", ".join(loose),
            models_dir,
        )
    return ModelScan(models, tuple(loose), tuple(unreadable))


def model_fingerprint(path: Path) -> dict[str, int | str]:
    """Identify a model file cheaply: size, mtime and a hash of its head and tail.

    Hashes the first and the last FINGERPRINT_CHUNK bytes (the whole file when
    it is not larger than two chunks). OSError propagates.
    """
    digest = hashlib.sha256()
    with path.open("rb") as file:
        st = os.fstat(file.fileno())
        if st.st_size <= 2 * FINGERPRINT_CHUNK:
            digest.update(file.read())
        else:
            digest.update(file.read(FINGERPRINT_CHUNK))
            file.seek(-FINGERPRINT_CHUNK, os.SEEK_END)
            digest.update(file.read(FINGERPRINT_CHUNK))
    return {
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "sha256_head_tail": digest.hexdigest(),
    }
