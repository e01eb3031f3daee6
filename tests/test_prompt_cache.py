"""Tests for the prompt-cache store."""

from dataclasses import replace
from datetime import UTC, datetime
import errno
import hashlib
import json
import logging
import os
from pathlib import Path
import re
import stat
import time
from typing import Any
from unittest.mock import patch

import pytest

from custom_components.rockchip_llm.const import SYSTEM_CACHE_NAME as SYSTEM_CACHE
from custom_components.rockchip_llm.host import prompt_cache as prompt_cache_module
from custom_components.rockchip_llm.host.prompt_cache import (
    METADATA_VERSION,
    CacheBudgetExceeded,
    CacheContentMismatch,
    CacheDeleteError,
    CacheEntry,
    CacheExpectation,
    CacheMetadata,
    CacheWriteError,
    CorruptCache,
    InvalidCacheName,
    InvalidModelName,
    PromptCacheStore,
    prompt_sha256,
)
from custom_components.rockchip_llm.host.rkllm import aside

MODEL = "Qwen3 0.6B (w8a8)"
PROMPT = "You are a voice assistant."
FINGERPRINT: dict[str, int | str] = {
    "size": 1000,
    "mtime_ns": 123,
    "sha256_head_tail": "ab" * 32,
}
CONTEXT: dict[str, int | float | bool | str] = {
    "max_context_len": 4096,
    "thinking": False,
    "tools_sha256": "cd" * 32,
    "temperature": 0.7,
}


def metadata(
    name: str = SYSTEM_CACHE, model: str = MODEL, **changes: Any
) -> CacheMetadata:
    """Return metadata for a cache."""
    base = CacheMetadata(
        name=name,
        model=model,
        created_at=datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC).isoformat(),
        prompt_sha256=prompt_sha256(PROMPT),
        prompt_length=len(PROMPT),
        tokens=42,
        size_bytes=0,
        build_ms=1234.5,
        source="setup",
        model_fingerprint=dict(FINGERPRINT),
        runtime_family="1.2",
        runtime_version="1.2.3",
        context=dict(CONTEXT),
    )
    return replace(base, **changes)


def expectation(**changes: Any) -> CacheExpectation:
    """Return what the metadata above satisfies."""
    base = CacheExpectation(
        prompt_sha256=prompt_sha256(PROMPT),
        model_fingerprint=dict(FINGERPRINT),
        runtime_family="1.2",
        runtime_version="1.2.3",
        context=dict(CONTEXT),
    )
    return replace(base, **changes)


@pytest.fixture
def store(tmp_path: Path) -> PromptCacheStore:
    """A store with a root that does not exist yet."""
    return PromptCacheStore(tmp_path / "cache")


def build(
    store: PromptCacheStore,
    name: str = SYSTEM_CACHE,
    model: str = MODEL,
    data: bytes = b"KV cache bytes",
    **changes: Any,
) -> CacheEntry:
    """Stage a cache file as the runtime would and commit it."""
    staging = store.staging_bin_path(model, name)
    staging.write_bytes(data)
    return store.commit(staging, metadata(name, model, **changes))


def files(folder: Path) -> list[str]:
    """Return the names in a folder."""
    return sorted(path.name for path in folder.iterdir())


def json_data(entry: CacheEntry) -> dict[str, Any]:
    """Return the JSON stored for an entry."""
    data: dict[str, Any] = json.loads(entry.json_path.read_text())
    return data


