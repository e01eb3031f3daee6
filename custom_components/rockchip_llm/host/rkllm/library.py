"""Find, validate and load librkllmrt.so, and detect its ABI family.

Home Assistant's process only reads library files, never loads them: the probe's
child loads a library to check it (:func:`load_library`), a worker process loads
the checked private copy (:func:`load_copy`).
Everything here blocks (file reads, dlopen): call it off the event loop.
"""

from collections.abc import Mapping
import ctypes
from dataclasses import asdict, dataclass
from enum import StrEnum
import hashlib
import logging
import os
from pathlib import Path
import platform
import re
import struct
from typing import Any

from .abi import (
    LAYOUTS,
    REQUIRED_SYMBOLS,
    AbiFamily,
    AbiLayout,
    RKLLMExtendParam,
    RKLLMParam12,
    RKLLMParam13,
)
from .errors import (
    LibraryLoadError,
    LibraryNotFound,
    MissingSymbols,
    NotASharedLibrary,
    UnknownRuntimeVersion,
    UnsupportedRuntime,
    WrongArchitecture,
)

_LOGGER = logging.getLogger(__name__)

LIBRARY_NAME = "librkllmrt.so"
SIMULATOR_SYMBOL = "rkllm_sim_counter"
"""Exported by the development simulator (tests/rkllm_sim) only."""
MIN_VERSION = (1, 2, 1)
SUPPORTED = "1.2.1 to 1.2.3 or 1.3.0"

# git blob SHA-1 prefixes of the aarch64 librkllmrt.so of each public release.
KNOWN_RELEASES: dict[str, str] = {
    "66dfdc7c": "1.1.0",
    "bfca0513": "1.1.1",
    "e8f4afc3": "1.1.2",
    "68e79327": "1.1.3",
    "3bb8cb61": "1.1.4",
    "d45ee9b8": "1.2.0",
    "db041c01": "1.2.1b1",
    "6b9439d5": "1.2.1",
    "8ed9cca1": "1.2.2",
    "0084abc3": "1.2.3",
    "34167b32": "1.3.0",
}

_VERSION_STRING = re.compile(rb"rkllm-runtime version:? ?v?(\d+\.\d+\.\d+(?:b\d+)?)")
_VERSION_PARTS = re.compile(r"^(\d+)\.(\d+)\.(\d+)(b\d+)?$")

_ELF_MAGIC = b"\x7fELF"
_ET_DYN = 3
_MACHINES = {3: "x86", 40: "arm", 62: "x86_64", 183: "aarch64", 243: "riscv64"}
_HOST_MACHINES = {
    "x86_64": "x86_64",
    "amd64": "x86_64",
    "aarch64": "aarch64",
    "arm64": "aarch64",
    "armv7l": "arm",
    "armv8l": "arm",
    "i686": "x86",
    "riscv64": "riscv64",
}


class VersionSource(StrEnum):
    """How the runtime version was established."""

    RELEASE_HASH = "release hash"
    VERSION_STRING = "version string"
    BEHAVIOUR = "library behaviour"
    OVERRIDE = "override"


@dataclass(frozen=True, slots=True)
class RuntimeInfo:
    """What we know about a library file without loading it."""

    path: Path
    version: str
    version_source: VersionSource
    family: AbiFamily
    blob_sha1: str
    size: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class VerifiedLibrary:
    """A library a child process loaded and checked, and the copy workers load.

    Home Assistant works with this description only: it never loads the library.
    """

    info: RuntimeInfo
    copy: Path
    """The private copy, identical to info's file when it was checked."""
    simulated: bool
    """Whether it is the development simulator, not Rockchip's runtime."""


@dataclass(frozen=True, slots=True)
class RuntimeLibrary:
    """A loaded runtime library with the prototypes of its ABI family."""

    info: RuntimeInfo
    layout: AbiLayout
    cdll: ctypes.CDLL


def host_machine() -> str:
    """Return the ELF machine name of this host."""
    machine = platform.machine().lower()
    return _HOST_MACHINES.get(machine, machine)


def check_elf(path: Path, expected_machine: str | None = None) -> None:
    """Raise unless path is a shared library for this CPU (checked before dlopen)."""
    try:
        with path.open("rb") as file:
            header = file.read(20)
    except FileNotFoundError as err:
        raise LibraryNotFound(f"{path} does not exist", path=str(path)) from err
    except IsADirectoryError as err:
        raise NotASharedLibrary(
            f"{path} is a directory, not a shared library", path=str(path)
        ) from err
    except OSError as err:
        raise LibraryLoadError(
            f"cannot read {path}: {err.strerror}", path=str(path)
        ) from err
    if len(header) < 20 or not header.startswith(_ELF_MAGIC):
        raise NotASharedLibrary(f"{path} is not an ELF shared library", path=str(path))
    byte_order = "<" if header[5] == 1 else ">"
    e_type, e_machine = struct.unpack(f"{byte_order}HH", header[16:20])
    machine = _MACHINES.get(e_machine, f"machine {e_machine}")
    expected = expected_machine or host_machine()
    if machine != expected:
        raise WrongArchitecture(
            f"{path} is built for {machine}, but this system is {expected}; "
            f"install the {expected} build of {LIBRARY_NAME}",
            path=str(path),
            found=machine,
            expected=expected,
        )
    if e_type != _ET_DYN:
        raise NotASharedLibrary(
            f"{path} is an ELF file but not a shared library", path=str(path)
        )


