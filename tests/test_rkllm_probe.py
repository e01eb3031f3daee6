"""Trying a library in a child process first: a crash is an error, not a dead HA."""

from collections.abc import Callable
import os
from pathlib import Path
import shutil
import subprocess
import sys
from typing import Any
from unittest.mock import patch

import pytest

from custom_components.rockchip_llm.const import (
    CONF_ABI_FAMILY,
    CONF_CACHE_DIR,
    CONF_LIBRARY_PATH,
    CONF_MODELS_DIR,
    DOMAIN,
)
from custom_components.rockchip_llm.host.rkllm import probe
from custom_components.rockchip_llm.host.rkllm.abi import AbiFamily
from custom_components.rockchip_llm.host.rkllm.errors import (
    LibraryCopyFailed,
    LibraryCrashed,
    LibraryError,
    LibraryLoadError,
    LibraryNotFound,
    MissingSymbols,
    NotASharedLibrary,
    UnknownRuntimeVersion,
    UnsupportedRuntime,
)
from custom_components.rockchip_llm.host.rkllm.library import (
    VersionSource,
    inspect_library,
)
from custom_components.rockchip_llm.host.rkllm.probe import (
    probe_library,
    verify_and_copy_library,
    verify_library,
)
from homeassistant import config_entries
from homeassistant.components import conversation
from homeassistant.config_entries import ConfigEntryState
from homeassistant.core import Context, HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
from homeassistant.setup import async_setup_component

from .conftest import SIM_BUILD, SIM_LIBRARIES, EntryFactory, ModelWriter

CRASH_LIBRARY = SIM_BUILD / "librkllm_sim_crash.so"
"""Its constructor raises SIGSEGV: never dlopen it in this process."""

RealRun = Callable[..., subprocess.CompletedProcess[bytes]]


@pytest.fixture(autouse=True)
def fresh_verdicts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start every test with an empty verdict cache."""
    monkeypatch.setattr(probe, "_verdicts", {})


@pytest.fixture
def spawned(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Record every child process the probe starts (they still run)."""
    commands: list[list[str]] = []
    real_run: RealRun = subprocess.run

    def run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        commands.append(command)
        return real_run(command, **kwargs)

    monkeypatch.setattr(probe.subprocess, "run", run)
    return commands


def fake_child(monkeypatch: pytest.MonkeyPatch, *command: str) -> None:
    """Make the probe run command instead of the real child."""
    monkeypatch.setattr(probe, "_child_command", lambda *_args: list(command))


def python(code: str) -> tuple[str, ...]:
    """A child command that runs code."""
    return (sys.executable, "-I", "-c", code)


def test_crash_is_an_error(spawned: list[list[str]], tmp_path: Path) -> None:
    """A library that segfaults on load kills the child, not this process."""
    with pytest.raises(LibraryCrashed) as err:
        verify_library(CRASH_LIBRARY)
    assert str(err.value) == (
        f"loading {CRASH_LIBRARY} crashed the test process (SIGSEGV); "
        "it would have crashed Home Assistant"
    )
    assert err.value.translation_key == "library_crashed"
    assert err.value.placeholders["signal"] == "SIGSEGV"
    assert len(spawned) == 1
    # Still alive, and a crash is not remembered: the next attempt probes again.
    with pytest.raises(LibraryCrashed, match="SIGSEGV"):
        verify_and_copy_library(CRASH_LIBRARY, tmp_path / "private")
    assert len(spawned) == 2


def test_good_library(sim_library: Path, abi_family: AbiFamily) -> None:
    """The child finds what inspecting the file in this process finds."""
    info = probe_library(sim_library)
    assert info == inspect_library(sim_library)
    assert info.family is abi_family


def test_verify_and_copy_library(
    sim_library: Path, abi_family: AbiFamily, tmp_path: Path
) -> None:
    """After the check a private copy is made for the workers; nothing is loaded here."""
    private = tmp_path / "private"
    verified = verify_and_copy_library(sim_library, private)
    assert verified.info == inspect_library(sim_library)
    assert verified.info.family is abi_family
    assert verified.simulated
    [copy] = private.iterdir()
    assert verified.copy == copy
    assert copy.name == f"librkllmrt-{verified.info.blob_sha1}.so"
    assert copy.read_bytes() == sim_library.read_bytes()
    assert str(copy) not in Path("/proc/self/maps").read_text(encoding="utf-8")


