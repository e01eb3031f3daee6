"""Full and read-only cache disks, on a real (tiny tmpfs) file system.

The cache folder is a tmpfs mounted for the test: filling it gives the runtime and
us real ENOSPC errors, remounting it read-only real EROFS errors. Without the
privilege to mount, these tests are skipped.
"""

from collections.abc import Iterator
from datetime import timedelta
import errno
import logging
import os
from pathlib import Path
import subprocess

import pytest
from pytest_homeassistant_custom_component.common import async_fire_time_changed

from custom_components.rockchip_llm.cache_repair import DISK_RECHECK_INTERVAL
from custom_components.rockchip_llm.const import DOMAIN, REBUILD_DEBOUNCE_SECONDS
from homeassistant.components import conversation
from homeassistant.config_entries import ConfigEntryState
from homeassistant.core import Context, HomeAssistant
from homeassistant.exceptions import HomeAssistantError, ServiceValidationError
from homeassistant.helpers import issue_registry as ir
from homeassistant.util import dt as dt_util

from .conftest import EntryFactory, ModelWriter, agent_issue_error

AGENT = "conversation.agent_0"


class Disk:
    """A tmpfs mounted on the cache folder."""

    def __init__(self, path: Path) -> None:
        """Remember the mount point."""
        self.path = path
        self.filler = path / "filler"

    def mount(self, size: str) -> bool:
        """Mount a tmpfs of size; False when not permitted."""
        self.path.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(self.path)],
            check=False,
            capture_output=True,
        )
        return result.returncode == 0

    def fill(self) -> None:
        """Write a file until the disk is full."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            with pytest.raises(OSError) as err:  # noqa: PT012 - write until full
                while True:
                    os.write(fd, b"\0" * 4096)
            assert err.value.errno == errno.ENOSPC
        finally:
            os.close(fd)

    def free(self) -> None:
        """Remove the filler."""
        self.filler.unlink()

    def resize(self, size: str) -> None:
        """Grow or shrink the tmpfs."""
        subprocess.run(
            ["mount", "-o", f"remount,size={size}", str(self.path)], check=True
        )

    def read_only(self, read_only: bool) -> None:
        """Remount read-only or read-write."""
        mode = "ro" if read_only else "rw"
        subprocess.run(["mount", "-o", f"remount,{mode}", str(self.path)], check=True)

    def unmount(self) -> None:
        """Unmount (lazily: a mapped library copy may still be open)."""
        subprocess.run(["umount", "-l", str(self.path)], check=True)


@pytest.fixture
def disk(cache_dir: Path) -> Iterator[Disk]:
    """The cache folder on a 4 MB tmpfs."""
    disk = Disk(cache_dir)
    if not disk.mount("4m"):
        pytest.skip("mounting a tmpfs needs CAP_SYS_ADMIN")
    try:
        yield disk
    finally:
        disk.unmount()


def cache_issue(hass: HomeAssistant, entry_id: str) -> ir.IssueEntry | None:
    """The disk repair of the entry."""
    return ir.async_get(hass).async_get_issue(DOMAIN, f"cache_dir_{entry_id}")


async def answer(hass: HomeAssistant) -> str:
    """Ask the agent something and return the answer."""
    result = await conversation.async_converse(
        hass, "hello", None, Context(), agent_id=AGENT
    )
    return str(result.response.speech["plain"]["speech"])


async def test_full_disk_runtime_save(
    hass: HomeAssistant, make_entry: EntryFactory, disk: Disk, cache_dir: Path
) -> None:
    """The runtime cannot save a cache on a full disk: a true message and a repair."""
    entry = await make_entry()
    folder = cache_dir / "Qwen3 Sim"
    old = await hass.async_add_executor_job((folder / "system.json").read_bytes)
    await hass.async_add_executor_job(disk.fill)
    with pytest.raises(HomeAssistantError) as err:
        await hass.services.async_call(
            DOMAIN, "rebuild_cache", {"agent": AGENT}, blocking=True
        )
    assert err.value.translation_key == "cache_disk_full"
    message = str(err.value)
    assert message == (
        f"The prompt cache of model Qwen3 Sim could not be written: the disk holding "
        f"{folder} is full (0.0 MB free). Free disk space or lower the cache budget"
    )
    issue = cache_issue(hass, entry.entry_id)
    assert issue is not None
    assert issue.translation_key == "cache_disk_full"
    assert issue.translation_placeholders is not None
    assert issue.translation_placeholders["path"] == str(folder)
    assert issue.translation_placeholders["free"] == "0.0 MB"
    assert "No space left on device" in issue.translation_placeholders["error"]
    # Nothing lost: the old cache serves, no temp files are left behind.
    assert await hass.async_add_executor_job((folder / "system.json").read_bytes) == old
    assert sorted(p.name for p in folder.iterdir()) == ["system.bin", "system.json"]
    assert await answer(hass) == "Hello from the simulator."
    loaded = next(iter(entry.runtime_data.agents.values())).session
    assert loaded.recent[-1].cache == "system"
    # Space is back: the next write clears the repair.
    await hass.async_add_executor_job(disk.free)
    await hass.services.async_call(
        DOMAIN, "rebuild_cache", {"agent": AGENT}, blocking=True
    )
    assert cache_issue(hass, entry.entry_id) is None


async def test_read_only_disk_with_stale_cache(
    hass: HomeAssistant, make_entry: EntryFactory, disk: Disk, cache_dir: Path
) -> None:
    """A stale cache on a read-only disk: the entry loads, a repair says why."""
    entry = await make_entry()
    folder = cache_dir / "Qwen3 Sim"
    await hass.async_add_executor_job(disk.read_only, True)
    subentry = next(iter(entry.subentries.values()))
    hass.config_entries.async_update_subentry(
        entry, subentry, data={**subentry.data, "prompt": "Be brief."}
    )
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.LOADED
    issue = cache_issue(hass, entry.entry_id)
    assert issue is not None
    assert issue.translation_key == "cache_dir_not_writable"
    assert issue.translation_placeholders is not None
    assert issue.translation_placeholders["path"] == str(folder)
    assert "Read-only file system" in issue.translation_placeholders["error"]
    assert await answer(hass) == "Hello from the simulator."
    with pytest.raises(HomeAssistantError) as err:
        await hass.services.async_call(
            DOMAIN,
            "create_cache",
            {"model": "Qwen3 Sim", "name": "head", "prompt": "Be"},
            blocking=True,
        )
    assert err.value.translation_key == "cache_dir_not_writable"
    assert str(err.value).startswith(
        f"The prompt cache of model Qwen3 Sim could not be written: {folder} is not "
        "writable ("
    )
    assert "context length" not in str(err.value)
    await hass.async_add_executor_job(disk.read_only, False)
    await hass.services.async_call(
        DOMAIN, "rebuild_cache", {"agent": AGENT}, blocking=True
    )
    assert cache_issue(hass, entry.entry_id) is None
    agent = next(iter(entry.runtime_data.agents.values()))
    assert agent.system_cache.cache is not None
    assert await answer(hass) == "Hello from the simulator."


async def test_context_hint_only_when_context_is_the_cause(
    hass: HomeAssistant, make_entry: EntryFactory, write_model: ModelWriter
) -> None:
    """A system prompt longer than the context gets its own repair; other failures not.

    Either way only the agent is reported (a repair); the entry stays up. The
    prompt's repair has the numbers and a fix flow (tools, context, exposure).
    """
    entry = await make_entry({"max_context_len": 256})
    assert entry.state is ConfigEntryState.LOADED
    issues = [
        issue
        for (domain, _id), issue in ir.async_get(hass).issues.items()
        if domain == DOMAIN and issue.translation_key == "prefix_does_not_fit"
    ]
    assert len(issues) == 1
    assert issues[0].is_fixable
    assert issues[0].translation_placeholders is not None
    assert issues[0].translation_placeholders["max_context_len"] == "256"
    await hass.config_entries.async_remove(entry.entry_id)

    write_model(extra=("error_at_token 0",))
    entry = await make_entry()
    assert entry.state is ConfigEntryState.LOADED
    error = agent_issue_error(hass)
    assert "the runtime reported an error" in error
    assert "context length" not in error


async def test_library_copy_on_full_disk(
    hass: HomeAssistant, make_entry: EntryFactory, disk: Disk, cache_dir: Path
) -> None:
    """No room for the library copy: setup is retried, no partial copy stays."""
    private = cache_dir / ".runtime"
    private.mkdir()
    (private / ".librkllmrt-0123.so.tmp-99").write_bytes(b"left by a crash")
    await hass.async_add_executor_job(disk.resize, "64k")  # the library is ~145 kB
    entry = await make_entry()
    assert entry.state is ConfigEntryState.SETUP_RETRY
    assert (entry.reason or "").startswith(
        f"The RKLLM runtime library could not be copied into {private}: cannot copy "
    )
    assert "No space left on device" in (entry.reason or "")
    assert [p.name for p in private.iterdir()] == []
    issue = cache_issue(hass, entry.entry_id)
    assert issue is not None
    assert issue.translation_key == "cache_disk_full"
    assert issue.translation_placeholders is not None
    assert issue.translation_placeholders["path"] == str(private)
    # Room again: the retry loads and the repair is gone.
    await hass.async_add_executor_job(disk.resize, "4m")
    await hass.config_entries.async_reload(entry.entry_id)
    assert entry.state is ConfigEntryState.LOADED
    assert cache_issue(hass, entry.entry_id) is None
    assert [p.suffix for p in private.iterdir()] == [".so"]


def free_plenty(disk: Disk) -> None:
    """Free the disk as a user would: more than the 16 MB a cache may need."""
    disk.free()
    disk.resize("64m")


async def test_disk_repair_withdrawn_when_space_is_freed(
    hass: HomeAssistant, make_entry: EntryFactory, disk: Disk, cache_dir: Path
) -> None:
    """No write needed: a check on a timer finds the space back, and the cache is built.

    While the disk stays full, the check keeps the repair.
    """
    entry = await make_entry()
    folder = cache_dir / "Qwen3 Sim"

    def lose_cache_and_fill() -> None:
        for name in ("system.bin", "system.json"):
            (folder / name).unlink()
        disk.fill()

    await hass.async_add_executor_job(lose_cache_and_fill)
    assert await hass.config_entries.async_reload(entry.entry_id)
    await hass.async_block_till_done(wait_background_tasks=True)
    assert entry.state is ConfigEntryState.LOADED
    issue = cache_issue(hass, entry.entry_id)
    assert issue is not None and issue.translation_key == "cache_disk_full"
    agent = next(iter(entry.runtime_data.agents.values()))
    assert agent.system_cache.cache is None
    assert await answer(hass) == "Hello from the simulator."  # without its cache

    later = dt_util.utcnow() + DISK_RECHECK_INTERVAL + timedelta(seconds=1)
    async_fire_time_changed(hass, later)
    await hass.async_block_till_done(wait_background_tasks=True)
    assert cache_issue(hass, entry.entry_id) is not None  # still full

    await hass.async_add_executor_job(free_plenty, disk)
    later += DISK_RECHECK_INTERVAL + timedelta(seconds=1)
    async_fire_time_changed(hass, later)
    await hass.async_block_till_done(wait_background_tasks=True)
    assert cache_issue(hass, entry.entry_id) is None
    # The missing system cache is built (debounced) now that the disk takes it.
    async_fire_time_changed(
        hass, later + timedelta(seconds=REBUILD_DEBOUNCE_SECONDS + 1)
    )
    await hass.async_block_till_done(wait_background_tasks=True)
    assert agent.system_cache.cache is not None
    assert await hass.async_add_executor_job((folder / "system.bin").exists)


async def test_disk_repair_checked_again_by_a_reload(
    hass: HomeAssistant, make_entry: EntryFactory, disk: Disk
) -> None:
    """A reload keeps the repair while the disk is full and withdraws it once it is not.

    The reload writes nothing (the system cache is loaded): the disk is asked.
    """
    entry = await make_entry()
    await hass.async_add_executor_job(disk.fill)
    with pytest.raises(HomeAssistantError):
        await hass.services.async_call(
            DOMAIN, "rebuild_cache", {"agent": AGENT}, blocking=True
        )
    assert await hass.config_entries.async_reload(entry.entry_id)
    assert cache_issue(hass, entry.entry_id) is not None
    await hass.async_add_executor_job(free_plenty, disk)
    assert await hass.config_entries.async_reload(entry.entry_id)
    assert cache_issue(hass, entry.entry_id) is None
    assert await answer(hass) == "Hello from the simulator."


async def test_delete_on_a_read_only_disk(
    hass: HomeAssistant,
    make_entry: EntryFactory,
    disk: Disk,
    cache_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A refused delete says it could not delete and why; the repair goes at the next look.

    No warnings about files that were never written.
    """
    entry = await make_entry()
    folder = cache_dir / "Qwen3 Sim"
    await hass.services.async_call(
        DOMAIN,
        "create_cache",
        {"model": "Qwen3 Sim", "name": "notes", "prompt": "Take notes."},
        blocking=True,
    )
    await hass.async_add_executor_job(disk.read_only, True)
    with caplog.at_level(logging.WARNING):
        with pytest.raises(HomeAssistantError) as err:
            await hass.services.async_call(
                DOMAIN,
                "delete_cache",
                {"model": "Qwen3 Sim", "name": "notes"},
                blocking=True,
            )
        with pytest.raises(HomeAssistantError):
            await hass.services.async_call(
                DOMAIN, "rebuild_cache", {"agent": AGENT}, blocking=True
            )
    assert not isinstance(err.value, ServiceValidationError)  # not the caller's
    assert err.value.translation_key == "cache_delete_not_writable"
    assert str(err.value) == (
        f'The prompt cache "notes" of model Qwen3 Sim could not be deleted: {folder} '
        "is not writable (Read-only file system). Make the folder writable (is the "
        "disk read-only?) and try again"
    )
    assert "could not be written" not in str(err.value)
    assert "Cannot remove" not in caplog.text
    issue = cache_issue(hass, entry.entry_id)
    assert issue is not None and issue.translation_key == "cache_dir_not_writable"
    assert await hass.async_add_executor_job((folder / "notes.bin").exists)
    await hass.async_add_executor_job(disk.read_only, False)
    await hass.async_add_executor_job(disk.resize, "64m")  # 16 MB free count as room
    await hass.services.async_call(
        DOMAIN, "list_caches", {}, blocking=True, return_response=True
    )
    assert cache_issue(hass, entry.entry_id) is None
    await hass.services.async_call(
        DOMAIN, "delete_cache", {"model": "Qwen3 Sim", "name": "notes"}, blocking=True
    )
    assert not await hass.async_add_executor_job((folder / "notes.bin").exists)