def git_blob_sha1(data: bytes) -> str:
    """Return the git blob hash of data (what `git hash-object` prints)."""
    digest = hashlib.sha1(usedforsecurity=False)
    digest.update(b"blob %d\0" % len(data))
    digest.update(data)
    return digest.hexdigest()


def info_to_wire(info: RuntimeInfo) -> dict[str, Any]:
    """RuntimeInfo as JSON data, for the child processes that check or load it."""
    return {
        name: str(value) if isinstance(value, Path) else value
        for name, value in asdict(info).items()
    }


def info_from_wire(data: Mapping[str, Any]) -> RuntimeInfo:
    """Rebuild RuntimeInfo; raise KeyError, TypeError or ValueError on bad data."""
    return RuntimeInfo(
        path=Path(data["path"]),
        version=str(data["version"]),
        version_source=VersionSource(data["version_source"]),
        family=AbiFamily(data["family"]),
        blob_sha1=str(data["blob_sha1"]),
        size=int(data["size"]),
        mtime_ns=int(data["mtime_ns"]),
    )


def file_is_simulator(path: Path) -> bool:
    """Whether a library file is the simulator, without loading it."""
    try:
        return SIMULATOR_SYMBOL.encode() in path.read_bytes()
    except OSError:
        return False


def copy_damage(copy: Path, info: RuntimeInfo) -> str | None:
    """Say how copy differs from the library info describes, or None if intact."""
    size = copy.stat().st_size
    if size != info.size:
        return f"{size} bytes instead of {info.size}"
    if git_blob_sha1(copy.read_bytes()) != info.blob_sha1:
        return "its content differs from the original's"
    return None


def family_for_version(version: str) -> AbiFamily:
    """Map a runtime version to its ABI family, or raise UnsupportedRuntime."""
    match = _VERSION_PARTS.match(version)
    if match is None:
        raise UnknownRuntimeVersion(
            f"unrecognised runtime version {version!r}", version=version
        )
    numbers = tuple(int(part) for part in match.groups()[:3])
    beta = match.group(4) is not None
    if numbers < MIN_VERSION or (numbers == MIN_VERSION and beta):
        raise UnsupportedRuntime(
            f"RKLLM runtime {version} is too old; install runtime {SUPPORTED}",
            version=version,
            supported=SUPPORTED,
        )
    if numbers[:2] == (1, 2):
        return AbiFamily.V1_2
    if numbers[:2] == (1, 3):
        return AbiFamily.V1_3
    raise UnsupportedRuntime(
        f"RKLLM runtime {version} is newer than this integration supports "
        f"({SUPPORTED}); update the integration",
        version=version,
        supported=SUPPORTED,
    )


class _DefaultParamBuffer(ctypes.Structure):
    """Room for any RKLLMParam (1.2: 208 bytes, 1.3: 184), returned by value."""

    _fields_ = [("raw", ctypes.c_uint8 * 512)]


# What rkllm_createDefaultParam documents (SDK doc, both families).
_DEFAULTS: dict[str, float] = {
    "top_k": 40,
    "top_p": 0.9,
    "temperature": 0.8,
    "repeat_penalty": 1.1,
}
_DEFAULT_CPUS = 4
_FAMILY_PARAMS: dict[AbiFamily, type[ctypes.Structure]] = {
    AbiFamily.V1_2: RKLLMParam12,
    AbiFamily.V1_3: RKLLMParam13,
}


def identify_family(cdll: ctypes.CDLL, path: Path) -> AbiFamily:
    """Tell the ABI family from what rkllm_createDefaultParam returns (blocking).

    The call writes its RKLLMParam into a buffer bigger than either family's; the
    documented defaults (top_k 40, top_p 0.9, temperature 0.8, repeat_penalty 1.1)
    must be where both families keep them, and enabled_cpus_num 4 shows where
    extend_param starts (1.2: offset 88, 1.3: offset 60). Raises
    UnknownRuntimeVersion, naming what was seen, unless exactly one family fits.
    Call it only in a process that may crash (the probe's child), on a library
    opened with open_runtime.
    """
    function = cdll.rkllm_createDefaultParam
    function.restype = _DefaultParamBuffer
    function.argtypes = []
    raw = bytes(function().raw)
    seen: dict[str, float] = {}
    for name in _DEFAULTS:
        field = getattr(RKLLMParam13, name)
        code = "i" if name == "top_k" else "f"
        seen[name] = struct.unpack_from(f"={code}", raw, field.offset)[0]
    head_ok = all(
        abs(seen[name] - expected) < 1e-3 for name, expected in _DEFAULTS.items()
    )
    cpus_offset = RKLLMExtendParam.enabled_cpus_num.offset
    cpus = {
        family: raw[param.extend_param.offset + cpus_offset]
        for family, param in _FAMILY_PARAMS.items()
    }
    matches = [family for family, value in cpus.items() if value == _DEFAULT_CPUS]
    if head_ok and len(matches) == 1:
        return matches[0]
    described = ", ".join(f"{name} {value:g}" for name, value in seen.items())
    where = ", ".join(
        f"enabled_cpus_num {value} at the {family} offset"
        for family, value in cpus.items()
    )
    raise UnknownRuntimeVersion(
        f"cannot tell which RKLLM runtime {path} is: it has no known release hash "
        f"or version string, and its default parameters ({described}; {where}) "
        "match neither ABI family 1.2 nor 1.3; choose the ABI family in the "
        "integration's setup",
        path=str(path),
    )