def test_prompt_sha256() -> None:
    """The hash is the hex SHA-256 of the UTF-8 text."""
    assert (
        prompt_sha256("abc")
        == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    assert prompt_sha256("é") != prompt_sha256("e")


def test_commit_and_get(store: PromptCacheStore) -> None:
    """A committed pair is found again, with the size and hash taken from the file."""
    entry = build(store, data=b"0123456789")
    assert entry.problem is None
    assert entry.metadata == metadata(
        size_bytes=10, content_sha256=hashlib.sha256(b"0123456789").hexdigest()
    )
    assert entry.bin_path == store.root / MODEL / "system.bin"
    assert entry.json_path == store.root / MODEL / "system.json"
    assert entry.bin_path.read_bytes() == b"0123456789"
    assert json_data(entry)["version"] == METADATA_VERSION
    assert files(store.root / MODEL) == ["system.bin", "system.json"]
    assert store.get(MODEL, SYSTEM_CACHE) == entry
    assert entry.invalid_reason(expectation()) is None


def test_commit_replaces_previous_pair(store: PromptCacheStore) -> None:
    """Committing again replaces both files."""
    build(store, data=b"old")
    entry = build(store, data=b"newer", tokens=7)
    assert entry.bin_path.read_bytes() == b"newer"
    got = store.get(MODEL, SYSTEM_CACHE)
    assert got is not None and got.metadata is not None
    assert got.metadata.tokens == 7
    assert got.metadata.size_bytes == 5
    assert files(store.root / MODEL) == ["system.bin", "system.json"]


def test_metadata_json_round_trip() -> None:
    """to_json and from_json are inverse, through real JSON."""
    original = metadata(size_bytes=99)
    text = json.dumps(original.to_json())
    assert CacheMetadata.from_json(json.loads(text)) == original


def test_from_json_accepts_integral_build_ms() -> None:
    """A whole number of milliseconds is stored as an int by some writers."""
    data = metadata().to_json() | {"build_ms": 12}
    assert CacheMetadata.from_json(data).build_ms == 12.0


def valid_json() -> dict[str, Any]:
    """Return valid metadata as JSON data."""
    return metadata(size_bytes=3).to_json()


@pytest.mark.parametrize(
    "data",
    [
        None,
        [1, 2],
        "text",
        {"foo": "bar"},
        valid_json() | {"version": 3},
        valid_json() | {"version": True},
        valid_json() | {"content_sha256": "abc"},
        {k: v for k, v in valid_json().items() if k != "tokens"},
        valid_json() | {"tokens": "42"},
        valid_json() | {"tokens": True},
        valid_json() | {"tokens": -1},
        valid_json() | {"size_bytes": 1.5},
        valid_json() | {"build_ms": "fast"},
        valid_json() | {"build_ms": float("nan")},
        valid_json() | {"name": 5},
        valid_json() | {"created_at": "yesterday"},
        valid_json() | {"created_at": "2025-01-02T03:04:05"},
        valid_json() | {"created_at": "2025-01-02T03:04:05+02:00"},
        valid_json() | {"prompt_sha256": "abc"},
        valid_json() | {"model_fingerprint": [1]},
        valid_json() | {"model_fingerprint": {"size": 1.5}},
        valid_json() | {"model_fingerprint": {"size": True}},
        valid_json() | {"context": {"n": None}},
        valid_json() | {"context": {"n": [1]}},
    ],
)
def test_from_json_is_strict(data: Any) -> None:
    """Wrong or missing types, foreign data and other versions are corrupt."""
    with pytest.raises(CorruptCache) as err:
        CacheMetadata.from_json(data)
    assert err.value.translation_key == "cache_corrupt"
    assert err.value.placeholders["error"]


def test_list(store: PromptCacheStore) -> None:
    """Entries of one model or of all models, sorted by (model, name)."""
    build(store, "system", "b model")
    build(store, "kitchen", "b model")
    build(store, "system", "A model")
    assert [(e.model, e.name) for e in store.list()] == [
        ("A model", "system"),
        ("b model", "kitchen"),
        ("b model", "system"),
    ]
    assert [(e.model, e.name) for e in store.list("b model")] == [
        ("b model", "kitchen"),
        ("b model", "system"),
    ]
    assert store.list("unknown model") == []
    assert all(entry.problem is None for entry in store.list())


def test_list_without_root(store: PromptCacheStore) -> None:
    """No root yet means no caches."""
    assert store.list() == []
    assert store.get(MODEL, SYSTEM_CACHE) is None


def test_list_skips_foreign_files(
    store: PromptCacheStore, caplog: pytest.LogCaptureFixture
) -> None:
    """Temp files, hidden files, non-slug names and hidden folders are skipped."""
    build(store)
    folder = store.root / MODEL
    for name in (
        ".system.bin.tmp-0123456789abcdef",
        ".hidden.json",
        "Upper.bin",
        "with-dash.json",
        "notes.txt",
    ):
        (folder / name).write_text("x")
    (store.root / ".trash").mkdir()
    (store.root / ".trash" / "system.json").write_text("{}")
    (store.root / "stray.bin").write_text("x")
    with caplog.at_level(logging.DEBUG):
        entries = store.list()
    assert [(e.model, e.name) for e in entries] == [(MODEL, "system")]
    assert "Upper.bin" in caplog.text


def test_delete(store: PromptCacheStore) -> None:
    """Delete removes both files and reports whether anything existed."""
    entry = build(store)
    build(store, "other")
    assert store.delete(MODEL, SYSTEM_CACHE) is True
    assert not entry.bin_path.exists()
    assert not entry.json_path.exists()
    assert store.get(MODEL, SYSTEM_CACHE) is None
    assert store.delete(MODEL, SYSTEM_CACHE) is False
    assert [e.name for e in store.list()] == ["other"]


def test_delete_half_pair(store: PromptCacheStore) -> None:
    """A lone .bin is deleted too."""
    entry = build(store)
    entry.json_path.unlink()
    assert store.delete(MODEL, SYSTEM_CACHE) is True
    assert not entry.bin_path.exists()


def test_delete_failure(
    store: PromptCacheStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file that cannot be removed raises CacheDeleteError, which says why."""
    build(store)

    def unlink(self: Path, missing_ok: bool = False) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "unlink", unlink)
    with pytest.raises(CacheDeleteError) as err:
        store.delete(MODEL, SYSTEM_CACHE)
    assert err.value.translation_key == "cache_delete_failed"
    assert err.value.disk_problem == "cache_dir_not_writable"
    assert err.value.placeholders["reason"] == "Permission denied"
    assert err.value.placeholders["name"] == SYSTEM_CACHE
    assert "Permission denied" in err.value.placeholders["error"]


@pytest.mark.parametrize("name", ["system", "a", "0_9", "a" * 64])
def test_valid_cache_names(store: PromptCacheStore, name: str) -> None:
    """Slugs of 1 to 64 characters are accepted."""
    assert store.bin_path(MODEL, name).name == f"{name}.bin"
    assert build(store, name).problem is None


@pytest.mark.parametrize(
    "name", ["", "A", "a-b", "a.b", "../x", "a/b", "é", "a" * 65, "abc\n", " a"]
)
def test_invalid_cache_names(store: PromptCacheStore, name: str) -> None:
    """Anything but a slug is refused everywhere, before touching the disk."""
    calls = (
        store.bin_path,
        store.json_path,
        store.staging_bin_path,
        store.get,
        store.delete,
    )
    for call in calls:
        with pytest.raises(InvalidCacheName) as err:
            call(MODEL, name)
        assert err.value.translation_key == "invalid_cache_name"
        assert err.value.placeholders == {"name": name}
    assert not store.root.exists()


@pytest.mark.parametrize(
    "model", ["", ".", "..", "a/b", "a\\b", "a\0b", ".hidden", "../x"]
)
def test_invalid_model_names(store: PromptCacheStore, model: str) -> None:
    """Model names must be one visible path component."""
    for call in (store.bin_path, store.json_path, store.staging_bin_path, store.get):
        with pytest.raises(InvalidModelName) as err:
            call(model, SYSTEM_CACHE)
        assert err.value.translation_key == "invalid_model_name"
    with pytest.raises(InvalidModelName):
        store.list(model)
    assert not store.root.exists()


def test_model_names_are_free_text(store: PromptCacheStore) -> None:
    """Spaces, dots, parentheses and unicode are fine in model names."""
    model = "Llama 3.2 (1B) é"
    entry = build(store, model=model)
    assert entry.bin_path.parent == store.root / model
    assert [e.model for e in store.list()] == [model]


def test_symlinked_model_dir_outside_root_is_not_followed(
    store: PromptCacheStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A model folder that is a link leaving the root is never read; a build replaces it.

    Only the link goes: what it pointed to stays as it was.
    """
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "system.bin").write_bytes(b"x")
    (outside / "system.json").write_text(json.dumps(metadata(model="evil").to_json()))
    temp = outside / ".system.bin.tmp-0123456789abcdef"
    temp.write_bytes(b"x")
    store.root.mkdir()
    (store.root / "evil").symlink_to(outside)
    for call in (store.bin_path, store.json_path):
        with pytest.raises(InvalidModelName):
            call("evil", SYSTEM_CACHE)
    with caplog.at_level(logging.WARNING):
        assert store.get("evil", SYSTEM_CACHE) is None
        assert store.delete("evil", SYSTEM_CACHE) is False
        store.touch_named("evil", SYSTEM_CACHE)
        assert store.list() == []
        assert store.list("evil") == []
    assert "outside" in caplog.text
    store.clean_staging()
    assert temp.exists()
    with caplog.at_level(logging.WARNING):
        built = build(store, model="evil")
    assert "a link that leads out of" in caplog.text
    assert not (store.root / "evil").is_symlink()
    assert built.bin_path == store.root / "evil" / "system.bin"
    assert store.get("evil", SYSTEM_CACHE) == built
    assert sorted(p.name for p in outside.iterdir()) == [
        ".system.bin.tmp-0123456789abcdef",
        "system.bin",
        "system.json",
    ]
    assert (outside / "system.bin").read_bytes() == b"x"


def test_symlinked_model_dir_inside_root_is_allowed(store: PromptCacheStore) -> None:
    """A model folder symlinked to another folder inside the root is fine."""
    build(store, model="real")
    (store.root / "alias").symlink_to(store.root / "real")
    assert store.bin_path("alias", SYSTEM_CACHE) == store.root / "alias" / "system.bin"


@pytest.mark.parametrize("which", [".bin", ".json"])
def test_symlinked_cache_file_outside_root_is_not_followed(
    store: PromptCacheStore, tmp_path: Path, which: str
) -> None:
    """A cache file that is a link leaving the root: listed as not_a_file, then replaced.

    A build replaces the link, a delete removes only the link; its target is
    never read nor written.
    """
    entry = build(store)
    outside = tmp_path / f"secret{which}"
    outside.write_bytes(b"secret")
    path = entry.bin_path if which == ".bin" else entry.json_path
    path.unlink()
    path.symlink_to(outside)
    got = store.get(MODEL, SYSTEM_CACHE)
    assert got is not None
    assert got.problem == "not_a_file"
    assert store.list() == [got]
    with pytest.raises(CacheContentMismatch, match="not_a_file"):
        store.verify(MODEL, SYSTEM_CACHE)
    rebuilt = build(store)
    assert rebuilt.problem is None
    assert not path.is_symlink()
    assert outside.read_bytes() == b"secret"
    (store.root / MODEL / f"leak{which}").symlink_to(outside)
    assert store.delete(MODEL, "leak")
    assert outside.read_bytes() == b"secret"
    assert files(store.root / MODEL) == ["system.bin", "system.json"]


@pytest.mark.parametrize(
    "content",
    [
        b"\x00\xffgarbage",
        b"not json",
        b"[1, 2, 3]",
        b'{"some": "other tool"}',
        b"[" * 100_000,
        json.dumps(valid_json() | {"tokens": "many"}).encode(),
        b" " * (1024 * 1024 + 1) + b"{}",
    ],
    ids=["binary", "text", "list", "foreign", "deep", "wrong_type", "huge"],
)
def test_corrupt_json(
    store: PromptCacheStore, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """Corrupt or foreign metadata is reported, logged and never used."""
    entry = build(store)
    entry.json_path.write_bytes(content)
    with caplog.at_level(logging.WARNING):
        got = store.get(MODEL, SYSTEM_CACHE)
        listed = store.list()
    assert got is not None
    assert got.metadata is None
    assert got.problem == "metadata_corrupt"
    assert got.invalid_reason(expectation()) == "metadata_corrupt"
    assert listed == [got]
    assert "corrupt cache metadata" in caplog.text


@pytest.mark.parametrize("kind", ["folder", "fifo", "symlink"])
@pytest.mark.parametrize("which", [".json", ".bin"])
def test_cache_files_must_be_regular(
    store: PromptCacheStore, caplog: pytest.LogCaptureFixture, kind: str, which: str
) -> None:
    """A folder, FIFO or symlink in the place of a cache file is never used.

    Reading never blocks on a FIFO and never follows a symlink (here to a valid
    cache of another model); a new build moves folders and FIFOs aside, visibly,
    and leaves nothing else behind.
    """
    entry = build(store)
    other = build(store, model="Other")
    path = entry.json_path if which == ".json" else entry.bin_path
    path.unlink()
    if kind == "folder":
        path.mkdir()
        (path / "inside").write_text("keep me")
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to(other.json_path if which == ".json" else other.bin_path)
    with caplog.at_level(logging.WARNING):
        got = store.get(MODEL, SYSTEM_CACHE)
        listed = store.list(MODEL)
    assert got is not None
    assert got.problem == "not_a_file"
    assert got.invalid_reason(expectation()) == "not_a_file"
    assert listed == [got]
    assert "not_a_file" in caplog.text
    rebuilt = build(store)
    assert rebuilt.problem is None
    assert store.get(MODEL, SYSTEM_CACHE) == rebuilt
    assert stat.S_ISREG(path.lstat().st_mode)
    names = files(store.root / MODEL)
    moved = [name for name in names if ".moved-" in name]
    assert len(moved) == (0 if kind == "symlink" else 1)
    assert sorted(set(names) - set(moved)) == ["system.bin", "system.json"]
    if kind == "folder":
        assert (store.root / MODEL / moved[0] / "inside").read_text() == "keep me"
    assert store.get("Other", SYSTEM_CACHE) == other  # the link's target untouched
    assert store.delete(MODEL, SYSTEM_CACHE)


def test_leftover_temp_folder_is_moved_aside_once(
    store: PromptCacheStore, caplog: pytest.LogCaptureFixture
) -> None:
    """A temp-named folder (left by an older version) is moved aside, not retried."""
    build(store)
    leftover = store.root / MODEL / ".system.bin.tmp-0123456789abcdef"
    leftover.mkdir()
    (leftover / "data").write_text("x")
    with caplog.at_level(logging.WARNING):
        store.clean_staging()
    assert "Cannot remove" not in caplog.text
    [moved] = [p for p in (store.root / MODEL).iterdir() if ".moved-" in p.name]
    assert (moved / "data").read_text() == "x"
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        store.clean_staging()
    assert caplog.text == ""


@pytest.mark.parametrize(
    "changes", [{"name": "other"}, {"model": "Other model"}], ids=["name", "model"]
)
def test_name_mismatch(
    store: PromptCacheStore, changes: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """Metadata that describes another cache is not used for this one."""
    entry = build(store, data=b"abc")
    assert entry.metadata is not None
    wrong = replace(entry.metadata, **changes)
    entry.json_path.write_text(json.dumps(wrong.to_json()))
    with caplog.at_level(logging.WARNING):
        got = store.get(MODEL, SYSTEM_CACHE)
    assert got is not None
    assert got.problem == "name_mismatch"
    assert got.invalid_reason(expectation()) == "name_mismatch"
    assert "name_mismatch" in caplog.text


def test_size_mismatch(store: PromptCacheStore) -> None:
    """A .bin whose size differs from the metadata is not used."""
    entry = build(store, data=b"abc")
    entry.bin_path.write_bytes(b"abcd")
    got = store.get(MODEL, SYSTEM_CACHE)
    assert got is not None
    assert got.metadata is not None
    assert got.problem == "size_mismatch"
    assert got.invalid_reason(expectation()) == "size_mismatch"


def test_bin_missing(store: PromptCacheStore) -> None:
    """Metadata without its .bin is reported."""
    entry = build(store)
    entry.bin_path.unlink()
    got = store.get(MODEL, SYSTEM_CACHE)
    assert got is not None
    assert got.problem == "bin_missing"
    assert got.invalid_reason(expectation()) == "bin_missing"
    assert store.list() == [got]


def test_metadata_missing(store: PromptCacheStore) -> None:
    """A .bin without metadata is reported, not used."""
    entry = build(store)
    entry.json_path.unlink()
    got = store.get(MODEL, SYSTEM_CACHE)
    assert got is not None
    assert got.metadata is None
    assert got.problem == "metadata_missing"
    assert got.invalid_reason(expectation()) == "metadata_missing"


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"prompt_sha256": prompt_sha256(PROMPT + " ")}, "prompt_changed"),
        ({"model_fingerprint": FINGERPRINT | {"mtime_ns": 124}}, "model_changed"),
        ({"model_fingerprint": FINGERPRINT | {"size": 1001}}, "model_changed"),
        ({"runtime_family": "1.3"}, "runtime_changed"),
        ({"runtime_version": "1.2.2"}, "runtime_changed"),
        ({"context": CONTEXT | {"max_context_len": 8192}}, "context_changed"),
        ({"context": CONTEXT | {"thinking": True}}, "context_changed"),
        ({"context": {"max_context_len": 4096}}, "context_changed"),
        ({}, None),
    ],
)
def test_invalid_reason(
    store: PromptCacheStore, changes: dict[str, Any], reason: str | None
) -> None:
    """Each field of the expectation invalidates the cache on its own."""
    build(store)
    entry = store.get(MODEL, SYSTEM_CACHE)
    assert entry is not None
    assert entry.invalid_reason(expectation(**changes)) == reason