def test_original_overwritten_in_place_after_the_copy(tmp_path: Path) -> None:
    """cp over the original library does not touch the private copy."""
    original = tmp_path / "librkllmrt.so"
    shutil.copy(SIM_LIBRARIES[AbiFamily.V1_3], original)
    verified = verify_and_copy_library(original, tmp_path / "private")
    with original.open("r+b") as file:  # what cp does: same inode, new bytes
        file.write(b"\0" * original.stat().st_size)
    assert verified.copy.read_bytes() == SIM_LIBRARIES[AbiFamily.V1_3].read_bytes()
    # A new version of the library gets its own copy; the old one is removed.
    shutil.copy(SIM_LIBRARIES[AbiFamily.V1_2], tmp_path / "new.so")
    newer = verify_and_copy_library(tmp_path / "new.so", tmp_path / "private")
    assert [p.name for p in (tmp_path / "private").iterdir()] == [
        f"librkllmrt-{newer.info.blob_sha1}.so"
    ]


def test_private_copy_failure(sim_library: Path, tmp_path: Path) -> None:
    """A private folder that cannot be written is a clear load error."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(LibraryCopyFailed, match="cannot copy"):
        verify_and_copy_library(sim_library, blocker / "private")


def test_text_file(tmp_path: Path) -> None:
    """Refusals cross the process boundary as their own class."""
    path = tmp_path / "librkllmrt.so"
    path.write_text("not a library")
    with pytest.raises(NotASharedLibrary, match="not an ELF shared library") as err:
        probe_library(path)
    assert err.value.placeholders == {
        "error": f"{path} is not an ELF shared library",
        "path": str(path),
    }


def test_old_runtime() -> None:
    """An old runtime keeps its message and placeholders."""
    with pytest.raises(
        UnsupportedRuntime, match=r"1\.1\.4 is too old; install runtime 1\.2\.1"
    ) as err:
        probe_library(SIM_BUILD / "librkllm_sim_1_1.so")
    assert err.value.placeholders["version"] == "1.1.4"


def test_missing_symbol() -> None:
    """A missing function is named."""
    with pytest.raises(MissingSymbols, match="rkllm_abort") as err:
        probe_library(SIM_BUILD / "librkllm_sim_missing_symbol.so")
    assert err.value.placeholders["symbols"] == "rkllm_abort"


def test_missing_file(tmp_path: Path, spawned: list[list[str]]) -> None:
    """A missing file is reported without starting a child."""
    with pytest.raises(LibraryNotFound, match="does not exist"):
        verify_library(tmp_path / "librkllmrt.so")
    assert spawned == []


def test_verdict_cached_per_file_version(
    tmp_path: Path, spawned: list[list[str]]
) -> None:
    """The same file is probed once; a changed file is probed again."""
    path = tmp_path / "librkllmrt.so"
    shutil.copy(SIM_LIBRARIES[AbiFamily.V1_3], path)
    first = verify_library(path)
    assert verify_library(path) == first
    assert verify_and_copy_library(path, tmp_path / "private").info == first
    assert len(spawned) == 1

    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    second = verify_library(path)
    assert len(spawned) == 2
    assert second.mtime_ns == first.mtime_ns + 1_000_000_000
    assert len(probe._verdicts) == 1  # the old version's verdict is dropped

    shutil.copy(SIM_LIBRARIES[AbiFamily.V1_2], path)
    assert verify_library(path).family is AbiFamily.V1_2
    assert len(spawned) == 3


def test_cached_path_is_the_callers(tmp_path: Path, spawned: list[list[str]]) -> None:
    """A cached verdict reached through a symlink carries the path asked for."""
    link = tmp_path / "librkllmrt.so"
    link.symlink_to(SIM_LIBRARIES[AbiFamily.V1_3])
    assert (
        verify_library(SIM_LIBRARIES[AbiFamily.V1_3]).path
        == SIM_LIBRARIES[AbiFamily.V1_3]
    )
    assert verify_library(link).path == link
    assert len(spawned) == 1


def test_refusal_cached(tmp_path: Path, spawned: list[list[str]]) -> None:
    """A refusal that depends on the file alone is remembered, as a fresh error."""
    path = tmp_path / "librkllmrt.so"
    path.write_text("not a library")
    with pytest.raises(NotASharedLibrary) as first:
        verify_library(path)
    with pytest.raises(NotASharedLibrary) as second:
        verify_library(path)
    assert len(spawned) == 1
    assert first.value is not second.value
    assert second.value.placeholders == first.value.placeholders


def test_loader_error_not_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spawned: list[list[str]]
) -> None:
    """A loader refusal may be fixed outside the file: it is probed again."""
    path = tmp_path / "librkllmrt.so"
    path.write_text("x")
    verdict = (
        '{"error": "library_load_failed", "message": "libgomp.so.1: not found", '
        '"placeholders": {"path": "x"}}'
    )
    fake_child(monkeypatch, *python(f"print({verdict!r})"))
    for _ in range(2):
        with pytest.raises(LibraryLoadError, match="libgomp") as err:
            verify_library(path)
        assert err.value.placeholders == {
            "error": "libgomp.so.1: not found",
            "path": "x",
        }
    assert len(spawned) == 2


def test_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spawned: list[list[str]]
) -> None:
    """A child that hangs is killed and reported; the next attempt tries again."""
    path = tmp_path / "librkllmrt.so"
    path.write_text("x")
    fake_child(monkeypatch, "sleep", "5")
    for _ in range(2):
        with pytest.raises(
            LibraryCrashed, match=r"did not finish loading within 0\.2 s"
        ):
            verify_library(path, timeout=0.2)
    assert len(spawned) == 2


def test_default_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a timeout the child gets 20 s."""
    seen: list[float] = []

    def run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        seen.append(kwargs["timeout"])
        raise subprocess.TimeoutExpired(command, kwargs["timeout"])

    monkeypatch.setattr(probe.subprocess, "run", run)
    with pytest.raises(LibraryCrashed, match="within 20 s"):
        probe_library(tmp_path)
    assert seen == [20.0]


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("import os; os.abort()", r"crashed the test process \(SIGABRT\)"),
        (
            "import sys; sys.exit('E RKLLM: no NPU')",
            (
                r"ended the test process with exit status 1 \(E RKLLM: no NPU\); "
                "it would have ended Home Assistant"
            ),
        ),
        ("print('garbage')", r"exit status 0 \(\(no output\)\)"),
    ],
)
def test_death_without_verdict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: str, message: str
) -> None:
    """A child that ends without a verdict is a crash, whatever the cause."""
    fake_child(monkeypatch, *python(code))
    with pytest.raises(LibraryCrashed, match=message):
        probe_library(tmp_path / "librkllmrt.so")


