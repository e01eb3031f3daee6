"""Tests for model discovery from the folder layout."""

from collections.abc import Callable, Iterator
import hashlib
import logging
import os
from pathlib import Path
from typing import Self

import pytest

from custom_components.rockchip_llm.host.model_files import (
    FINGERPRINT_CHUNK,
    ModelInfo,
    ModelsDirError,
    model_fingerprint,
    scan_models,
)

MIB = 1024 * 1024


def write(path: Path, data: bytes = b"model") -> Path:
    """Write a file, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def deny_listing(monkeypatch: pytest.MonkeyPatch, denied: Path) -> None:
    """Make listing ``denied`` fail with PermissionError.

    chmod 000 is used first; when it does not deny reads (tests run as root),
    Path.iterdir is patched for that one path instead.
    """
    denied.chmod(0)
    try:
        list(denied.iterdir())
    except PermissionError:
        return
    real_iterdir = Path.iterdir

    def iterdir(self: Path) -> Iterator[Path]:
        if self == denied:
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)


@pytest.fixture
def restore_modes(tmp_path: Path) -> Iterator[None]:
    """Give every folder its permissions back so tmp_path can be removed."""
    yield
    for folder, _, _ in os.walk(tmp_path):
        Path(folder).chmod(0o755)


def test_empty_dir(models_dir: Path) -> None:
    """An empty models directory gives an empty scan."""
    scan = scan_models(models_dir)
    assert scan.models == {}
    assert scan.loose_files == ()
    assert scan.unreadable == ()


def test_one_model(models_dir: Path) -> None:
    """A folder with one file is a model named after the folder."""
    path = write(models_dir / "Qwen3 0.6B" / "qwen3.rkllm", b"x" * 123)
    scan = scan_models(models_dir)
    assert scan.models == {
        "Qwen3 0.6B": ModelInfo("Qwen3 0.6B", path, 123, ignored_files=())
    }


def test_models_sorted_case_insensitively(models_dir: Path) -> None:
    """Models are ordered by name, ignoring case."""
    for name in ("beta", "Alpha", "gamma", "Delta"):
        write(models_dir / name / "m.rkllm")
    assert list(scan_models(models_dir).models) == ["Alpha", "beta", "Delta", "gamma"]


def test_several_files_use_first(
    models_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The first file by name is used; the others are listed and warned about."""
    folder = models_dir / "Gemma"
    for name in ("c.rkllm", "B.rkllm", "a.rkllm"):
        write(folder / name)
    with caplog.at_level(logging.WARNING):
        model = scan_models(models_dir).models["Gemma"]
    assert model.path == folder / "a.rkllm"
    assert model.ignored_files == ("B.rkllm", "c.rkllm")
    assert str(folder) in caplog.text
    assert "using a.rkllm" in caplog.text
    assert "B.rkllm, c.rkllm" in caplog.text