def test_staging_bin_path(store: PromptCacheStore) -> None:
    """Staging paths are fresh hidden temp files in the model folder."""
    first = store.staging_bin_path(MODEL, SYSTEM_CACHE)
    second = store.staging_bin_path(MODEL, SYSTEM_CACHE)
    assert first != second
    assert first.parent == store.root / MODEL
    assert first.parent.is_dir()
    assert first.name.startswith(".system.bin.tmp-")
    assert not first.exists()


def test_staging_bin_path_moves_a_file_in_the_folders_place(
    store: PromptCacheStore,
) -> None:
    """A file where the model folder should be is moved aside, kept, and logged."""
    store.root.mkdir()
    (store.root / MODEL).write_text("in the way")
    staging = store.staging_bin_path(MODEL, SYSTEM_CACHE)
    assert staging.parent.is_dir()
    [moved] = [p for p in store.root.iterdir() if ".moved-" in p.name]
    assert moved.read_text() == "in the way"
    assert [e.model for e in store.list()] == []


def test_staging_bin_path_cannot_create_folder(store: PromptCacheStore) -> None:
    """A root that cannot hold the folder gives CacheWriteError."""
    store.root.parent.mkdir(parents=True, exist_ok=True)
    store.root.write_text("a file, not a folder")
    with pytest.raises(CacheWriteError):
        store.staging_bin_path(MODEL, SYSTEM_CACHE)


