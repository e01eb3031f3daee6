"""The private copy of the runtime library: checked before every load, written durably.

A copy under ``<cache_dir>/.runtime`` that a power cut truncated (or anything else
damaged) must never be mapped: a truncated ELF mapped into a process gives SIGBUS.
These tests damage the copy on disk and check, through /proc/<pid>/maps, that
neither Home Assistant nor the model's worker process ever mapped it. Home
Assistant's own process maps no copy at all: only the workers load the runtime.
"""

import asyncio
from collections.abc import Callable
import errno
import logging
import os
from pathlib import Path
import shutil
import signal
import subprocess
import sys

import pytest
from pytest_homeassistant_custom_component.common import MockConfigEntry

from custom_components.rockchip_llm import session as session_module
from custom_components.rockchip_llm.const import CONF_LIBRARY_PATH, DOMAIN
from custom_components.rockchip_llm.host.rkllm.abi import AbiFamily
from custom_components.rockchip_llm.host.rkllm.errors import (
    LibraryCopyFailed,
    LibraryLoadError,
)
from custom_components.rockchip_llm.host.rkllm.library import (
    git_blob_sha1,
    inspect_library,
    load_copy,
)
from custom_components.rockchip_llm.host.rkllm.probe import verify_and_copy_library
from custom_components.rockchip_llm.host.rkllm.runtime import ModelParams, RunRequest
from custom_components.rockchip_llm.host.rkllm.worker import WorkerModel
from custom_components.rockchip_llm.session import ModelSession
from homeassistant.components import conversation
from homeassistant.config_entries import ConfigEntryState
from homeassistant.core import Context, HomeAssistant
from homeassistant.helpers import intent, issue_registry as ir

from .conftest import REPO, SIM_LIBRARIES, EntryFactory, ModelWriter

AGENT = "conversation.agent_0"


def truncated(data: bytes) -> bytes:
    """The first half, as a power cut during the write leaves it."""
    return data[: len(data) // 2]


def zero_filled(data: bytes) -> bytes:
    """Same size, all zeros, as some file systems leave unwritten blocks."""
    return bytes(len(data))


def flipped(data: bytes) -> bytes:
    """Same size, one byte changed in the middle."""
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]


def mapped_inodes(pid: int | str) -> set[int]:
    """Inodes of the files a process has mapped."""
    lines = Path(f"/proc/{pid}/maps").read_text(encoding="utf-8").splitlines()
    return {int(fields[4]) for fields in map(str.split, lines) if len(fields) > 5}


async def answering_worker(hass: HomeAssistant, entry: MockConfigEntry) -> int:
    """Have the agent answer; return the pid of the worker process that did."""
    result = await conversation.async_converse(
        hass, "hello", None, Context(), agent_id=AGENT
    )
    assert result.response.speech["plain"]["speech"] == "Hello from the simulator."
    pid = next(iter(entry.runtime_data.agents.values())).session.worker.pid
    assert pid is not None
    return pid


@pytest.mark.parametrize(
    "damage", [truncated, zero_filled, flipped], ids=["truncated", "zeros", "flipped"]
)
async def test_damaged_copy_replaced(
    hass: HomeAssistant,
    make_entry: EntryFactory,
    sim_library: Path,
    cache_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    damage: Callable[[bytes], bytes],
) -> None:
    """A damaged copy is logged and replaced, never mapped; the agent answers."""
    original = sim_library.read_bytes()
    private = cache_dir / ".runtime"
    copy = private / f"librkllmrt-{git_blob_sha1(original)}.so"

    def plant() -> int:
        private.mkdir(parents=True)
        copy.write_bytes(damage(original))
        os.link(copy, tmp_path / "bad.so")  # keeps its inode number from reuse
        return copy.stat().st_ino

    bad_inode = await hass.async_add_executor_job(plant)
    with caplog.at_level(logging.WARNING):
        entry = await make_entry()
    assert entry.state is ConfigEntryState.LOADED
    assert f"Replacing the damaged library copy {copy}" in caplog.text
    worker = await answering_worker(hass, entry)

    def check() -> None:
        assert copy.read_bytes() == original
        assert copy.stat().st_ino != bad_inode
        assert [p.name for p in private.iterdir()] == [copy.name]
        assert copy.stat().st_ino in mapped_inodes(worker)
        for pid in ("self", worker):
            assert bad_inode not in mapped_inodes(pid)

    await hass.async_add_executor_job(check)