def test_loose_files(models_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Model files directly in models_dir are reported with a hint, not used."""
    write(models_dir / "loose.rkllm")
    write(models_dir / "Other.RKLLM")
    write(models_dir / "Good" / "good.rkllm")
    with caplog.at_level(logging.WARNING):
        scan = scan_models(models_dir)
    assert scan.loose_files == ("loose.rkllm", "Other.RKLLM")
    assert list(scan.models) == ["Good"]
    warnings = [r for r in caplog.records if "loose.rkllm" in r.getMessage()]
    assert len(warnings) == 1
    assert (
        f"move each into its own folder: {models_dir}/<name>/<file>"
        in warnings[0].getMessage()
    )


def test_ignored_entries(models_dir: Path) -> None:
    """Hidden folders and files, folders without models and other files are ignored."""
    write(models_dir / ".hidden" / "model.rkllm")
    write(models_dir / "Docs" / "README.md")
    write(models_dir / "Partial" / "model.rkllm.part")
    write(models_dir / "AppleDouble" / "._model.rkllm")
    write(models_dir / "notes.txt")
    (models_dir / "Nested" / "sub.rkllm").mkdir(parents=True)
    (models_dir / "Empty").mkdir()
    scan = scan_models(models_dir)
    assert scan.models == {}
    assert scan.loose_files == ()
    assert scan.unreadable == ()


def test_suffix_is_case_insensitive(models_dir: Path) -> None:
    """MODEL.RKLLM counts as a model file."""
    path = write(models_dir / "Upper" / "MODEL.RKLLM")
    assert scan_models(models_dir).models["Upper"].path == path


def test_folder_named_like_a_model_file(models_dir: Path) -> None:
    """A folder whose name ends with .rkllm is a model folder, not a loose file."""
    path = write(models_dir / "odd.rkllm" / "m.rkllm")
    scan = scan_models(models_dir)
    assert scan.models["odd.rkllm"].path == path
    assert scan.loose_files == ()


def test_symlinks(models_dir: Path, tmp_path: Path) -> None:
    """Symlinks to files count; broken symlinks are skipped without crashing."""
    target = write(tmp_path / "store" / "real.rkllm", b"12345")
    linked = models_dir / "Linked"
    linked.mkdir()
    (linked / "model.rkllm").symlink_to(target)
    broken = models_dir / "Broken"
    broken.mkdir()
    (broken / "a.rkllm").symlink_to(tmp_path / "missing.rkllm")
    (models_dir / "dangling.rkllm").symlink_to(tmp_path / "missing.rkllm")
    (models_dir / "DanglingFolder").symlink_to(tmp_path / "missing_dir")
    scan = scan_models(models_dir)
    assert list(scan.models) == ["Linked"]
    assert scan.models["Linked"].size_bytes == 5
    assert scan.loose_files == ()


def test_broken_symlink_next_to_a_model(models_dir: Path, tmp_path: Path) -> None:
    """A broken symlink sorted first does not hide the real file."""
    folder = models_dir / "Mixed"
    real = write(folder / "b.rkllm")
    (folder / "a.rkllm").symlink_to(tmp_path / "gone.rkllm")
    model = scan_models(models_dir).models["Mixed"]
    assert model.path == real
    assert model.ignored_files == ()


@pytest.mark.usefixtures("restore_modes")
def test_unreadable_folder(
    models_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A folder that cannot be listed is reported, the others still work."""
    write(models_dir / "Locked" / "m.rkllm")
    write(models_dir / "Open" / "m.rkllm")
    deny_listing(monkeypatch, models_dir / "Locked")
    with caplog.at_level(logging.WARNING):
        scan = scan_models(models_dir)
    assert scan.unreadable == ("Locked",)
    assert list(scan.models) == ["Open"]
    assert "Cannot read model folder" in caplog.text
    assert "Locked" in caplog.text


def test_folder_vanishes_during_scan(
    models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder removed between listing and scanning is skipped quietly."""
    gone = models_dir / "Gone"
    write(gone / "m.rkllm")
    write(models_dir / "Stays" / "m.rkllm")
    real_iterdir = Path.iterdir

    def iterdir(self: Path) -> Iterator[Path]:
        if self == gone:
            raise FileNotFoundError(2, "No such file or directory", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    scan = scan_models(models_dir)
    assert list(scan.models) == ["Stays"]
    assert scan.unreadable == ()


def test_folder_renamed(models_dir: Path) -> None:
    """Renaming a folder renames the model on the next scan."""
    write(models_dir / "Old Name" / "m.rkllm")
    assert list(scan_models(models_dir).models) == ["Old Name"]
    (models_dir / "Old Name").rename(models_dir / "New Name")
    model = scan_models(models_dir).models["New Name"]
    assert model.name == "New Name"
    assert model.path == models_dir / "New Name" / "m.rkllm"
    assert "Old Name" not in scan_models(models_dir).models


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda base: base / "missing", "models_dir_missing"),
        (lambda base: write(base / "file") / "below", "models_dir_missing"),
        (lambda base: write(base / "file"), "models_dir_not_dir"),
    ],
    ids=["missing", "below_a_file", "file"],
)
def test_models_dir_unusable(
    tmp_path: Path, make: Callable[[Path], Path], reason: str
) -> None:
    """A missing models_dir or a file raises ModelsDirError with the reason key."""
    path = make(tmp_path)
    with pytest.raises(ModelsDirError) as err:
        scan_models(path)
    assert err.value.reason == reason
    assert err.value.path == path


@pytest.mark.usefixtures("restore_modes")
def test_models_dir_unreadable(
    models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A models_dir that cannot be listed raises models_dir_unreadable."""
    write(models_dir / "Model" / "m.rkllm")
    deny_listing(monkeypatch, models_dir)
    with pytest.raises(ModelsDirError) as err:
        scan_models(models_dir)
    assert err.value.reason == "models_dir_unreadable"


def test_fingerprint_small_file(tmp_path: Path) -> None:
    """A small file is hashed whole; size and mtime come from stat."""
    path = write(tmp_path / "m.rkllm", b"small model")
    os.utime(path, ns=(1_000_000_000, 2_000_000_123))
    assert model_fingerprint(path) == {
        "size": 11,
        "mtime_ns": 2_000_000_123,
        "sha256_head_tail": hashlib.sha256(b"small model").hexdigest(),
    }


def test_fingerprint_changes(tmp_path: Path) -> None:
    """Size, mtime or head bytes each change the fingerprint."""
    path = write(tmp_path / "m.rkllm", b"abcdef")
    os.utime(path, ns=(0, 10**9))
    original = model_fingerprint(path)

    os.utime(path, ns=(0, 2 * 10**9))
    assert model_fingerprint(path)["mtime_ns"] != original["mtime_ns"]

    path.write_bytes(b"Xbcdef")
    os.utime(path, ns=(0, 10**9))
    changed = model_fingerprint(path)
    assert changed["size"] == original["size"]
    assert changed["sha256_head_tail"] != original["sha256_head_tail"]

    path.write_bytes(b"abcdefg")
    os.utime(path, ns=(0, 10**9))
    assert model_fingerprint(path)["size"] == 7


def sparse_model(path: Path, size: int, patches: dict[int, bytes]) -> Path:
    """Create a sparse file of ``size`` bytes with some bytes written."""
    with path.open("wb") as file:
        file.truncate(size)
        for offset, data in patches.items():
            file.seek(offset)
            file.write(data)
    os.utime(path, ns=(0, 10**9))
    return path


def test_fingerprint_large_file_hashes_head_and_tail(tmp_path: Path) -> None:
    """Large files: only the first and last chunk are hashed."""
    size = 3 * MIB + 17
    head = b"H" * 10
    tail = b"T" * 10
    a = sparse_model(tmp_path / "a", size, {0: head, size - 10: tail})
    b = sparse_model(tmp_path / "b", size, {0: head, size - 10: tail, MIB + 5: b"mid"})
    c = sparse_model(tmp_path / "c", size, {0: head, size - 10: b"changed!!!"})
    data = a.read_bytes()
    expected = hashlib.sha256(
        data[:FINGERPRINT_CHUNK] + data[-FINGERPRINT_CHUNK:]
    ).hexdigest()
    assert model_fingerprint(a)["sha256_head_tail"] == expected
    assert model_fingerprint(b) == model_fingerprint(a)
    assert model_fingerprint(c) != model_fingerprint(a)


def test_fingerprint_reads_only_head_and_tail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No more than two chunks are read from a large file."""
    path = sparse_model(tmp_path / "big", 64 * MIB, {})
    real_open = Path.open
    read_sizes: list[int] = []

    class Spy:
        def __init__(self, file: object) -> None:
            self._file = file

        def __getattr__(self, name: str) -> object:
            return getattr(self._file, name)

        def __enter__(self) -> Self:
            return self

        def __exit__(self, *args: object) -> None:
            self._file.close()  # type: ignore[attr-defined]

        def read(self, size: int = -1) -> bytes:
            data: bytes = self._file.read(size)  # type: ignore[attr-defined]
            read_sizes.append(len(data))
            return data

    monkeypatch.setattr(
        Path, "open", lambda self, *a, **kw: Spy(real_open(self, *a, **kw))
    )
    model_fingerprint(path)
    assert sum(read_sizes) == 2 * FINGERPRINT_CHUNK


def test_fingerprint_missing_file(tmp_path: Path) -> None:
    """OSError goes through to the caller."""
    with pytest.raises(FileNotFoundError):
        model_fingerprint(tmp_path / "missing.rkllm")