def test_discard(store: PromptCacheStore) -> None:
    """Discard removes a staging file; a missing one is fine."""
    staging = store.staging_bin_path(MODEL, SYSTEM_CACHE)
    staging.write_bytes(b"partial")
    store.discard(staging)
    assert not staging.exists()
    store.discard(staging)
    assert files(store.root / MODEL) == []


def test_staging_paths_are_checked(store: PromptCacheStore, tmp_path: Path) -> None:
    """Only staging paths of this store are accepted by discard and commit."""
    entry = build(store)
    other = tmp_path / ".system.bin.tmp-0123456789abcdef"
    other.write_bytes(b"keep")
    for path in (entry.bin_path, other):
        with pytest.raises(ValueError):
            store.discard(path)
        with pytest.raises(ValueError):
            store.commit(path, metadata())
    wrong_name = store.staging_bin_path(MODEL, "kitchen")
    with pytest.raises(ValueError):
        store.commit(wrong_name, metadata())
    assert other.read_bytes() == b"keep"
    assert entry.bin_path.exists()


@pytest.mark.parametrize("content", [None, b""], ids=["missing", "empty"])
def test_commit_without_staged_data(
    store: PromptCacheStore, content: bytes | None
) -> None:
    """A staging file the runtime did not write (or left empty) is refused."""
    old = build(store, data=b"old")
    staging = store.staging_bin_path(MODEL, SYSTEM_CACHE)
    if content is not None:
        staging.write_bytes(content)
    with pytest.raises(CacheWriteError):
        store.commit(staging, metadata())
    assert files(store.root / MODEL) == ["system.bin", "system.json"]
    assert store.get(MODEL, SYSTEM_CACHE) == old