def inspect_library(
    path: Path,
    *,
    family_override: AbiFamily | None = None,
    identified: AbiFamily | None = None,
    expected_machine: str | None = None,
) -> RuntimeInfo:
    """Check the file and detect its runtime version and ABI family.

    In order: a known release hash, a version string, the family identified from
    the library's behaviour (by the probe's child), the user's override.
    """
    check_elf(path, expected_machine)
    # Read, never mapped: a mapped file cut short by a copy over it or a bad disk
    # raises SIGBUS, which no handler in Home Assistant survives.
    with path.open("rb") as file:
        stat = os.fstat(file.fileno())
        data = file.read()
    blob = git_blob_sha1(data)
    known = KNOWN_RELEASES.get(blob[:8])
    match = _VERSION_STRING.search(data) if known is None else None
    found = match.group(1).decode() if match is not None else None
    if known is not None:
        version, source = known, VersionSource.RELEASE_HASH
    elif found is not None:
        version, source = found, VersionSource.VERSION_STRING
    elif identified is not None:
        version, source = f"{identified}.x", VersionSource.BEHAVIOUR
    elif family_override is not None:
        version, source = f"{family_override}.x", VersionSource.OVERRIDE
    else:
        raise UnknownRuntimeVersion(
            f"cannot tell which RKLLM runtime {path} is; install runtime {SUPPORTED}",
            path=str(path),
        )
    if source is VersionSource.BEHAVIOUR and identified is not None:
        family = identified
    elif source is VersionSource.OVERRIDE and family_override is not None:
        family = family_override
    else:
        family = family_for_version(version)
    return RuntimeInfo(
        path=path,
        version=version,
        version_source=source,
        family=family,
        blob_sha1=blob,
        size=len(data),
        mtime_ns=stat.st_mtime_ns,
    )


def load_library(
    path: Path,
    *,
    family_override: AbiFamily | None = None,
    identified: AbiFamily | None = None,
    expected_machine: str | None = None,
) -> RuntimeLibrary:
    """Validate, dlopen and bind the runtime library at path."""
    info = inspect_library(
        path,
        family_override=family_override,
        identified=identified,
        expected_machine=expected_machine,
    )
    return _bind(path, info)


def load_copy(copy: Path, info: RuntimeInfo) -> RuntimeLibrary:
    """Dlopen and bind a private copy of the library info describes (a worker's load).

    The copy is checked (size and hash) against info first, so a damaged copy is
    never mapped. The original is not read: it may have been replaced since it
    was checked, and the copy is what was checked.
    """
    try:
        damage = copy_damage(copy, info)
    except OSError as err:
        damage = err.strerror
    if damage is not None:
        raise LibraryLoadError(
            f"the copy {copy} does not match {info.path} ({damage}); the host "
            "copies it again before the next start",
            path=str(info.path),
        )
    return _bind(copy, info)


def open_runtime(file: Path, path: Path | None = None) -> ctypes.CDLL:
    """Dlopen file and check it exports the runtime's functions.

    Errors name path (the library the user configured), by default file itself.
    """
    path = path or file
    try:
        cdll = ctypes.CDLL(str(file))
    except OSError as err:
        raise LibraryLoadError(
            f"the dynamic loader refused {path}: {err}", path=str(path)
        ) from err
    missing = [name for name in REQUIRED_SYMBOLS if not hasattr(cdll, name)]
    if missing:
        raise MissingSymbols(
            f"{path} lacks {', '.join(missing)}; install runtime {SUPPORTED}",
            path=str(path),
            symbols=", ".join(missing),
        )
    return cdll


def _bind(file: Path, info: RuntimeInfo) -> RuntimeLibrary:
    """Dlopen file and give its functions the prototypes of info's ABI family."""
    cdll = open_runtime(file, info.path)
    layout = LAYOUTS[info.family]
    for name, (restype, argtypes) in layout.prototypes().items():
        function = getattr(cdll, name)
        function.restype = restype
        function.argtypes = argtypes
    _LOGGER.info(
        "Loaded RKLLM runtime %s from %s (ABI family %s, version from %s)",
        info.version,
        file,
        info.family,
        info.version_source,
    )
    return RuntimeLibrary(info=info, layout=layout, cdll=cdll)