def test_verdict_survives_library_chatter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A verdict is read even if the child ends badly after writing it."""
    code = (
        "import json, sys; print(json.dumps({'error': 'library_not_elf', "
        "'message': 'nope', 'placeholders': {}})); sys.exit(3)"
    )
    fake_child(monkeypatch, *python(code))
    with pytest.raises(NotASharedLibrary, match="nope"):
        probe_library(tmp_path / "librkllmrt.so")


def test_unreadable_verdict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A verdict without the library's details is an error, not a KeyError."""
    fake_child(monkeypatch, *python('print(\'{"version": "1.3.0"}\')'))
    with pytest.raises(LibraryError, match="unreadable verdict"):
        probe_library(tmp_path / "librkllmrt.so")


def test_child_imports_only_the_binding(sim_library: Path) -> None:
    """The child imports the standard library and the binding, never Home Assistant.

    (Not coverage either, unless the test run measures its children.)
    """
    command = probe._child_command(sim_library)
    command[1:1] = ["-X", "importtime"]
    unmeasured = {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_")}
    done = subprocess.run(
        command, capture_output=True, text=True, check=True, env=unmeasured
    )
    modules = {
        line.rsplit("|", 1)[1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    } - {"imported package"}  # the header line
    assert "_rockchip_llm_child_rkllm.library" in modules
    outside = {
        name
        for name in modules
        if name.split(".")[0]
        not in {*sys.stdlib_module_names, "_rockchip_llm_child_rkllm"}
    }
    assert outside == set()
    assert '"version": ' in done.stdout


async def test_config_flow_reports_crash(
    hass: HomeAssistant, tmp_path: Path, models_dir: Path, write_model: ModelWriter
) -> None:
    """The paths form shows library_crashed on the library field."""
    assert await async_setup_component(hass, "homeassistant", {})
    hass.config.config_dir = str(tmp_path)
    write_model()
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": config_entries.SOURCE_USER}
    )
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {"next_step_id": "local"}
    )
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"],
        {
            CONF_LIBRARY_PATH: str(CRASH_LIBRARY),
            CONF_MODELS_DIR: str(models_dir),
            CONF_CACHE_DIR: str(tmp_path / "cache"),
        },
    )
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {CONF_LIBRARY_PATH: "library_crashed"}
    assert "SIGSEGV" in result["description_placeholders"]["error"]