def enospc(path: object) -> OSError:
    """Return a disk-full error."""
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def fail_replace_into(monkeypatch: pytest.MonkeyPatch, pattern: str) -> None:
    """Make the first rename onto a file named like ``pattern`` fail with ENOSPC."""
    real_replace = os.replace
    failed: list[str] = []

    def replace_(src: Any, dst: Any) -> None:
        if not failed and re.fullmatch(pattern, Path(dst).name):
            failed.append(str(dst))
            raise enospc(dst)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_)


def fail_fsync_of(monkeypatch: pytest.MonkeyPatch, marker: str) -> None:
    """Make fsync fail with ENOSPC for files whose name contains ``marker``."""
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if marker in os.readlink(f"/proc/self/fd/{fd}"):
            raise enospc(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize(
    "fail",
    [
        lambda mp: fail_fsync_of(mp, ".json.tmp-"),
        lambda mp: fail_fsync_of(mp, ".bin.tmp-"),
        lambda mp: fail_replace_into(mp, r"system\.bin"),
        lambda mp: fail_replace_into(mp, r"system\.json"),
        lambda mp: fail_replace_into(mp, r"\.system\.bin\.tmp-.*"),
    ],
    ids=["json_write", "bin_sync", "bin_rename", "json_rename", "move_aside"],
)
@pytest.mark.parametrize("has_previous", [True, False], ids=["previous", "first"])
def test_disk_full_keeps_previous_pair(
    store: PromptCacheStore,
    monkeypatch: pytest.MonkeyPatch,
    fail: Any,
    has_previous: bool,
) -> None:
    """Any failure while committing leaves the old pair byte-identical and no temps."""
    folder = store.root / MODEL
    if has_previous:
        old = build(store, data=b"old cache")
        before = {name: (folder / name).read_bytes() for name in files(folder)}
    staging = store.staging_bin_path(MODEL, SYSTEM_CACHE)
    staging.write_bytes(b"new cache, longer")
    fail(monkeypatch)
    with pytest.raises(CacheWriteError) as err:
        store.commit(staging, metadata(tokens=99))
    monkeypatch.undo()
    assert err.value.translation_key == "cache_write_failed"
    assert os.strerror(errno.ENOSPC) in err.value.placeholders["error"]
    assert err.value.disk_problem == "cache_disk_full"
    assert err.value.placeholders["path"] == str(folder)
    assert err.value.placeholders["free"].endswith(" MB")
    if has_previous:
        assert {name: (folder / name).read_bytes() for name in files(folder)} == before
        assert store.get(MODEL, SYSTEM_CACHE) == old
    else:
        assert files(folder) == []
        assert store.get(MODEL, SYSTEM_CACHE) is None


def test_clean_staging(store: PromptCacheStore) -> None:
    """Leftover temp files go; caches and unrelated files stay."""
    entry = build(store)
    build(store, "kitchen", "Other")
    folder = store.root / MODEL
    leftovers = [
        store.staging_bin_path(MODEL, SYSTEM_CACHE),
        folder / ".system.json.tmp-0123456789abcdef",
        store.staging_bin_path("Other", "kitchen"),
    ]
    for path in leftovers:
        path.write_bytes(b"partial")
    (folder / "notes.txt").write_text("keep")
    (folder / ".tmp-like").write_text("keep")
    store.clean_staging()
    assert files(folder) == [".tmp-like", "notes.txt", "system.bin", "system.json"]
    assert files(store.root / "Other") == ["kitchen.bin", "kitchen.json"]
    assert store.get(MODEL, SYSTEM_CACHE) == entry


def test_clean_staging_without_root(store: PromptCacheStore) -> None:
    """Cleaning a store that has no root yet does nothing."""
    store.clean_staging()
    assert not store.root.exists()


def test_failed_restore_keeps_old_bin(
    store: PromptCacheStore,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """When even the rollback fails, the old .bin survives in its backup."""
    build(store, data=b"old cache")
    folder = store.root / MODEL
    staging = store.staging_bin_path(MODEL, SYSTEM_CACHE)
    staging.write_bytes(b"new cache")
    real_replace = os.replace

    def replace_(src: Any, dst: Any) -> None:
        if Path(dst).name == "system.bin":
            raise enospc(dst)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_)
    with pytest.raises(CacheWriteError), caplog.at_level(logging.ERROR):
        store.commit(staging, metadata())
    monkeypatch.undo()
    assert "Cannot restore" in caplog.text
    contents = [(folder / name).read_bytes() for name in files(folder)]
    assert b"old cache" in contents
    assert b"new cache" not in contents


def test_budget_evicts_least_recently_used_automatic_caches(
    store: PromptCacheStore,
) -> None:
    """Room is made by evicting automatic caches, least recently used first."""
    system = build(store, data=b"x" * 10_000, prompt_length=1000)
    autos = [
        build(store, f"auto_{i}", data=b"x" * 10_000, prompt_length=1000)
        for i in range(3)
    ]
    for age, entry in zip((30, 20, 10), autos, strict=True):
        os.utime(entry.bin_path, (1_000_000 - age, 1_000_000 - age))
    store.touch(autos[0])  # just used: the most recent now
    sizes = [store.disk_bytes(entry) for entry in (system, *autos)]
    store.budget_bytes = sum(sizes) + 2_000
    # 10 bytes per prompt character measured: 500 characters need about 5 kB.
    assert store.expected_bytes(MODEL, 500) == 5000
    evicted = store.make_room(MODEL, "auto_new", 500, "auto_")
    assert [entry.name for entry in evicted] == ["auto_1"]  # the oldest use
    assert [e.name for e in store.list()] == ["auto_0", "auto_2", "system"]
    assert store.make_room(MODEL, "auto_2", 1000, "auto_") == []  # replaces itself
    assert store.used_bytes() == sum(sizes) - sizes[2]


def test_budget_refuses_a_named_cache_that_cannot_fit(
    store: PromptCacheStore,
) -> None:
    """A cache that would not fit even without automatic caches evicts nothing."""
    build(store, data=b"x" * 200_000, prompt_length=1000)
    build(store, "auto_a", data=b"x" * 200_000, prompt_length=1000)
    store.budget_bytes = 500_000
    with pytest.raises(CacheBudgetExceeded) as err:
        store.make_room(MODEL, "notes", 2000, "auto_")
    assert err.value.placeholders == {
        "model": MODEL,
        "name": "notes",
        "expected": "0.4 MB",
        "used": "0.2 MB",
        "budget": "0.5 MB",
        "path": str(store.root),
    }
    assert err.value.disk_problem == "cache_budget_exceeded"
    assert [e.name for e in store.list()] == ["auto_a", "system"]
    store.budget_bytes = None  # no budget: nothing is checked
    assert store.make_room(MODEL, "notes", 10**9, "auto_") == []


@pytest.mark.parametrize(
    ("code", "problem"),
    [
        (errno.EACCES, "cache_dir_not_writable"),
        (errno.EROFS, "cache_dir_not_writable"),
        (errno.ENOSPC, "cache_disk_full"),
        (errno.EIO, None),
    ],
)
def test_write_errors_name_the_disk_problem(
    store: PromptCacheStore, code: int, problem: str | None
) -> None:
    """Permission denied, read-only and full disks are told apart from other errors."""
    build(store)
    staging = store.staging_bin_path(MODEL, SYSTEM_CACHE)
    staging.write_bytes(b"new")
    with (
        patch(
            "custom_components.rockchip_llm.host.prompt_cache._write_synced",
            side_effect=OSError(code, os.strerror(code)),
        ),
        pytest.raises(CacheWriteError) as err,
    ):
        store.commit(staging, metadata())
    assert err.value.disk_problem == problem
    assert os.strerror(code) in str(err.value)


def test_write_problem_probe(store: PromptCacheStore) -> None:
    """After a failed save, a probe write tells whether the disk was the cause."""
    staging = store.staging_bin_path(MODEL, SYSTEM_CACHE)
    assert store.write_problem(staging) is None  # a healthy disk: not the disk
    with patch.object(Path, "open", side_effect=PermissionError(errno.EACCES, "no")):
        problem = store.write_problem(staging)
    assert problem is not None
    assert problem.disk_problem == "cache_dir_not_writable"
    with patch(
        "custom_components.rockchip_llm.host.prompt_cache.free_bytes", return_value=1000
    ):
        problem = store.write_problem(staging)
    assert problem is not None
    assert problem.disk_problem == "cache_disk_full"
    assert files(store.root / MODEL) == []  # no probe left behind


def test_content_is_checked_once_per_version_of_the_file(
    store: PromptCacheStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """verify hashes a .bin once; using it (touch) keeps that, a change is checked again."""
    entry = build(store, data=b"the KV of the prompt")
    hashed: list[Path] = []
    real_digest = prompt_cache_module.content_digest

    def digest(path: Path) -> str:
        hashed.append(path)
        return real_digest(path)

    monkeypatch.setattr(prompt_cache_module, "content_digest", digest)
    assert store.verify(MODEL, SYSTEM_CACHE) == entry
    store.touch(entry)
    store.touch_named(MODEL, SYSTEM_CACHE)
    assert store.verify(MODEL, SYSTEM_CACHE) == entry
    assert hashed == []  # the commit hashed it already
    fresh = PromptCacheStore(store.root)  # another host process
    assert fresh.verify(MODEL, SYSTEM_CACHE) == entry
    assert fresh.verify(MODEL, SYSTEM_CACHE) == entry
    assert hashed == [entry.bin_path]


@pytest.mark.parametrize("how", ["rename", "in_place"])
def test_substituted_content_is_found(
    store: PromptCacheStore, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    """A .bin of the same size with other bytes fails verify and is listed as such.

    It stays "content_mismatch" until a build replaces it.
    """
    entry = build(store, data=b"the KV of prompt A")
    store.verify(MODEL, SYSTEM_CACHE)
    if how == "rename":
        other = entry.bin_path.with_name("other")
        other.write_bytes(b"the KV of prompt B")
        other.replace(entry.bin_path)
    else:
        stat_before = entry.bin_path.stat()
        entry.bin_path.write_bytes(b"the KV of prompt B")
        os.utime(entry.bin_path, ns=(stat_before.st_atime_ns, stat_before.st_mtime_ns))
    assert store.get(MODEL, SYSTEM_CACHE) == entry  # size and metadata still agree
    with (
        caplog.at_level(logging.WARNING),
        pytest.raises(CacheContentMismatch) as err,
    ):
        store.verify(MODEL, SYSTEM_CACHE)
    assert err.value.translation_key == "cache_content_mismatch"
    assert "its content changed after it was built" in str(err.value)
    assert "it is rebuilt" in caplog.text
    got = store.get(MODEL, SYSTEM_CACHE)
    assert got is not None and got.problem == "content_mismatch"
    assert got.invalid_reason(expectation()) == "content_mismatch"
    assert [e.problem for e in store.list()] == ["content_mismatch"]
    rebuilt = build(store, data=b"the KV of prompt A")
    assert rebuilt.problem is None
    assert store.verify(MODEL, SYSTEM_CACHE) == rebuilt


def test_metadata_without_content_hash_is_rebuilt(store: PromptCacheStore) -> None:
    """Metadata of version 1 (no content hash) is read, as a cache to rebuild."""
    entry = build(store)
    old = json_data(entry) | {"version": 1}
    del old["content_sha256"]
    entry.json_path.write_text(json.dumps(old))
    got = store.get(MODEL, SYSTEM_CACHE)
    assert got is not None and got.metadata is not None
    assert got.metadata.version == 1
    assert got.metadata.content_sha256 is None
    assert got.problem == "no_content_hash"
    assert got.invalid_reason(expectation()) == "no_content_hash"
    with pytest.raises(CacheContentMismatch, match="no_content_hash"):
        store.verify(MODEL, SYSTEM_CACHE)
    rebuilt = build(store)
    assert json_data(rebuilt)["version"] == METADATA_VERSION
    assert rebuilt.problem is None


def test_moved_aside_entries_are_bounded(store: PromptCacheStore) -> None:
    """Only the newest few things moved aside stay; the oldest go first."""
    build(store)
    folder = store.root / MODEL
    moved: list[str] = []
    for index in range(aside.KEEP + 2):
        (folder / "system.json").unlink()
        (folder / "system.json").mkdir()
        (folder / "system.json" / "note").write_text(str(index))
        time.sleep(0.02)  # a later status change time than the previous move's
        build(store)
        [new] = {p.name for p in folder.iterdir() if ".moved-" in p.name} - set(moved)
        moved.append(new)
    kept = sorted(p.name for p in folder.iterdir() if ".moved-" in p.name)
    assert kept == sorted(moved[-aside.KEEP :])
    notes = sorted((folder / name / "note").read_text() for name in kept)
    assert notes == [str(i) for i in range(2, aside.KEEP + 2)]


def test_clean_staging_prunes_what_was_moved_aside(store: PromptCacheStore) -> None:
    """What earlier versions moved aside (unbounded) is pruned at the next start."""
    build(store)
    folder = store.root / MODEL
    for index in range(aside.KEEP + 3):
        (folder / f"system.bin.moved-{index:08x}").write_text("old")
    store.clean_staging()
    assert files(folder) == [
        "system.bin",
        *(f"system.bin.moved-{i:08x}" for i in range(3, aside.KEEP + 3)),
        "system.json",
    ]


def test_no_warning_for_files_that_never_existed(
    store: PromptCacheStore,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A read-only disk refuses every unlink, also of names that are not there."""
    build(store)
    staging = store.staging_bin_path(MODEL, SYSTEM_CACHE)

    def read_only_unlink(self: Path, missing_ok: bool = False) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    def read_only_open(self: Path, *args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "unlink", read_only_unlink)
    monkeypatch.setattr(Path, "open", read_only_open)
    with caplog.at_level(logging.WARNING):
        problem = store.write_problem(staging)
        store.discard(staging)
    assert problem is not None
    assert problem.disk_problem == "cache_dir_not_writable"
    assert "Cannot remove" not in caplog.text


def test_disk_problem_checks_the_disk_and_the_budget(
    store: PromptCacheStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """disk_problem answers as a build would: the disk first, then the budget."""
    build(store, data=b"x" * 200_000)
    assert store.disk_problem(MODEL, "notes", 10**9, "auto_") is None  # no budget
    store.budget_bytes = 500_000
    refused = store.disk_problem(MODEL, "notes", 400_000, "auto_")
    assert isinstance(refused, CacheBudgetExceeded)
    assert refused.needed_bytes == 400_000
    assert store.disk_problem(MODEL, "notes", 200_000, "auto_") is None
    assert store.disk_problem("Not built yet", "system", 0, "auto_") is None
    monkeypatch.setattr(
        prompt_cache_module, "free_bytes", lambda _folder: 1_000_000
    )  # under 16 MB free: the disk counts as full
    full = store.disk_problem(MODEL, "notes", 0, "auto_")
    assert full is not None
    assert full.disk_problem == "cache_disk_full"
