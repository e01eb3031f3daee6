"""Loading the runtime library: every refusal has its own clear error."""

from pathlib import Path
import shutil
import struct

import pytest

from custom_components.rockchip_llm.host.rkllm import library
from custom_components.rockchip_llm.host.rkllm.abi import AbiFamily
from custom_components.rockchip_llm.host.rkllm.errors import (
    LibraryNotFound,
    MissingSymbols,
    NotASharedLibrary,
    UnknownRuntimeVersion,
    UnsupportedRuntime,
    WrongArchitecture,
)
from custom_components.rockchip_llm.host.rkllm.library import (
    VersionSource,
    family_for_version,
    git_blob_sha1,
    inspect_library,
    load_library,
)

from .conftest import SIM_BUILD


def elf_header(machine: int, e_type: int = 3) -> bytes:
    """A minimal little-endian 64-bit ELF header."""
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    return ident + struct.pack("<HHI", e_type, machine, 1) + bytes(40)


def test_loads_simulator(sim_library: Path, abi_family: AbiFamily) -> None:
    """The simulator loads, with its family read from its version string."""
    loaded = load_library(sim_library)
    assert loaded.info.family is abi_family
    assert loaded.info.version == {"1.2": "1.2.3", "1.3": "1.3.0"}[abi_family]
    assert loaded.info.version_source is VersionSource.VERSION_STRING
    assert loaded.layout.family is abi_family


def test_missing_file(tmp_path: Path) -> None:
    """A missing file says so."""
    with pytest.raises(LibraryNotFound, match="does not exist"):
        load_library(tmp_path / "librkllmrt.so")


def test_text_file(tmp_path: Path) -> None:
    """A text file is not a shared library."""
    path = tmp_path / "librkllmrt.so"
    path.write_text("not a library")
    with pytest.raises(NotASharedLibrary, match="not an ELF shared library"):
        load_library(path)


def test_directory(tmp_path: Path) -> None:
    """A directory is not a shared library."""
    with pytest.raises(NotASharedLibrary, match="directory"):
        load_library(tmp_path)


def test_wrong_architecture(tmp_path: Path) -> None:
    """An aarch64 library on this x86_64 host is explained before dlopen."""
    path = tmp_path / "librkllmrt.so"
    path.write_bytes(elf_header(183))
    with pytest.raises(WrongArchitecture, match="built for aarch64") as err:
        inspect_library(path, expected_machine="x86_64")
    assert err.value.placeholders["found"] == "aarch64"


def test_executable_is_not_a_library(tmp_path: Path) -> None:
    """An ELF executable of the right architecture is still refused."""
    path = tmp_path / "librkllmrt.so"
    path.write_bytes(elf_header(183, e_type=2))
    with pytest.raises(NotASharedLibrary, match="not a shared library"):
        inspect_library(path, expected_machine="aarch64")


def test_missing_symbol() -> None:
    """A library without rkllm_abort names the missing function."""
    with pytest.raises(MissingSymbols, match="rkllm_abort"):
        load_library(SIM_BUILD / "librkllm_sim_missing_symbol.so")


def test_old_runtime() -> None:
    """Runtime 1.1.4 is refused with the versions we need."""
    with pytest.raises(
        UnsupportedRuntime, match=r"1\.1\.4 is too old; install runtime 1\.2\.1"
    ):
        load_library(SIM_BUILD / "librkllm_sim_1_1.so")


def test_release_hash_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A known release hash identifies the runtime without reading strings."""
    path = tmp_path / "librkllmrt.so"
    shutil.copy(SIM_BUILD / "librkllm_sim_1_3.so", path)
    blob = git_blob_sha1(path.read_bytes())
    monkeypatch.setitem(library.KNOWN_RELEASES, blob[:8], "1.2.2")
    info = inspect_library(path)
    assert (info.version, info.version_source, info.family) == (
        "1.2.2",
        VersionSource.RELEASE_HASH,
        AbiFamily.V1_2,
    )


def test_unknown_version_needs_override(tmp_path: Path) -> None:
    """Without hash or version string the family must be given explicitly."""
    path = tmp_path / "librkllmrt.so"
    data = (SIM_BUILD / "librkllm_sim_1_3.so").read_bytes()
    path.write_bytes(data.replace(b"rkllm-runtime version:", b"xxxxx-xxxxxxx-xxxxxxx:"))
    with pytest.raises(UnknownRuntimeVersion, match="cannot tell"):
        inspect_library(path)
    info = inspect_library(path, family_override=AbiFamily.V1_3)
    assert (info.family, info.version_source) == (
        AbiFamily.V1_3,
        VersionSource.OVERRIDE,
    )


@pytest.mark.parametrize(
    ("version", "family"),
    [("1.2.1", AbiFamily.V1_2), ("1.2.3", AbiFamily.V1_2), ("1.3.0", AbiFamily.V1_3)],
)
def test_supported_versions(version: str, family: AbiFamily) -> None:
    """Supported versions map to their family."""
    assert family_for_version(version) is family


@pytest.mark.parametrize(
    ("version", "message"),
    [
        ("1.1.4", "too old"),
        ("1.2.0", "too old"),
        ("1.2.1b1", "too old"),
        ("1.4.0", "newer than this integration supports"),
    ],
)
def test_unsupported_versions(version: str, message: str) -> None:
    """Older and newer runtimes are refused with a reason."""
    with pytest.raises(UnsupportedRuntime, match=message):
        family_for_version(version)


def test_git_blob_sha1() -> None:
    """The hash equals what `git hash-object` prints."""
    assert git_blob_sha1(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"