async def test_setup_reports_crash(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """Setting up an entry on a crashing library fails; Home Assistant lives on."""
    entry = await make_entry(setup=False)
    hass.config_entries.async_update_entry(
        entry, data={**entry.data, CONF_LIBRARY_PATH: str(CRASH_LIBRARY)}
    )
    await hass.config_entries.async_setup(entry.entry_id)
    assert entry.state is ConfigEntryState.SETUP_ERROR
    assert entry.error_reason_translation_key == "library_crashed"
    assert "SIGSEGV" in (entry.reason or "")


def test_library_changed_between_check_and_copy(
    sim_library: Path, tmp_path: Path
) -> None:
    """A file swapped after the child's check is not loaded unchecked."""
    private = tmp_path / "private"
    with (
        patch.object(
            probe.shutil, "copyfile", lambda _src, dst: Path(dst).write_bytes(b"other")
        ),
        pytest.raises(LibraryLoadError, match="changed while it was being loaded"),
    ):
        verify_and_copy_library(sim_library, private)
    assert list(private.iterdir()) == []


VENDOR_LIBRARIES = {
    AbiFamily.V1_2: SIM_BUILD / "librkllm_sim_1_2_vendor.so",
    AbiFamily.V1_3: SIM_BUILD / "librkllm_sim_1_3_vendor.so",
}
ODD_LIBRARY = SIM_BUILD / "librkllm_sim_odd.so"
"""No version string, and defaults that match neither family."""


def test_unversioned_build_identified_by_behaviour(
    abi_family: AbiFamily, tmp_path: Path
) -> None:
    """A build with only the format string is recognised from its default params."""
    path = VENDOR_LIBRARIES[abi_family]
    with pytest.raises(UnknownRuntimeVersion):
        inspect_library(path)  # no hash, no version string: the file alone says nothing
    info = verify_library(path)
    assert (info.family, info.version_source, info.version) == (
        abi_family,
        VersionSource.BEHAVIOUR,
        f"{abi_family}.x",
    )
    assert verify_and_copy_library(path, tmp_path / "private").info == info


def test_ambiguous_build_refused_naming_what_was_seen(tmp_path: Path) -> None:
    """Defaults matching neither family: refused, unless the user names the family."""
    with pytest.raises(UnknownRuntimeVersion) as caught:
        verify_library(ODD_LIBRARY)
    assert "enabled_cpus_num 8" in str(caught.value)
    assert "top_k 40" in str(caught.value)
    info = verify_library(ODD_LIBRARY, family_override=AbiFamily.V1_3)
    assert (info.family, info.version_source) == (
        AbiFamily.V1_3,
        VersionSource.OVERRIDE,
    )
    verified = verify_and_copy_library(
        ODD_LIBRARY, tmp_path / "private", family_override=AbiFamily.V1_3
    )
    assert verified.info == info


async def test_vendor_build_runs_an_agent(
    hass: HomeAssistant, make_entry: EntryFactory, abi_family: AbiFamily
) -> None:
    """An entry on an unversioned build loads and answers."""
    entry = await make_entry(setup=False)
    hass.config_entries.async_update_entry(
        entry,
        data={**entry.data, CONF_LIBRARY_PATH: str(VENDOR_LIBRARIES[abi_family])},
    )
    await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.LOADED
    assert entry.runtime_data.engine.runtime.version == f"{abi_family}.x"
    result = await conversation.async_converse(
        hass, "hello", None, Context(), agent_id="conversation.agent_0"
    )
    assert result.response.speech["plain"]["speech"] == "Hello from the simulator."


async def test_config_flow_offers_the_family_for_an_odd_build(
    hass: HomeAssistant, tmp_path: Path, models_dir: Path, write_model: ModelWriter
) -> None:
    """The paths form refuses the odd build, then accepts it with a chosen family."""
    assert await async_setup_component(hass, "homeassistant", {})
    hass.config.config_dir = str(tmp_path)
    write_model()
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": config_entries.SOURCE_USER}
    )
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {"next_step_id": "local"}
    )
    paths = {
        CONF_LIBRARY_PATH: str(ODD_LIBRARY),
        CONF_MODELS_DIR: str(models_dir),
        CONF_CACHE_DIR: str(tmp_path / "cache"),
    }
    result = await hass.config_entries.flow.async_configure(result["flow_id"], paths)
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {CONF_LIBRARY_PATH: "library_unknown_version"}
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {**paths, CONF_ABI_FAMILY: "1_3"}
    )
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "model"
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {"model": "Qwen3 Sim"}
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    entry = result["result"]
    await hass.async_block_till_done()
    assert entry.data[CONF_ABI_FAMILY] == "1_3"
    assert entry.state is ConfigEntryState.LOADED
    assert entry.runtime_data.engine.runtime.family is AbiFamily.V1_3