async def test_copy_written_with_fsync(
    in_process_host: None,
    hass: HomeAssistant,
    make_entry: EntryFactory,
    cache_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The new copy is flushed before the rename, its folder after it."""
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        target = os.readlink(f"/proc/self/fd/{fd}")
        if ".runtime" in target:
            synced.append(target)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    entry = await make_entry()
    assert entry.state is ConfigEntryState.LOADED
    private = cache_dir / ".runtime"
    [copy] = await hass.async_add_executor_job(list, private.iterdir())
    assert len(synced) == 2
    assert Path(synced[0]).name.startswith(f".{copy.name}.tmp-")
    assert synced[1] == str(private)


async def test_intact_copy_kept(
    hass: HomeAssistant, make_entry: EntryFactory, cache_dir: Path
) -> None:
    """An intact copy from an earlier start is loaded as it is."""

    def inodes() -> list[int]:
        return [p.stat().st_ino for p in (cache_dir / ".runtime").iterdir()]

    entry = await make_entry()
    first = await hass.async_add_executor_job(inodes)
    await hass.config_entries.async_reload(entry.entry_id)
    assert entry.state is ConfigEntryState.LOADED
    assert await hass.async_add_executor_job(inodes) == first


def test_damaged_copy_refused_at_load(sim_library: Path, tmp_path: Path) -> None:
    """load_copy checks the copy (as every worker does) before mapping it."""
    info = inspect_library(sim_library)
    copy = tmp_path / "copy.so"
    copy.write_bytes(flipped(sim_library.read_bytes()))
    with pytest.raises(LibraryLoadError, match=r"does not match .* content differs"):
        load_copy(copy, info)
    assert copy.stat().st_ino not in mapped_inodes("self")
    shutil.copyfile(sim_library, copy)
    assert load_copy(copy, info).info == info
    assert copy.stat().st_ino in mapped_inodes("self")


def test_worker_runs_the_copy_after_the_original_changed(
    sim_library: Path, tmp_path: Path, write_model: ModelWriter
) -> None:
    """A worker started after cp over the original still runs the checked copy."""
    original = tmp_path / "librkllmrt.so"
    shutil.copyfile(sim_library, original)
    verified = verify_and_copy_library(original, tmp_path / "private")
    with original.open("r+b") as file:  # what cp does: same inode, new bytes
        file.write(bytes(original.stat().st_size))
    worker = WorkerModel(verified, "m")
    try:
        worker.init(ModelParams(model_path=write_model())).result(timeout=30)
        pieces: list[str] = []
        worker.run(RunRequest(prompt="hello"), pieces.append).result(timeout=30)
    finally:
        worker.close()
    assert "".join(pieces) == "Hello from the simulator."


def test_copy_not_flushed(
    sim_library: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy whose flush fails (disk full) is not renamed into place."""
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if ".tmp-" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    private = tmp_path / "private"
    with pytest.raises(LibraryCopyFailed, match="No space left on device") as err:
        verify_and_copy_library(sim_library, private)
    assert err.value.os_error.errno == errno.ENOSPC
    assert list(private.iterdir()) == []


async def test_copy_damaged_while_running(
    hass: HomeAssistant,
    make_entry: EntryFactory,
    sim_library: Path,
    cache_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A copy damaged while the model runs is copied again at the next worker start.

    No reload: the next request after the worker's death answers, from a copy
    equal to the original again, and no repair is raised.
    """
    monkeypatch.setattr(session_module, "RESTART_BACKOFF_S", (0.0, 0.0, 0.0, 0.0))
    entry = await make_entry()
    loaded = next(iter(entry.runtime_data.agents.values())).session
    original = sim_library.read_bytes()
    copy = cache_dir / ".runtime" / f"librkllmrt-{git_blob_sha1(original)}.so"
    await hass.async_add_executor_job(replace_with, copy, truncated(original))
    await kill_worker(loaded)
    with caplog.at_level(logging.WARNING):
        result = await conversation.async_converse(
            hass, "hello", None, Context(), agent_id=AGENT
        )
    assert result.response.speech["plain"]["speech"] == "Hello from the simulator."
    assert f"Replacing the damaged library copy {copy}" in caplog.text
    assert await hass.async_add_executor_job(copy.read_bytes) == original
    assert library_issue(hass, entry) is None
    assert entry.state is ConfigEntryState.LOADED


async def test_copy_and_original_changed_while_running(
    hass: HomeAssistant,
    make_entry: EntryFactory,
    sim_library: Path,
    abi_family: AbiFamily,
    cache_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A damaged copy of an original that changed too: a repair says so, a reload fixes it.

    The new original is not copied behind the user's back: it was never checked.
    The spoken answer is one sentence; the reload checks the new library.
    """
    monkeypatch.setattr(session_module, "RESTART_BACKOFF_S", (0.0, 0.0, 0.0, 0.0))
    library = tmp_path / "lib" / "librkllmrt.so"
    await hass.async_add_executor_job(install_copy, sim_library, library)
    entry = await make_entry(setup=False)
    hass.config_entries.async_update_entry(
        entry, data={**entry.data, CONF_LIBRARY_PATH: str(library)}
    )
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    loaded = next(iter(entry.runtime_data.agents.values())).session
    original = sim_library.read_bytes()
    copy = cache_dir / ".runtime" / f"librkllmrt-{git_blob_sha1(original)}.so"
    other = SIM_LIBRARIES[next(f for f in AbiFamily if f is not abi_family)]
    await hass.async_add_executor_job(replace_with, copy, truncated(original))
    await hass.async_add_executor_job(replace_with, library, other.read_bytes())
    await kill_worker(loaded)
    result = await conversation.async_converse(
        hass, "hello", None, Context(), agent_id=AGENT
    )
    assert result.response.response_type is intent.IntentResponseType.ERROR
    assert result.response.speech["plain"]["speech"] == (
        "Sorry, my language model cannot start because its runtime library changed; "
        "reload the Rockchip LLM integration (see Settings, Repairs)"
    )
    issue = library_issue(hass, entry)
    assert issue is not None
    assert issue.translation_key == "library_changed"
    assert issue.translation_placeholders is not None
    assert issue.translation_placeholders["path"] == str(library)
    assert (
        "is no longer the library that was checked"
        in (issue.translation_placeholders["error"])
    )
    assert not await hass.async_add_executor_job(
        lambda: any(p.read_bytes() == other.read_bytes() for p in copy.parent.iterdir())
    )
    assert await hass.config_entries.async_reload(entry.entry_id)
    result = await conversation.async_converse(
        hass, "hello", None, Context(), agent_id=AGENT
    )
    assert result.response.speech["plain"]["speech"] == "Hello from the simulator."
    assert library_issue(hass, entry) is None


def replace_with(path: Path, data: bytes) -> None:
    """Write a new file and rename it over path (a mapping of the old one stays intact)."""
    staged = path.with_name("staged")
    staged.write_bytes(data)
    staged.replace(path)


def install_copy(source: Path, library: Path) -> None:
    """Put a library of its own at library (the test changes it later)."""
    library.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, library)


async def kill_worker(loaded: ModelSession) -> None:
    """Kill the model's worker process and wait until its death is known."""
    pid = loaded.worker.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    while loaded.worker.death is None:
        await asyncio.sleep(0.01)


def library_issue(hass: HomeAssistant, entry: MockConfigEntry) -> ir.IssueEntry | None:
    """The library repair of the entry."""
    return ir.async_get(hass).async_get_issue(DOMAIN, f"library_{entry.entry_id}")


def test_damaged_copy_moved_aside(
    sim_library: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A damaged copy that cannot be deleted is moved aside, not loaded."""
    original = sim_library.read_bytes()
    private = tmp_path / "private"
    private.mkdir()
    copy = private / f"librkllmrt-{git_blob_sha1(original)}.so"
    copy.write_bytes(zero_filled(original))
    real_unlink = Path.unlink

    def unlink(path: Path, missing_ok: bool = False) -> None:
        if path == copy and path.read_bytes() != original:
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), str(path))
        real_unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    verified = verify_and_copy_library(sim_library, private)
    assert verified.copy == copy
    assert copy.read_bytes() == original
    [moved] = [p for p in private.iterdir() if p != copy]
    assert moved.name.startswith(f"{copy.name}.moved-")
    assert moved.read_bytes() == zero_filled(original)


async def test_home_assistant_never_maps_the_library(
    hass: HomeAssistant,
    make_entry: EntryFactory,
    sim_library: Path,
    cache_dir: Path,
    tmp_path: Path,
) -> None:
    """Only the worker maps the runtime: Home Assistant's process maps neither file.

    The library is a copy of the simulator of its own (the tests map the built
    simulator themselves), so any mapping of it in this process is the integration's.
    """
    library = tmp_path / "lib" / "librkllmrt.so"

    def install() -> None:
        library.parent.mkdir()
        shutil.copyfile(sim_library, library)

    await hass.async_add_executor_job(install)
    entry = await make_entry(setup=False)
    hass.config_entries.async_update_entry(
        entry, data={**entry.data, CONF_LIBRARY_PATH: str(library)}
    )
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    worker = await answering_worker(hass, entry)

    def check() -> None:
        [copy] = (cache_dir / ".runtime").iterdir()
        files = {library, copy}
        assert copy.stat().st_ino in mapped_inodes(worker)  # the check can see it
        maps = Path("/proc/self/maps").read_text(encoding="utf-8")
        assert not [path for path in files if str(path) in maps]
        inodes = mapped_inodes("self")
        assert not [path for path in files if path.stat().st_ino in inodes]

    await hass.async_add_executor_job(check)


CUT_DURING_INSPECTION = """
import sys
from pathlib import Path
from custom_components.rockchip_llm.host.rkllm import library

path = Path(sys.argv[1])
hash_blob = library.git_blob_sha1

def cut_then_hash(data):
    with path.open("r+b") as file:
        file.truncate(4096)
    return hash_blob(data)

library.git_blob_sha1 = cut_then_hash
print(library.inspect_library(path).size)
"""


def test_library_cut_short_while_inspected(sim_library: Path, tmp_path: Path) -> None:
    """A library truncated while it is read (a copy over it) cannot crash HA with SIGBUS.

    Run in a child: a mapped file read past its new end kills the process.
    """
    library = tmp_path / "librkllmrt.so"
    shutil.copyfile(sim_library, library)
    size = library.stat().st_size
    child = subprocess.run(
        [sys.executable, "-c", CUT_DURING_INSPECTION, str(library)],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
        timeout=60,
    )
    assert child.returncode == 0, child.stderr
    assert int(child.stdout) == size  # the bytes read before the cut
    assert library.stat().st_size == 4096
